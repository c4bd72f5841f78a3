"""Step 3 as one call: load, split, encode, and account for every record."""

import json

import pytest

from prefalign.config import build_config
from prefalign.data.pipeline import prepare_data, split_held_out
from prefalign.errors import ConfigError, DataError


def test_val_size_fraction_and_count_are_seeded():
    pairs = list(range(20))
    train, held = split_held_out(pairs, 0.25, seed=1)
    assert len(held) == 5 and sorted(train + held) == pairs
    assert split_held_out(pairs, 0.25, seed=1) == (train, held)
    assert split_held_out(pairs, 0.25, seed=2)[1] != held
    assert len(split_held_out(pairs, 3, seed=1)[1]) == 3
    with pytest.raises(ConfigError, match="leaving none to train on"):
        split_held_out(pairs, 20, seed=1)


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def _data_args(tmp_path, **kw):
    return build_config({"model_name_or_path": "m", "dataset": str(tmp_path / "prefs.jsonl"),
                         "output_dir": str(tmp_path / "out"), **kw}).data


RECORDS = [
    {"prompt": "Hi?", "chosen": "Hello, friend!", "rejected": "Go away."},
    {"prompt": "Color of grass?", "chosen": "Green.", "rejected": "   "},
    {"prompt": "2+2?", "chosen": "It is 4.", "rejected": "It is 5."},
]


def test_bad_record_stops_with_file_record_line_and_field(tmp_path, tiny_tokenizer):
    _write_jsonl(tmp_path / "prefs.jsonl", RECORDS)
    with pytest.raises(DataError) as info:
        prepare_data(_data_args(tmp_path), tiny_tokenizer, seed=0, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "prefs.jsonl record 1 (line 2)" in message and "'rejected'" in message
    assert "\n" not in message


def test_skipped_records_are_counted_and_written_with_their_reason(tmp_path, tiny_tokenizer):
    _write_jsonl(tmp_path / "prefs.jsonl", RECORDS)
    data = prepare_data(_data_args(tmp_path, on_bad_record="skip"), tiny_tokenizer, seed=0,
                        cache_dir=tmp_path / "cache")
    assert len(data.train) == 2
    data.write(tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "data_summary.json").read_text())
    assert list(summary["skipped"].values()) == [1] and list(summary["datasets"].values()) == [2]
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejected_records.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["index"] == 1 and rejects[0]["field"] == "rejected"
    assert rejects[0]["reason"]


def test_truncations_are_counted(tmp_path, tiny_tokenizer):
    long = {"prompt": " ".join(["word"] * 200), "chosen": "Sure, fine.", "rejected": "No."}
    _write_jsonl(tmp_path / "prefs.jsonl", [long, RECORDS[0]])
    data = prepare_data(_data_args(tmp_path, cutoff_len=64), tiny_tokenizer, seed=0, cache_dir=tmp_path / "cache")
    assert data.summary.train.truncated_prompts == 1
    assert max(len(p) + max(len(c), len(r)) for p, c, r in
               zip(data.train["prompt_ids"], data.train["chosen_ids"], data.train["rejected_ids"])) <= 64
