"""Every LLaMA-Factory key has an answer: the table against LF's own defaults (a shipped copy, extracted
from LF 0.9.5's source by scripts/lf_defaults.py), a config of every key at LF's default trains what
the config without them trains, and a key asking for what prefalign lacks is one line naming it."""

import json
import os
import subprocess
import sys

import pytest
from helpers import EXAMPLES, ROOT

from prefalign.config import build_config
from prefalign.config.lf_keys import LF_KEYS, Answer
from prefalign.errors import ConfigError

FIXTURE = ROOT / "tests" / "fixtures" / "llamafactory" / "lf_defaults.json"
BASE = {"model_name_or_path": "m", "dataset": "d", "output_dir": "out", "stage": "dpo"}


def lf_defaults() -> dict:
    """Every key of LF's argument dataclasses with LF's default (first definition wins, as in LF's MRO)."""
    flat = {}
    for fields in json.loads(FIXTURE.read_text())["classes"].values():
        for key, value in fields.items():
            flat.setdefault(key, value)
    return flat


def test_the_fixture_is_lfs_full_key_set():
    """The shipped copy holds all of LF 0.9.5's config keys (spot checks from LF's hparams/*.py)."""
    data = json.loads(FIXTURE.read_text())
    assert data["release"] == "0.9.5"
    flat = lf_defaults()
    assert len(flat) > 220
    assert flat["galore_rank"] == 16 and flat["swanlab_project"] == "llamafactory"
    assert flat["flash_attn"] == "auto" and flat["image_max_pixels"] == 768 * 768  # enum value; arithmetic done
    assert flat["stage"] == "sft" and flat["packing"] is None and flat["enable_thinking"] is True
    assert "compute_dtype" not in flat  # init=False: LF sets it itself, no config carries it


def test_every_lf_key_is_in_the_table_with_lfs_default():
    flat = lf_defaults()
    assert sorted(set(flat) - set(LF_KEYS)) == []
    wrong = {k: (v, LF_KEYS[k].default) for k, v in flat.items() if LF_KEYS[k].default != v}
    assert wrong == {}


def test_implemented_keys_are_prefalign_or_transformers_keys():
    """An implemented key is read by a group or by the training arguments (else it would be 'unknown')."""
    import dataclasses

    from transformers import Seq2SeqTrainingArguments

    from prefalign.config.loader import _GROUPS

    known = {f.name for cls in _GROUPS for f in dataclasses.fields(cls)}
    known |= {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}
    missing = [key for key, entry in LF_KEYS.items() if entry.answer is Answer.IMPLEMENTED
               and (entry.rename[0] if entry.rename else key) not in known]
    assert missing == []


def test_lfs_full_key_set_at_lfs_defaults_resolves_to_the_config_without_it():
    """The web-UI shape (every key written out at LF's default) is the same run as the keys alone."""
    without = build_config(dict(BASE))
    with_all = build_config({**lf_defaults(), **BASE})
    assert with_all.raw == without.raw
    assert with_all.training.to_dict() == without.training.to_dict()


def test_lfs_full_key_set_at_lfs_defaults_trains_the_same_losses(tiny_model_dir, tmp_path):
    from prefalign.train.workflow import run_train

    run = {"model_name_or_path": str(tiny_model_dir), "stage": "dpo", "dataset": "demo_train",
           "dataset_dir": str(EXAMPLES / "data"), "max_samples": 8, "cutoff_len": 64,
           "per_device_train_batch_size": 2, "max_steps": 3, "learning_rate": 1e-3, "logging_steps": 1,
           "save_strategy": "no", "overwrite_output_dir": True, "seed": 0, "disable_tqdm": True}
    losses = []
    for name, values in (("keys", run), ("all", {**lf_defaults(), **run})):
        out = tmp_path / name
        run_train(build_config({**values, "output_dir": str(out)}))
        state = json.loads((out / "trainer_state.json").read_text())
        losses.append([h["loss"] for h in state["log_history"] if "loss" in h])
    assert len(losses[0]) == 3
    assert losses[1] == losses[0]  # identical, not close


