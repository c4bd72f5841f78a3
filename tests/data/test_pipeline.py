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


def test_the_summary_is_written_once_and_read_back_unchanged(tmp_path, tiny_tokenizer):
    """data_summary.json holds the typed DataSummary (token lengths included) and reads back equal."""
    from prefalign.data.summary import DataSummary

    _write_jsonl(tmp_path / "prefs.jsonl", RECORDS)
    data = prepare_data(_data_args(tmp_path, on_bad_record="skip"), tiny_tokenizer, seed=0,
                        cache_dir=tmp_path / "cache")
    data.write(tmp_path / "out")
    back = DataSummary.read(tmp_path / "out")
    assert back == data.summary
    lengths = sorted(len(ids) for ids in data.train["chosen_ids"])
    assert back.train.token_lengths["chosen"]["min"] == lengths[0]
    assert back.train.token_lengths["chosen"]["max"] == lengths[-1]
    assert back.describe().splitlines()[0] == f"{next(iter(back.datasets))}: 2 pairs"
    assert DataSummary.read(tmp_path / "nothing-here") is None


@pytest.mark.parametrize("template", ["chatml", None], ids=["lf-chatml", "tokenizers-own"])
def test_default_system_is_the_system_of_records_without_one_as_in_llama_factory(tmp_path, tiny_tokenizer, template):
    """LF 0.9.5 (template.py `_encode`): `system = system or self.default_system`, with data_args.default_system
    as the template's default. So a record without a system turn (or with an empty one) encodes as the same
    record with `default_system` written in, and a record's own system turn wins."""
    def conversation(system):
        head = [] if system is None else [{"role": "system", "content": system}]
        return {"prompt": head + [{"role": "user", "content": "Hi?"}],
                "chosen": [{"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "assistant", "content": "Go away."}]}

    def encoded(records, **kw):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        _write_jsonl(folder / "prefs.jsonl", records)
        data = prepare_data(_data_args(folder, template=template, **kw), tiny_tokenizer, seed=0,
                            cache_dir=tmp_path / "cache")
        return [{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in data.train]

    with_default = encoded([conversation(None), conversation(""), conversation("Own.")], default_system="Be brief.")
    written = encoded([conversation("Be brief."), conversation("Be brief."), conversation("Own.")])
    assert with_default == written
    assert encoded([conversation(None)])[0] != written[0]  # the system turn shows in the ids
