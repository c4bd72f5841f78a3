"""`prefalign export`: the merged model equals base + adapter, loads without peft, and bad targets are refused."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_random_adapter

from prefalign.cli import main


def write_config(path: Path, **values) -> str:
    path.write_text(yaml.safe_dump({"stage": "dpo", **values}))
    return str(path)


@pytest.fixture(scope="module")
def random_adapter(tiny_model_dir, tmp_path_factory) -> str:
    """A LoRA adapter with random A and B (non-zero delta) on every linear layer of the tiny model."""
    return make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapters") / "random", seed=2)


def test_merged_model_equals_base_plus_adapter(tiny_model_dir, random_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefalign.data.templates import get_template

    out = tmp_path / "merged"
    # 0.0001 GB = 100 kB per shard: the ~300 kB tiny model must be split
    cfg = write_config(tmp_path / "export.yaml", model_name_or_path=tiny_model_dir, adapter_name_or_path=random_adapter,
                       export_dir=str(out), export_size=0.0001, template="alpaca")
    assert main(["export", cfg]) == 0

    assert not (out / "adapter_config.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not hasattr(merged, "peft_config")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), random_adapter).eval()
    batch = torch.tensor([[1, 5, 17, 42, 300, 7, 2], [1, 9, 8, 7, 6, 5, 4]])
    with torch.no_grad():
        expected = reference(input_ids=batch).logits
        actual = merged(input_ids=batch).logits
        with reference.disable_adapter():
            base = reference(input_ids=batch).logits
    assert torch.allclose(actual, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(actual, base, atol=1e-3)  # the adapter changed something: the test can fail

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == get_template("alpaca").jinja  # the template training used travels along
    generation = json.loads((out / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert tokenizer.eos_token_id in (eos if isinstance(eos, list) else [eos])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_refusals(tiny_model_dir, random_adapter, tmp_path, capsys):
    cfg = write_config(tmp_path / "no_dir.yaml", model_name_or_path=tiny_model_dir, adapter_name_or_path=random_adapter)
    assert main(["export", cfg]) == 2
    assert "export_dir is required" in _one_line_error(capsys)

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("something")
    cfg = write_config(tmp_path / "full.yaml", model_name_or_path=tiny_model_dir, adapter_name_or_path=random_adapter,
                       export_dir=str(full))
    assert main(["export", cfg]) == 2
    assert "export_overwrite" in _one_line_error(capsys)
    assert (full / "keep.txt").read_text() == "something"

    quantized = tmp_path / "quantized"
    shutil.copytree(tiny_model_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    cfg = write_config(tmp_path / "q.yaml", model_name_or_path=str(quantized), adapter_name_or_path=random_adapter,
                       export_dir=str(tmp_path / "q_out"))
    assert main(["export", cfg]) == 2
    err = _one_line_error(capsys)
    assert "quantized (bitsandbytes)" in err and not (tmp_path / "q_out").exists()

    assert main(["export", cfg, "export_size=0"]) == 2
    assert "export_size" in capsys.readouterr().err


def test_overwrite_replaces_old_shards(tiny_model_dir, random_adapter, tmp_path):
    out = tmp_path / "merged"
    cfg = write_config(tmp_path / "export.yaml", model_name_or_path=tiny_model_dir, adapter_name_or_path=random_adapter,
                       export_dir=str(out), export_size=0.0001)
    assert main(["export", cfg]) == 0
    assert main(["export", cfg, "export_size=5", "export_overwrite=true"]) == 0
    assert sorted(p.name for p in out.glob("*.safetensors*")) == ["model.safetensors"]