@pytest.mark.parametrize("key, value, words", [
    ("shift_attn", True, "shift_attn: shift short attention (LongLoRA) is a LLaMA-Factory feature prefalign does not "
                         "support yet"),
    ("mixture_of_depths", "convert", "mixture_of_depths: mixture of depths is a LLaMA-Factory feature"),
    ("swanlab_lark_webhook_url", "https://x", "swanlab_lark_webhook_url: SwanLab's Lark notifications is a LLaMA-Factory"),
    ("image_do_pan_and_scan", True, "image_do_pan_and_scan: Gemma 3's pan-and-scan crops is a LLaMA-Factory"),
    ("ppo_epochs", 2, "ppo_epochs: only LLaMA-Factory's ppo stage reads it, and prefalign runs stage: dpo"),
    ("reward_model", "rm", "reward_model: only LLaMA-Factory's ppo (its reward model) stage reads it"),
    ("train_on_prompt", True, "train_on_prompt: only LLaMA-Factory's sft stage reads it"),
    # LF 0.9.5 (hparams/parser.py): "`train_on_prompt` or `mask_history` cannot be set as True except SFT"
    ("mask_history", True, "mask_history: only LLaMA-Factory's sft stage reads it"),
])
def test_a_key_off_lfs_default_gets_the_tables_answer(key, value, words):
    with pytest.raises(ConfigError) as info:
        build_config({**BASE, key: value})
    [line] = info.value.problems
    assert line.startswith(words), line
    default = LF_KEYS[key].default
    assert line.endswith(f"remove the key (or set it to LLaMA-Factory's default, "
                         f"{'null' if default is None else str(default).lower()})")


def test_the_same_keys_at_lfs_default_are_accepted_in_any_spelling():
    """2 is 2.0, "false" is false: a default written as a string or an integer is still the default."""
    config = build_config({**BASE, "rope_scaling": None, "galore_scale": 2, "shift_attn": "false",
                           "ppo_epochs": 4.0, "kto_rejected_weight": 1, "swanlab_project": "llamafactory"})
    assert config.raw == build_config(dict(BASE)).raw


def test_lf_defaults_that_used_to_conflict_turn_nothing_on():
    config = build_config({**BASE, "packing": None, "neat_packing": False, "template": "qwen3_nothink",
                           "enable_thinking": True, "disable_gradient_checkpointing": False})
    assert config.finetuning.packing is None and config.data.enable_thinking is None  # prefalign's own default
    assert config.training.gradient_checkpointing is False
    assert build_config({**BASE, "neat_packing": True}).finetuning.packing is True


def test_did_you_mean_is_for_typos_only():
    with pytest.raises(ConfigError) as info:
        build_config({**BASE, "apollo_rnak": 16, "train_on_promt": False})
    assert info.value.problems == ["unknown key 'apollo_rnak'; did you mean 'apollo_rank'?",
                                   "unknown key 'train_on_promt'; did you mean 'train_on_prompt'?"]


def test_a_no_effect_key_is_accepted_and_logged(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="prefalign.config.loader"):
        build_config({**BASE, "vllm_maxlen": 8192})
    assert "vllm_maxlen is accepted and has no effect here (chat generates with transformers' generate" in caplog.text


def test_the_cli_refuses_an_lf_feature_in_one_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model_name_or_path: m\ndataset: d\nstage: dpo\nshift_attn: true\n")
    run = subprocess.run([sys.executable, "-m", "prefalign", "train", str(config)], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=300)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert ("shift_attn: shift short attention (LongLoRA) is a LLaMA-Factory feature prefalign does not support yet; "
            "remove the key (or set it to LLaMA-Factory's default, false)") in run.stderr


def test_readme_lf_key_table_is_current():
    sys.path.insert(0, str(ROOT / "scripts"))
    from lf_table import table

    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- lf-keys:start -->\n")[1].split("\n<!-- lf-keys:end -->")[0]
    assert section.strip() == table().strip(), "run: python scripts/lf_table.py and paste into README.md"


def test_streaming_needs_max_steps_as_in_llama_factory():
    """LF 0.9.5 (hparams/parser.py): "Please specify `max_steps` in streaming mode"."""
    with pytest.raises(ConfigError) as info:
        build_config({**BASE, "streaming": True})
    assert info.value.problems == ["streaming: true reads the training pairs as a stream with no length, so the run "
                                   "needs max_steps (as in LLaMA-Factory); set max_steps"]
    assert build_config({**BASE, "streaming": True, "max_steps": 10, "buffer_size": 4}).data.buffer_size == 4
