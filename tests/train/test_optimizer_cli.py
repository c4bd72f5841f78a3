"""The optimizer keys' refusals as a user meets them: `python -m prefalign train` in a subprocess, one line
naming the key, a non-zero exit and no traceback. BAdam and layer-wise GaLore / APOLLO keep state a checkpoint
misses (no resume), step before any all-reduce or need whole weights (one process), and layer-wise steps run
inside the backward (no accumulation); BAdam trains full weights (no LoRA)."""

import json
import os
import subprocess
import sys

import pytest
from helpers import EXAMPLES

from prefalign.config import build_config
from prefalign.train.workflow import run_train

pytestmark = pytest.mark.slow

GALORE = dict(use_galore=True, galore_layerwise=True, galore_target="q_proj,v_proj", galore_rank=4)
APOLLO = dict(use_apollo=True, apollo_layerwise=True, apollo_target="q_proj,v_proj", apollo_rank=4)
BADAM = dict(use_badam=True, badam_mode="layer", badam_switch_interval=2)


def _values(model_dir, out, **keys):
    return {"model_name_or_path": str(model_dir), "stage": "dpo", "finetuning_type": "full",
            "dataset": "demo_train", "dataset_dir": str(EXAMPLES / "data"), "max_samples": 8, "cutoff_len": 96,
            "output_dir": str(out), "per_device_train_batch_size": 2, "max_steps": 2, "optim": "adamw_torch",
            "save_strategy": "no", "report_to": "none", "overwrite_output_dir": True, "seed": 0,
            "disable_tqdm": True, **keys}


def _train(tmp_path, values, *extra) -> subprocess.CompletedProcess:
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(values))  # YAML reads JSON
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "prefalign", "train", str(config), *extra], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def _refused(run: subprocess.CompletedProcess) -> str:
    """The one error line of a refused run (every process prints the same one)."""
    assert run.returncode != 0, run.stdout[-2000:]
    assert "Traceback" not in run.stderr, run.stderr[-4000:]
    lines = {line for line in run.stderr.splitlines() if line.startswith("prefalign train: error: ")}
    assert len(lines) == 1, run.stderr[-4000:]
    return lines.pop()


@pytest.mark.parametrize("keys, words", [
    ({**BADAM, "finetuning_type": "lora"}, "use_badam with finetuning_type: lora: BAdam trains blocks of the full "),
    ({**GALORE, "gradient_accumulation_steps": 2},
     "galore_layerwise with gradient_accumulation_steps: 2: each parameter steps as soon as its gradient is ready"),
    ({**APOLLO, "gradient_accumulation_steps": 4},
     "apollo_layerwise with gradient_accumulation_steps: 4: each parameter steps as soon as its gradient is ready"),
], ids=["badam-lora", "galore_layerwise-accumulation", "apollo_layerwise-accumulation"])
def test_a_refused_optimizer_setting_is_one_line_naming_the_key(keys, words, tiny_model_dir, tmp_path):
    line = _refused(_train(tmp_path, _values(tiny_model_dir, tmp_path / "out", **keys)))
    assert line.startswith("prefalign train: error: " + words), line
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory):
    """A complete checkpoint of a plain AdamW run (1 step, saved at step 1)."""
    out = tmp_path_factory.mktemp("plain") / "out"
    run_train(build_config(_values(tiny_model_dir, out, max_steps=1, save_strategy="steps", save_steps=1)))
    assert (out / "checkpoint-1").is_dir()
    return out / "checkpoint-1"


@pytest.mark.parametrize("keys, words", [
    (BADAM, "use_badam: {ckpt} would be resumed, but BAdam's block position is not checkpointed"),
    (GALORE, "galore_layerwise: {ckpt} would be resumed, but the per-parameter GaLore state is not checkpointed"),
    (APOLLO, "apollo_layerwise: {ckpt} would be resumed, but the per-parameter APOLLO state is not checkpointed"),
], ids=["badam", "galore_layerwise", "apollo_layerwise"])
def test_resuming_an_optimizer_whose_state_no_checkpoint_keeps_is_refused(keys, words, checkpoint, tiny_model_dir,
                                                                           tmp_path):
    pytest.importorskip({"use_badam": "badam", "use_galore": "galore_torch", "use_apollo": "apollo_torch"}[
        next(iter(keys))])
    values = _values(tiny_model_dir, tmp_path / "out", resume_from_checkpoint=str(checkpoint), **keys)
    line = _refused(_train(tmp_path, values))
    assert line.startswith("prefalign train: error: " + words.format(ckpt=checkpoint)), line
    assert not (tmp_path / "out" / "checkpoint-2").exists()


@pytest.mark.parametrize("keys, words", [
    (BADAM, "use_badam with 2 processes: prefalign runs BAdam in one process only (LLaMA-Factory spreads "
            "layer-mode BAdam only under DeepSpeed ZeRO-3"),
    (GALORE, "galore_layerwise with 2 processes: the per-parameter steps run before the gradients are averaged"),
    (APOLLO, "apollo_layerwise with 2 processes: the per-parameter steps run before the gradients are averaged"),
], ids=["badam", "galore_layerwise", "apollo_layerwise"])
def test_an_optimizer_that_steps_in_one_process_is_refused_in_two(keys, words, tiny_model_dir, tmp_path):
    """`--nproc 2` (torchrun, gloo): the refusal is decided in each process once it knows the world size; the
    launcher exits non-zero and the one line names the key."""
    pytest.importorskip({"use_badam": "badam", "use_galore": "galore_torch", "use_apollo": "apollo_torch"}[
        next(iter(keys))])
    line = _refused(_train(tmp_path, _values(tiny_model_dir, tmp_path / "out", **keys), "--nproc", "2"))
    assert line.startswith("prefalign train: error: " + words), line
    assert not list((tmp_path / "out").glob("*.safetensors"))  # nothing trained, nothing saved
