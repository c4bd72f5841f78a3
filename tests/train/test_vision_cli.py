"""Vision-language DPO through the real command line, on tiny models and an rlhf_v-shaped local dataset.

LLaMA-Factory 0.9.5's own VLM DPO example (tests/fixtures/llamafactory/qwen3vl_lora_dpo.yaml, copied
from its sdist) runs unchanged but for model_name_or_path, dataset_dir and output_dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlm_models import build_vlm, rlhf_v_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LF_EXAMPLE = ROOT / "tests" / "fixtures" / "llamafactory" / "qwen3vl_lora_dpo.yaml"


def prefalign(*args, cwd):
    return subprocess.run([sys.executable, "-m", "prefalign", *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)


def _lf_config(tmp_path, family: str, **changes) -> Path:
    model = build_vlm(family, tmp_path / f"model-{family}")
    data = rlhf_v_dataset(tmp_path / "data")
    config = yaml.safe_load(LF_EXAMPLE.read_text())
    config.update(model_name_or_path=model, dataset_dir=data, output_dir=str(tmp_path / "out"), **changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.extended
def test_lf_qwen3vl_dpo_example_runs_unchanged_and_its_adapter_loads_with_peft(tmp_path):
    """The example trains (LoRA, 3 epochs of 8 pairs with 1-3 images each, accumulation 8, bf16 autocast on
    the CPU) to completion; policy == reference at the start, so with its learning rate of 5e-6 the mean
    loss stays ln 2 = 0.6931 to 4 digits; the saved adapter adapts only the language model (lora_target:
    all never reaches the frozen vision tower or projector) and loads with peft on the base model."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    config = _lf_config(tmp_path, "qwen3_vl")
    run = prefalign("train", str(config), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    assert abs(json.loads((out / "train_results.json").read_text())["train_loss"] - 0.6931) < 1e-4
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["train"]["pairs"] == 8
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all("language_model" in key for key in weights)
    base = AutoModelForImageTextToText.from_pretrained(yaml.safe_load(config.read_text())["model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(out))
    assert any("lora_B" in name and param.abs().sum() > 0 for name, param in model.named_parameters())


@pytest.mark.extended
@pytest.mark.parametrize("finetuning_type", ["full", "freeze"])
def test_full_and_freeze_tuning_train_only_the_language_model(tmp_path, finetuning_type):
    """Full and freeze tuning of a Qwen2-VL model (two steps, a large learning rate): the saved weights of the
    vision tower and projector are the base model's, bit for bit; language-model weights changed."""
    from safetensors.torch import load_file

    config = _lf_config(tmp_path, "qwen2_vl", finetuning_type=finetuning_type, template="qwen2_vl",
                        learning_rate=1e-2, num_train_epochs=1.0, max_steps=2, gradient_accumulation_steps=1,
                        dataloader_num_workers=0, preprocessing_num_workers=1, bf16=False)
    run = prefalign("train", str(config), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    base = load_file(str(tmp_path / "model-qwen2_vl" / "model.safetensors"))
    trained = load_file(str(tmp_path / "out" / "model.safetensors"))
    vision = [key for key in base if ".visual." in f".{key}"]
    assert vision and all(torch.equal(base[key], trained[key]) for key in vision)
    language = [key for key in base if "layers.1." in key and ".visual." not in f".{key}"]  # Qwen2-VL's own key names
    assert any(not torch.equal(base[key], trained[key]) for key in language)
