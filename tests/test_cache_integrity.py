"""The on-disk caches are verified when read: a damaged entry is reported in one line and rebuilt.

Real cache files are damaged the way disks and killed processes damage them: bytes zeroed in the
middle, the tail cut off. Two processes racing to build one entry both end with a sound cache.
"""

import logging
import os
import subprocess
import sys
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


@pytest.mark.slow
def test_two_processes_encoding_one_cache_at_once_both_succeed(tiny_model_dir, tmp_path):
    """Two `prefalign data` runs race on an empty cache: both exit 0 and the entry verifies."""
    env = {**os.environ, "PREFALIGN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "prefalign", "data", str(EXAMPLES / "quickstart.yaml"),
            f"model_name_or_path={tiny_model_dir}", "build_demo_model=false", f"dataset_dir={EXAMPLES / 'data'}",
            "eval_dataset=", f"output_dir={tmp_path / 'out'}"]
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    results = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    [entry] = (tmp_path / "cache" / "encoded").iterdir()
    import json

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
