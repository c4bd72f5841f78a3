"""Every reference strategy with image pairs: its log-probs are those of the model it stands for, computed on
the same image batch, and the precomputed cache is keyed by the image bytes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mm_helpers import build_vlm, draw_image, write_rlhf_v  # noqa: E402

from helpers import first_batch  # noqa: E402
from prefalign.config import build_config  # noqa: E402
from prefalign.modeling.logprobs import pair_logps  # noqa: E402
from prefalign.train.workflow import build_trainer  # noqa: E402


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-ref")
    return {"base": build_vlm("qwen2_vl", root / "base"), "other": build_vlm("qwen2_vl", root / "other", seed=7),
            "data": write_rlhf_v(root / "data", count=6)}


def _config(vlm, out, **overrides):
    values = {"model_name_or_path": vlm["base"], "stage": "dpo", "finetuning_type": "lora", "template": "qwen2_vl",
              "dataset": "rlhf_v", "dataset_dir": vlm["data"], "cutoff_len": 512, "output_dir": str(out),
              "per_device_train_batch_size": 3, "max_steps": 1, "learning_rate": 1e-3, "report_to": "none",
              "save_strategy": "no", "overwrite_output_dir": True, "seed": 0, "disable_tqdm": True}
    return build_config({**values, **overrides})


@torch.no_grad()
def _logps(model, batch):
    return pair_logps(model.eval(), batch)


def _same(a, b):
    assert torch.allclose(a.chosen, b.chosen, atol=1e-5) and torch.allclose(a.rejected, b.rejected, atol=1e-5)


@pytest.mark.parametrize("overrides, name, model", [
    ({}, "adapter-disabled", "base"),
    ({"finetuning_type": "full"}, "frozen-copy", "base"),
    ({"ref_model": "OTHER"}, "separate-model", "other"),
    ({"precompute_ref_log_probs": True}, "precomputed (adapter-disabled)", "base"),
    ({"precompute_ref_log_probs": True, "finetuning_type": "full"}, "precomputed (frozen-copy)", "base"),
])
def test_each_reference_strategy_scores_image_pairs_as_its_model(vlm, tmp_path, overrides, name, model):
    """The reference's log-probs of the first image batch (3 pairs, 1-3 images each) equal those of the model it
    stands for, loaded on its own (AutoModelForImageTextToText), on the same batch."""
    from transformers import AutoModelForImageTextToText

    overrides = {k: vlm["other"] if v == "OTHER" else v for k, v in overrides.items()}
    trainer = build_trainer(_config(vlm, tmp_path, **overrides))
    assert trainer.reference.name == name
    batch = first_batch(trainer)
    assert "pixel_values" in batch and "image_grid_thw" in batch
    _same(trainer.reference.logps(batch), _logps(AutoModelForImageTextToText.from_pretrained(vlm[model]), batch))


def test_the_precomputed_cache_is_keyed_by_the_image_bytes(vlm, tmp_path):
    """Redrawing one image at the same size (same token ids) makes another cache entry, computed afresh."""
    import shutil

    data = Path(shutil.copytree(vlm["data"], tmp_path / "data"))
    first = build_trainer(_config(vlm, tmp_path / "a", dataset_dir=str(data), precompute_ref_log_probs=True))
    again = build_trainer(_config(vlm, tmp_path / "b", dataset_dir=str(data), precompute_ref_log_probs=True))
    assert again.reference.stats["train"]["path"] == first.reference.stats["train"]["path"]
    from PIL import Image

    first_image = data / json.loads((data / "rlhf_v.json").read_text())[0]["images"][0]
    with Image.open(first_image) as image:
        size = image.size
    draw_image(99, size).save(first_image)  # the same size: the same image tokens
    redrawn = build_trainer(_config(vlm, tmp_path / "c", dataset_dir=str(data), precompute_ref_log_probs=True))
    assert redrawn.reference.stats["train"]["path"] != first.reference.stats["train"]["path"]
    assert redrawn.reference.stats["train"]["computed"] == 6


@pytest.mark.parametrize("overrides, rows, runs", [
    ({"packing": False, "prefix_sharing": False}, 6, 1.0),
    ({"packing": False, "prefix_sharing": False, "ref_model": "OTHER"}, 6, 2.0),
    ({"packing": False}, 3, 1.0),
    ({"prefix_sharing": False}, 1, 1.0),  # packed: a pair's two sequences in one row, each with its images
    ({}, 1, 1.0),  # the default: packed and prefix-shared
])
def test_tower_runs_per_pair_count_each_pairs_images_once_per_encoding(vlm, tmp_path, overrides, rows, runs):
    """`vision/tower_runs_per_pair` after one training batch (3 pairs, 1-3 images each): the policy encodes each
    pair's images once, whether the batch holds them twice (concatenated: 6 rows; packed without prefix
    sharing: 1 row) or once (prefix-shared: 3 rows; packed and prefix-shared: 1 row); a reference on the policy's frozen tower reuses those features (1 run per pair), a separate
    reference model encodes them again (2). The images the towers encoded are that many times the images of
    the batch's 3 records in rlhf_v.json (pair `index` = record number: no record is skipped or held out)."""
    overrides = {k: vlm["other"] if v == "OTHER" else v for k, v in overrides.items()}
    trainer = build_trainer(_config(vlm, tmp_path, **overrides))
    batch = first_batch(trainer)
    assert batch["input_ids"].shape[0] == rows
    records = json.loads((Path(vlm["data"]) / "rlhf_v.json").read_text())
    images = sum(len(records[i]["images"]) for i in batch["index"].tolist())
    trainer.compute_loss(trainer.model, batch)
    assert trainer._towers.encoded == runs * images
    assert trainer._towers.report() == {"vision/tower_runs_per_pair": runs}
