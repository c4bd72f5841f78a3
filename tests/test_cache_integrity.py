"""The on-disk caches are verified when read: a damaged entry is reported in one line and rebuilt.

Real cache files are damaged the way disks and killed processes damage them: bytes zeroed in the
middle, the tail cut off. Writers racing to build (or overwrite) one entry all end with a sound cache.
"""

import logging
import os
from pathlib import Path

import pytest
import torch
from helpers import EXAMPLES, config_for

from prefalign.data.chat import ChatRenderer
from prefalign.data.encode import MANIFEST, encode_pairs
from prefalign.data.sources import load_preference_pairs
from prefalign.integrity import folder_checksums
from prefalign.reference_cache import ReferenceTable
from prefalign.train.workflow import build_trainer


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "zeroed":  # 64 bytes in the second half: the data, not the header
        start = len(data) * 3 // 4
        data[start:start + 64] = bytes(64)
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))


@pytest.fixture
def pairs_and_renderer(tiny_tokenizer):
    pairs, _ = load_preference_pairs(["demo_train"], str(EXAMPLES / "data"), max_samples=16)
    return pairs, ChatRenderer(tiny_tokenizer, None)


def rows(dataset):
    return [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize("how", ["zeroed", "truncated"])
def test_a_damaged_encoded_cache_is_reported_and_rebuilt(pairs_and_renderer, tmp_path, caplog, how):
    pairs, renderer = pairs_and_renderer
    fresh = rows(encode_pairs(pairs, renderer, 96, cache_dir=tmp_path)[0])  # read now: the dataset maps the file
    [entry] = (tmp_path / "encoded").iterdir()
    [arrow] = entry.glob("*.arrow")
    original = arrow.read_bytes()
    damage(arrow, how)
    with caplog.at_level(logging.WARNING):
        again, _ = encode_pairs(pairs, renderer, 96, cache_dir=tmp_path)
    [line] = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert str(entry) in line and arrow.name in line and "re-encoding it" in line
    assert rows(again) == fresh
    assert arrow.read_bytes() == original  # the entry on disk is whole again


def test_overwrite_cache_replaces_an_entry_that_verifies_but_is_stale(pairs_and_renderer, tmp_path):
    """An entry written by an older, buggy encoder passes its checksums; overwrite_cache must still replace it."""
    import datasets

    pairs, renderer = pairs_and_renderer
    fresh = rows(encode_pairs(pairs, renderer, 96, cache_dir=tmp_path)[0])
    [entry] = (tmp_path / "encoded").iterdir()
    stale = datasets.load_from_disk(str(entry)).map(lambda row: {"chosen_ids": row["chosen_ids"][:1]})
    manifest = (entry / MANIFEST).read_text()
    staging = tmp_path / "stale"
    stale.save_to_disk(str(staging))
    for name in folder_checksums(staging):
        os.replace(staging / name, entry / name)
    import json

    raw = json.loads(manifest)
    raw["files"] = folder_checksums(entry, skip=(MANIFEST,))
    (entry / MANIFEST).write_text(json.dumps(raw))

    used, _ = encode_pairs(pairs, renderer, 96, cache_dir=tmp_path)
    assert rows(used) != fresh  # without overwrite_cache the (consistent) entry is used
    rebuilt, _ = encode_pairs(pairs, renderer, 96, cache_dir=tmp_path, overwrite_cache=True)
    assert rows(rebuilt) == fresh
    assert rows(encode_pairs(pairs, renderer, 96, cache_dir=tmp_path)[0]) == fresh  # and it was replaced
    assert [p.name for p in (tmp_path / "encoded").iterdir()] == [entry.name]  # no leftovers


def test_two_writers_racing_on_one_cache_entry_both_succeed(pairs_and_renderer, tmp_path):
    """Four threads encode the same pairs into an empty cache at once (the race is on renames, so
    threads exercise it as processes would): all return the same rows and one entry is left, whole."""
    import json
    import threading

    pairs, renderer = pairs_and_renderer
    results, errors = [], []

    def encode(overwrite):
        try:
            results.append(rows(encode_pairs(pairs, renderer, 96, cache_dir=tmp_path, overwrite_cache=overwrite)[0]))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=encode, args=(i % 2 == 1,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 4 and all(r == results[0] for r in results)
    [entry] = (tmp_path / "encoded").iterdir()  # no staging or set-aside folders left behind
    manifest = json.loads((entry / MANIFEST).read_text())
    assert folder_checksums(entry, skip=(MANIFEST,)) == manifest["files"]


@pytest.mark.parametrize("how", ["zeroed", "truncated"])
def test_a_damaged_reference_cache_part_is_reported_and_recomputed(tiny_model_dir, tmp_path, caplog, how):
    config = config_for(tiny_model_dir, tmp_path / "out", precompute_ref_log_probs=True)
    first = build_trainer(config)
    directory = Path(first.reference.stats["train"]["path"])
    [part] = directory.glob("part-*.safetensors")
    expected = ReferenceTable.load(directory)
    damage(part, how)
    with caplog.at_level(logging.WARNING):
        second = build_trainer(config)
    [line] = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert str(part) in line and "computed again" in line
    assert second.reference.stats["train"]["computed"] == 16
    got = second.reference.tables["train"]
    for key, value in expected.values.items():
        assert torch.allclose(got.values[key][got.position[expected.position >= 0]],
                              value[expected.position[expected.position >= 0]], rtol=1e-5, atol=1e-5), key
    assert not part.exists() and len(list(directory.glob("part-*.safetensors"))) == 1
