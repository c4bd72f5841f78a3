"""The real command line, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def prefalign(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "prefalign", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    """The README's quickstart: builds the demo model, trains, and beats chance clearly on held-out pairs."""
    out = tmp_path / "quickstart"
    run = prefalign("train", "examples/quickstart.yaml", f"model_name_or_path={tmp_path / 'demo-model'}",
                    f"output_dir={out}", env={"PREFALIGN_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"The aligned model and its results are in {out}" in run.stdout
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_rewards/accuracies"] >= 0.8
    assert json.loads((out / "eval_results.json").read_text())["eval_rewards/accuracies"] >= 0.8
    assert (out / "model.safetensors").is_file() and (out / "training_loss.png").is_file()


def test_config_errors_are_one_line_each_without_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("stage: dpo\nmodel_name_or_path: m\ndataset: d\npref_loss: sigmod\nlora_rnak: 8\n")
    run = prefalign("train", str(config), "pref_beta=-1")
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "did you mean 'sigmoid'" in run.stderr and "did you mean 'lora_rank'" in run.stderr
    assert "pref_beta" in run.stderr


def test_packing_length_without_packing_is_a_one_line_error(tmp_path):
    run = prefalign("train", "examples/quickstart.yaml", "packing=false", "packing_length=512",
                    f"output_dir={tmp_path / 'out'}")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "packing_length is set but packing is off; set packing: true" in run.stderr


def test_evaluations_without_held_out_pairs_are_a_one_line_error(tmp_path):
    """lora_dpo.yaml evaluates every 50 steps; with val_size 0 nothing is held out. transformers' Trainer
    raises a ValueError for that at its construction, after the model and data are loaded; prefalign says so
    before loading anything, naming the keys. Holding pairs out another way, or no evaluations, is valid."""
    from prefalign.config import load_config
    from prefalign.errors import ConfigError

    message = ("eval_strategy: steps evaluates held-out pairs, and this config holds none out: set val_size "
               "(e.g. 0.1) or eval_dataset, or eval_strategy: no")
    run = prefalign("train", "examples/lora_dpo.yaml", "val_size=0", f"output_dir={tmp_path / 'out'}")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert [line for line in run.stderr.splitlines() if message in line]
    assert not (tmp_path / "out").exists()
    for keys in (["eval_strategy=no"], ["eval_dataset=demo_eval"]):
        config = load_config(ROOT / "examples" / "lora_dpo.yaml", ["val_size=0", *keys, f"output_dir={tmp_path / 'ok'}"])
        assert config.data.val_size == 0
    with pytest.raises(ConfigError, match="eval_strategy: steps evaluates held-out pairs"):
        load_config(ROOT / "examples" / "lora_dpo.yaml", ["val_size=0", f"output_dir={tmp_path / 'ok'}"])


def test_missing_model_is_a_clean_error(tmp_path):
    run = prefalign("train", "examples/quickstart.yaml", f"model_name_or_path={tmp_path / 'nothing'}",
                    "build_demo_model=false", f"output_dir={tmp_path / 'out'}",
                    env={"HF_HUB_OFFLINE": "1", "PREFALIGN_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "nothing" in run.stderr


# What a run prints and imports for the optional engines it does not use.
ENGINE_NOISE = ("Failed to load CPU gemm_4bit_forward", "Setting accelerator to CPU")


def test_a_run_without_deepspeed_or_quantization_imports_neither_and_prints_none_of_their_lines(
        tiny_model_dir, tmp_path):
    """The quickstart on the tiny model: peft would import bitsandbytes and accelerate deepspeed, both installed."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("bitsandbytes")
    report = ("import sys; from prefalign.cli import main; code = main(); "
              "print('IMPORTED', sorted(m for m in ('deepspeed', 'bitsandbytes') if sys.modules.get(m))); "
              "sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", report, "train", "examples/quickstart.yaml",
                          f"model_name_or_path={tiny_model_dir}", "build_demo_model=false",
                          f"output_dir={tmp_path / 'run'}", "max_samples=16", "max_steps=2", "eval_dataset="],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "IMPORTED []" in run.stdout
    for line in ENGINE_NOISE:
        assert line not in run.stdout + run.stderr, line


def test_the_engines_a_config_uses():
    """Hand-made configs: what each needs of bitsandbytes and deepspeed (an unknown model may be pre-quantized)."""
    from prefalign.config.scale import engines_used

    plain = {"model_name_or_path": "models/demo", "build_demo_model": True}
    assert engines_used(plain) == set()
    assert engines_used({**plain, "deepspeed": "examples/deepspeed/ds_z3_config.json"}) == {"deepspeed"}
    assert engines_used({**plain, "quantization_bit": 4}) == {"bitsandbytes"}
    assert engines_used({**plain, "optim": "paged_adamw_8bit"}) == {"bitsandbytes"}
    assert engines_used({"model_name_or_path": "Qwen/Qwen2.5-0.5B"}) == {"bitsandbytes"}  # a hub id: unknown
    # an LF optimizer key needs its package (hidden, `prefalign train` with use_badam said it was not installed)
    # (and galore_torch / apollo_torch import bitsandbytes for their 8-bit AdamW)
    for key, packages in (("use_galore", {"galore_torch", "bitsandbytes"}),
                          ("use_apollo", {"apollo_torch", "bitsandbytes"}),
                          ("use_adam_mini", {"adam_mini"}), ("use_badam", {"badam"})):
        assert engines_used({**plain, key: True}) == packages, key
    assert engines_used({**plain, "use_muon": True, "use_badam": False}) == set()  # torch's own Muon


def test_a_local_model_counts_as_quantized_by_its_config(tmp_path):
    from prefalign.config.scale import engines_used

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert engines_used({"model_name_or_path": str(tmp_path)}) == set()
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes"}}))
    assert engines_used({"model_name_or_path": str(tmp_path)}) == {"bitsandbytes"}
