"""End-to-end training on a tiny model: the loss at step 0, what changes and what must not, outputs."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import StopAfter, config_for, first_batch
from transformers import AutoModelForCausalLM

from prefalign.train.workflow import build_trainer, run_train







@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_step0_loss_is_ln2_when_policy_equals_reference(tiny_model_dir, tmp_path, finetuning_type):
    """At step 0 the policy is the reference, so Δ = 0 and −log σ(0) = ln 2 = 0.693147 for every pair."""
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, finetuning_type=finetuning_type))
    loss, out, _ = trainer.batch_loss(trainer.model, first_batch(trainer))
    assert torch.allclose(out.losses, torch.full_like(out.losses, math.log(2)), atol=1e-6)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def _snapshot(params):
    return {n: p.detach().clone() for n, p in params}


def test_lora_changes_the_adapter_and_never_the_reference(tiny_model_dir, tmp_path):
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path))
    model = trainer.model
    batch = first_batch(trainer)
    ref_before = trainer.reference.logps(batch)
    base_before = _snapshot((n, p) for n, p in model.named_parameters() if "lora_" not in n)
    lora_before = _snapshot((n, p) for n, p in model.named_parameters() if "lora_" in n)
    trainer.train()
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        assert not param.requires_grad and param.grad is None, name
        assert torch.equal(param, base_before[name]), f"reference weight {name} changed"
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_" in n)
    ref_after = trainer.reference.logps(batch)
    assert torch.equal(ref_before.chosen, ref_after.chosen) and torch.equal(ref_before.rejected, ref_after.rejected)
    policy_after = trainer.batch_loss(model, batch)[2]
    assert not torch.allclose(policy_after.chosen, ref_after.chosen)


def test_full_changes_the_policy_and_never_the_frozen_copy(tiny_model_dir, tmp_path):
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, finetuning_type="full"))
    ref_model = trainer.reference.model
    assert ref_model is not trainer.model
    before = _snapshot(trainer.model.named_parameters())
    ref_before = _snapshot(ref_model.named_parameters())
    trainer.train()
    for name, param in ref_model.named_parameters():
        assert not param.requires_grad and param.grad is None
        assert torch.equal(param, ref_before[name])
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > len(before) // 2


def test_freeze_trains_only_the_last_layers(tiny_model_dir, tmp_path):
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, finetuning_type="freeze", freeze_trainable_layers=1))
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    num_layers = trainer.model.config.num_hidden_layers
    assert trainable and all(f"layers.{num_layers - 1}." in n for n in trainable)


def test_lora_output_loads_back_with_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel

    config = config_for(tiny_model_dir, tmp_path / "out", plot_loss=True, val_size=4)
    metrics = run_train(config)
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "tokenizer_config.json").is_file() and (out / "run_config.yaml").is_file()
    results = json.loads((out / "all_results.json").read_text())
    assert "eval_rewards/accuracies" in results and "train_loss" in results
    assert "eval_rewards/accuracies" in metrics
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "loss" in h]
    assert logged and all(k in logged[0] for k in ("rewards/chosen", "rewards/margins", "logps/rejected"))
    assert (out / "training_loss.png").is_file()
    assert json.loads((out / "data_summary.json").read_text())["datasets"]["demo_train"] == 16

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, out)
    from safetensors.torch import load_file
    saved = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # trained: lora_B starts at zero
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with loaded.disable_adapter():
        base_logits = loaded(input_ids=ids).logits
    assert not torch.allclose(loaded(input_ids=ids).logits, base_logits)


def test_full_output_loads_back_with_transformers(tiny_model_dir, tmp_path):
    out = tmp_path / "full"
    run_train(config_for(tiny_model_dir, out, finetuning_type="full"))
    assert (out / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    diff = [n for n, p in loaded.named_parameters() if not torch.equal(p, dict(original.named_parameters())[n])]
    assert diff


def test_output_dir_with_a_finished_run_is_refused(tiny_model_dir, tmp_path):
    from prefalign.errors import ConfigError

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "all_results.json").write_text("{}")
    with pytest.raises(ConfigError, match="overwrite_output_dir"):
        run_train(config_for(tiny_model_dir, tmp_path / "old", overwrite_output_dir=False))


def _losses(out_dir):
    state = json.loads((Path(out_dir) / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def test_batch8_equals_batch1_times_accumulation8(tiny_model_dir, tmp_path):
    """One SGD step on 8 pairs gives the same weights whether they come as 1 batch or 8 accumulated."""
    common = dict(finetuning_type="full", max_steps=1, optim="sgd", learning_rate=0.5, warmup_steps=0,
                  lr_scheduler_type="constant", max_samples=8, train_sampling_strategy="sequential")
    a = build_trainer(config_for(tiny_model_dir, tmp_path / "a", per_device_train_batch_size=8,
                                 gradient_accumulation_steps=1, **common))
    a.train()
    b = build_trainer(config_for(tiny_model_dir, tmp_path / "b", per_device_train_batch_size=1,
                                 gradient_accumulation_steps=8, **common))
    b.train()
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for (name, pa), pb, p0 in zip(a.model.named_parameters(), b.model.parameters(), start.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name
    assert any(not torch.allclose(pa, p0) for pa, p0 in zip(a.model.parameters(), start.parameters()))
    # the logged loss and metrics are means over all 8 pairs in both layouts
    for key in ("loss", "logps/chosen", "logps/rejected", "logits/chosen"):
        logged = [[h[key] for h in t.state.log_history if "loss" in h] for t in (a, b)]
        assert logged[0] == pytest.approx(logged[1], rel=1e-5), key


def test_resumed_run_equals_uninterrupted(tiny_model_dir, tmp_path):
    """Stopped after step 2 and resumed from its checkpoint, a run logs the same losses as one that never stopped."""
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, max_samples=16, overwrite_output_dir=False)
    run_train(config_for(tiny_model_dir, tmp_path / "whole", **common))

    interrupted = tmp_path / "resumed"
    trainer = build_trainer(config_for(tiny_model_dir, interrupted, **common))
    trainer.add_callback(StopAfter(2))
    trainer.train()
    assert (interrupted / "checkpoint-2").is_dir() and not (interrupted / "checkpoint-4").exists()
    run_train(config_for(tiny_model_dir, interrupted, **common))  # finds checkpoint-2 and resumes
    whole, resumed = _losses(tmp_path / "whole"), _losses(interrupted)
    assert sorted(resumed) == [1, 2, 3, 4] or sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(whole[step], abs=1e-6)


def _eval_results(out: Path) -> dict:
    results = json.loads((out / "eval_results.json").read_text())
    return {k: v for k, v in results.items() if not k.endswith(("_runtime", "_per_second")) and k != "epoch"}


def test_eval_on_each_dataset_gives_each_eval_set_the_metrics_it_has_alone(tiny_model_dir, tmp_path):
    """LF's eval_on_each_dataset is transformers' dict of eval datasets: `eval_<name>_<metric>` per set.
    Training reads no eval data, so the same seed trains the same model in all three runs, and each
    set's family must equal the plain `eval_*` metrics of a run that evaluates that set alone."""
    def run(name, eval_dataset, **keys):
        out = tmp_path / name
        run_train(config_for(tiny_model_dir, out, eval_dataset=eval_dataset, max_steps=2, max_samples=8, **keys))
        return _eval_results(out)

    both = run("both", "demo_eval,demo_train", eval_on_each_dataset=True)
    for name in ("demo_eval", "demo_train"):
        alone = run(name, name)
        assert {"eval_loss", "eval_rewards/accuracies", "eval_logps/chosen"} <= set(alone)
        family = {"eval_" + k[len(f"eval_{name}_"):]: v for k, v in both.items() if k.startswith(f"eval_{name}_")}
        assert family == pytest.approx(alone, rel=1e-6)
    assert not any(k.startswith("eval_") and not k.startswith(("eval_demo_eval_", "eval_demo_train_")) for k in both)
    assert both["eval_demo_eval_loss"] != both["eval_demo_train_loss"]


def test_streaming_with_a_one_pair_buffer_trains_what_sequential_order_trains(tiny_model_dir, tmp_path):
    """LF streams through datasets' IterableDataset.shuffle(buffer_size, seed); a buffer of one pair
    yields the pairs in the data's own order, which is what `disable_shuffling: true` trains (LF's
    sequential sampler). 16 pairs, batch 4, 6 steps: the stream wraps into a second pass too."""
    common = dict(max_steps=6, logging_steps=1)
    run_train(config_for(tiny_model_dir, tmp_path / "seq", disable_shuffling=True, **common))
    run_train(config_for(tiny_model_dir, tmp_path / "stream", streaming=True, buffer_size=1, **common))
    run_train(config_for(tiny_model_dir, tmp_path / "random", **common))
    sequential, streamed = _losses(tmp_path / "seq"), _losses(tmp_path / "stream")
    assert len(sequential) == 6
    assert streamed == pytest.approx(sequential, rel=1e-6)
    assert _losses(tmp_path / "random") != pytest.approx(sequential, rel=1e-6)  # the order shows in the losses


def test_streamed_packed_batches_train_the_losses_of_the_plain_layout(tiny_model_dir, tmp_path):
    """`prefalign train` with streaming: true takes the default layout (packed, prompts shared) and trains
    the losses of the plain layout, 5 steps of 4 pairs. accelerate dispatches a stream's batches by
    default, slicing every tensor to the first one's rows: that cut a packed batch's spans to the first
    sequence, and the losses parted from step 2 on (packing alone: 0.69180 against 0.69191)."""
    import subprocess
    import sys

    import yaml
    from helpers import EXAMPLES, PLAIN, ROOT

    def train(name, **keys):
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "model_name_or_path": str(tiny_model_dir), "stage": "dpo", "dataset": "demo_train",
            "dataset_dir": str(EXAMPLES / "data"), "max_samples": 16, "cutoff_len": 96, "max_steps": 5,
            "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no",
            "report_to": "none", "output_dir": str(tmp_path / name), "streaming": True, "buffer_size": 1, **keys}))
        run = subprocess.run([sys.executable, "-m", "prefalign", "train", str(config)], capture_output=True,
                             text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stderr + run.stdout

    assert "Batch layout: packing + prefix sharing" in train("packed")
    assert "Batch layout: plain" in train("plain", **PLAIN)
    packed, plain = _losses(tmp_path / "packed"), _losses(tmp_path / "plain")
    assert len(plain) == 5 and plain[5] != pytest.approx(plain[1], rel=1e-3)  # it trained
    assert packed == pytest.approx(plain, rel=1e-5)


def test_use_swanlab_logs_the_run_through_transformers_swanlab_integration(tiny_model_dir, tmp_path):
    """LF's swanlab_* keys as transformers' SwanLabCallback reads them (SWANLAB_MODE, SWANLAB_LOG_DIR, run_name):
    an offline run writes swanlab's run folder under swanlab_logdir, with the run's training arguments."""
    import os
    import subprocess
    import sys

    import yaml
    from helpers import EXAMPLES, ROOT

    pytest.importorskip("swanlab", reason="the swanlab extra is not installed")
    logdir = tmp_path / "swanlog"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_model_dir), "stage": "dpo", "dataset": "demo_train",
        "dataset_dir": str(EXAMPLES / "data"), "max_samples": 8, "cutoff_len": 64, "max_steps": 2,
        "per_device_train_batch_size": 4, "learning_rate": 0.000123, "save_strategy": "no", "report_to": "none",
        "output_dir": str(tmp_path / "out"), "use_swanlab": True, "swanlab_mode": "offline",
        "swanlab_logdir": str(logdir), "swanlab_run_name": "my-dpo-run", "swanlab_project": "proj"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWANLAB_")}
    run = subprocess.run([sys.executable, "-m", "prefalign", "train", str(config)], capture_output=True, text=True,
                         cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT / "src")}, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    [run_dir] = [p for p in logdir.iterdir() if p.is_dir() and p.name.startswith("run-")]
    assert list(run_dir.glob("*.swanlab"))
    logged = yaml.safe_load((run_dir / "files" / "config.yaml").read_text())
    text = json.dumps(logged)
    assert "0.000123" in text and "my-dpo-run" in text
