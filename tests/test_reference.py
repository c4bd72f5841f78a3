"""Reference strategies, each against the model it stands for, and the precomputed reference cache."""

import math
import threading
from pathlib import Path

import helpers
import pytest
import torch
from helpers import first_batch
from transformers import AutoModelForCausalLM

from prefalign import reference_cache
from prefalign.data.collate import PairCollator
from prefalign.modeling.logprobs import pair_logps
from prefalign.reference_cache import (
    PrecomputedReference,
    ReferenceTable,
    compute_part,
    precompute_split,
    weights_fingerprint,
    write_part,
)
from prefalign.scoring import reference_plan
from prefalign.train.workflow import build_trainer, run_train

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test gets its own cache (encoded data and reference log-probs)."""
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))


def config_for(model_dir, out, **overrides):
    return helpers.config_for(model_dir, out, **{"max_steps": 2, **overrides})




@torch.no_grad()
def logps_of(model, batch):
    model.eval()
    return pair_logps(model, batch)


def assert_same_logps(a, b, atol=1e-5):
    assert torch.allclose(a.chosen, b.chosen, atol=atol) and torch.allclose(a.rejected, b.rejected, atol=atol)


def make_adapter(model_dir, path, seed=1):
    """A LoRA adapter on q/v with random, non-zero lora_A and lora_B (as if trained by SFT), saved with peft."""
    return helpers.make_random_adapter(model_dir, path, seed=seed, target_modules=["q_proj", "v_proj"], b_std=0.5)


def with_adapter(model_dir, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)


# -- live strategies ----------------------------------------------------------------------------------
def test_adapter_disabled_reference_is_the_bare_base(tiny_model_dir, tmp_path):
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path))
    assert trainer.reference.name == "adapter-disabled"
    with torch.no_grad():  # make the policy differ from the base
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    batch = first_batch(trainer)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert_same_logps(trainer.reference.logps(batch), logps_of(base, batch))
    assert not torch.allclose(logps_of(trainer.model, batch).chosen, logps_of(base, batch).chosen)


def test_sft_adapter_reference_is_base_plus_sft_adapter(tiny_model_dir, tmp_path):
    """From an SFT adapter: reference = base + SFT adapter (not the bare base), policy starts there,
    so the step-0 loss is ln 2; the saved adapter loads with peft on the bare base."""
    from peft import PeftModel

    sft = make_adapter(tiny_model_dir, tmp_path / "sft")
    config = config_for(tiny_model_dir, tmp_path / "out", adapter_name_or_path=sft)
    trainer = build_trainer(config)
    assert trainer.reference.name == "sft-adapter"
    batch = first_batch(trainer)
    expected = logps_of(with_adapter(tiny_model_dir, sft), batch)
    bare = logps_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch)
    reference = trainer.reference.logps(batch)
    assert_same_logps(reference, expected)
    assert not torch.allclose(reference.chosen, bare.chosen, atol=1e-3)
    _, out, _ = trainer.batch_loss(trainer.model, batch)
    assert torch.allclose(out.losses, torch.full_like(out.losses, math.log(2)), atol=1e-6)

    run_train(config)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "out")
    assert list(trained.peft_config) == ["default"]
    after = logps_of(trained, batch)
    assert not torch.allclose(after.chosen, expected.chosen, atol=1e-4)  # trained away from the SFT adapter
    assert not torch.allclose(after.chosen, bare.chosen, atol=1e-3)  # and it is an adapter on the base


def test_create_new_adapter_reference_is_base_plus_the_merged_sft_adapter(tiny_model_dir, tmp_path):
    """What the plan (and so the model card) says is what the run computes: base + SFT adapter, not the bare base."""
    sft = make_adapter(tiny_model_dir, tmp_path / "sft")
    config = config_for(tiny_model_dir, tmp_path / "out", adapter_name_or_path=sft, create_new_adapter=True)
    trainer = build_trainer(config)
    plan = reference_plan(config, "train")
    assert trainer.reference.name == plan.strategy == "adapter-disabled"
    assert f"`{sft}`" in plan.description and "merged" in plan.description
    batch = first_batch(trainer)
    reference = trainer.reference.logps(batch)
    assert_same_logps(reference, logps_of(with_adapter(tiny_model_dir, sft), batch))
    bare = logps_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch)
    assert not torch.allclose(reference.chosen, bare.chosen, atol=1e-3)


def test_separate_model_reference_is_that_model(tiny_model_dir, tmp_path):
    from prefalign.demo import build_tiny_model, demo_texts

    other = build_tiny_model(tmp_path / "other", texts=demo_texts(EXAMPLES / "data"), hidden_size=32, seed=7)
    adapter = make_adapter(other, tmp_path / "other-adapter")
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path / "out", ref_model=other,
                                       ref_model_adapters=adapter))
    assert trainer.reference.name == "separate-model"
    batch = first_batch(trainer)
    expected = logps_of(with_adapter(other, adapter).merge_and_unload(), batch)
    assert_same_logps(trainer.reference.logps(batch), expected)
    assert not torch.allclose(expected.chosen, logps_of(trainer.model, batch).chosen, atol=1e-3)


def test_reference_free_loss_loads_and_runs_no_reference(tiny_model_dir, tmp_path):
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, pref_loss="simpo"))
    assert trainer.reference.model is None and trainer.reference.logps(first_batch(trainer)) is None


def _reference_params(trainer):
    ref = trainer.reference
    if ref.name in ("frozen-copy", "separate-model"):
        return list(ref.model.named_parameters())
    return ref.named_weights()  # LoRA: the base (and the frozen SFT copy)


@pytest.mark.parametrize("setup", ["lora", "full", "sft-adapter", "separate-model"])
def test_reference_params_never_get_gradients(tiny_model_dir, tmp_path, setup):
    overrides = {"full": {"finetuning_type": "full"},
                 "separate-model": {"finetuning_type": "full", "ref_model": str(tiny_model_dir)}}.get(setup, {})
    if setup == "sft-adapter":
        overrides = {"adapter_name_or_path": make_adapter(tiny_model_dir, tmp_path / "sft")}
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path / "out", **overrides))
    params = _reference_params(trainer)
    assert params
    before = {n: p.detach().clone() for n, p in params}
    trainer.train()
    for name, param in params:
        assert not param.requires_grad and param.grad is None, name
        assert torch.equal(param, before[name]), name
    if setup == "sft-adapter":
        assert any(".reference." in n for n, _ in params)


# -- precomputed reference log-probs ----------------------------------------------------------------------
def _logged(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_precompute_gives_the_live_losses_and_frees_the_reference(tiny_model_dir, tmp_path, finetuning_type):
    runs = {}
    for precompute in (False, True):
        config = config_for(tiny_model_dir, tmp_path / str(precompute), finetuning_type=finetuning_type,
                            precompute_ref_log_probs=precompute, val_size=4, max_steps=2)
        trainer = build_trainer(config)
        trainer.train()
        runs[precompute] = (trainer, _logged(trainer), trainer.evaluate())
    trainer = runs[True][0]
    assert isinstance(trainer.reference, PrecomputedReference)
    assert trainer.reference.name == f"precomputed ({'adapter-disabled' if finetuning_type == 'lora' else 'frozen-copy'})"
    assert set(trainer.reference.tables) == {"train", "eval"}
    if finetuning_type == "full":  # no frozen copy was ever made: nothing but the policy holds weights
        assert not any(isinstance(v, torch.nn.Module) for v in vars(trainer.reference).values())
    live, cached = runs[False][1], runs[True][1]
    assert len(live) == len(cached) == 2
    for a, b in zip(live, cached):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
    for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"):
        assert runs[True][2][key] == pytest.approx(runs[False][2][key], abs=1e-5), key


def test_precomputed_separate_model_is_released_and_equals_it(tiny_model_dir, tmp_path):
    from prefalign.demo import build_tiny_model, demo_texts

    other = build_tiny_model(tmp_path / "other", texts=demo_texts(EXAMPLES / "data"), hidden_size=32, seed=7)
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path / "out", ref_model=other,
                                       precompute_ref_log_probs=True))
    assert trainer.reference.name == "precomputed (separate-model)"
    assert not any(isinstance(v, torch.nn.Module) for v in vars(trainer.reference).values())
    batch = first_batch(trainer)
    assert_same_logps(trainer.reference.logps(batch), logps_of(AutoModelForCausalLM.from_pretrained(other), batch))


def test_second_and_resumed_runs_reuse_the_cache(tiny_model_dir, tmp_path, monkeypatch):
    calls = []
    original = reference_cache.compute_part
    monkeypatch.setattr(reference_cache, "compute_part", lambda *a, **k: calls.append(1) or original(*a, **k))
    out = tmp_path / "out"
    first = config_for(tiny_model_dir, out, precompute_ref_log_probs=True, save_strategy="steps", save_steps=2,
                       max_steps=3, overwrite_output_dir=False)
    trainer = build_trainer(first)
    assert trainer.reference.stats["train"]["computed"] == 16 and len(calls) == 1
    parts = sorted(Path(trainer.reference.stats["train"]["path"]).glob("part-*"))
    mtimes = [p.stat().st_mtime_ns for p in parts]

    second = build_trainer(first)
    assert second.reference.stats["train"] == {"computed": 0, "reused": 16, "path": str(parts[0].parent)}
    second.add_callback(helpers.StopAfter(2))
    second.train()  # writes checkpoint-2 and stops
    run_train(first)  # resumes from checkpoint-2
    assert (out / "checkpoint-2").is_dir() and len(_logged_steps(out)) == 3
    assert len(calls) == 1  # the first build only
    assert [p.stat().st_mtime_ns for p in sorted(parts[0].parent.glob("part-*"))] == mtimes


def _logged_steps(out):
    import json

    return [h["step"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_cache_key_follows_the_weights_and_the_data(tiny_model_dir, tmp_path):
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path / "a", precompute_ref_log_probs=True))
    other_data = build_trainer(config_for(tiny_model_dir, tmp_path / "b", precompute_ref_log_probs=True,
                                          max_samples=12))
    assert other_data.reference.stats["train"]["computed"] == 12  # a different data set: its own entry
    assert other_data.reference.stats["train"]["path"] != trainer.reference.stats["train"]["path"]
    sft = make_adapter(tiny_model_dir, tmp_path / "sft")
    other_ref = build_trainer(config_for(tiny_model_dir, tmp_path / "c", precompute_ref_log_probs=True,
                                         adapter_name_or_path=sft))
    assert other_ref.reference.stats["train"]["computed"] == 16
    weights = [("w", torch.ones(3, 4))]
    changed = [("w", torch.ones(3, 4).index_put_((torch.tensor([2]), torch.tensor([3])), torch.tensor(1.5)))]
    assert weights_fingerprint(weights) != weights_fingerprint(changed)


def test_ld_dpo_per_token_values_are_cached_too(tiny_model_dir, tmp_path):
    """LD-DPO reweighs the reference's per-token log-probs: the cache stores them, exactly."""
    live = build_trainer(config_for(tiny_model_dir, tmp_path / "live", ld_alpha=0.5))
    cached = build_trainer(config_for(tiny_model_dir, tmp_path / "cached", ld_alpha=0.5, precompute_ref_log_probs=True))
    batch = first_batch(live)
    lo, co = live.batch_loss(live.model, batch)[1], cached.batch_loss(cached.model, batch)[1]
    a, b = live.reference.logps(batch), cached.reference.logps(batch)
    for key in ("chosen_token_logps", "rejected_token_logps", "chosen_mask", "rejected_mask"):
        assert torch.allclose(a.extras[key].float(), b.extras[key].float(), atol=1e-5), key
    assert torch.allclose(lo.losses, co.losses, atol=1e-6)
    with pytest.raises(Exception, match="no precomputed value"):
        cached.reference.logps({**batch, "index": torch.tensor([999])})


def test_processes_compute_shards_merged_by_index(tiny_model_dir, tmp_path, monkeypatch):
    """Two 'processes' (threads here) each compute every other missing pair into their own file;
    both read the merged table, equal to a single process's. The processes' barrier (all have read
    the cache before any writes to it) is a barrier of the two threads."""
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path / "out"))
    reference, dataset = trainer.reference, trainer.train_dataset
    collator = PairCollator(trainer.processing_class.pad_token_id)
    single, _ = precompute_split(reference, dataset, tmp_path / "single", collator, batch_size=3, device="cpu")
    results = {}
    monkeypatch.setattr("prefalign.reference_cache.barrier", threading.Barrier(2).wait)

    def shard(rank):
        results[rank] = precompute_split(reference, dataset, tmp_path / "sharded", collator, batch_size=3,
                                         device="cpu", process_index=rank, num_processes=2, timeout_s=60)

    threads = [threading.Thread(target=shard, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(list((tmp_path / "sharded").glob("part-*"))) == 2
    assert results[0][1]["computed"] + results[1][1]["computed"] == len(dataset)
    index = torch.tensor(dataset["index"])
    expected = single.lookup(index, token_level=False, split="train")
    for rank in (0, 1):
        got = results[rank][0].lookup(index, token_level=False, split="train")
        assert_same_logps(got, expected, atol=1e-6)
    # a part written twice (e.g. a retried process) is read once
    write_part(tmp_path / "sharded", compute_part(reference, dataset, [0, 1], collator, batch_size=2, device="cpu"))
    merged = ReferenceTable.load(tmp_path / "sharded")
    assert merged.indices == set(dataset["index"])
    assert_same_logps(merged.lookup(index, token_level=False, split="train"), expected, atol=1e-6)


# -- precompute by default (reference.plan_precompute) ---------------------------------------------------
def test_reference_reads_count_what_training_and_evaluation_compute_live(tiny_model_dir, tmp_path):
    """16 pairs, batch 4: 2 epochs read 2 x 16 = 32; max_steps 3 x 4 = 12; eval every 2 of the
    8 steps (2 epochs x 16 / 4) reads the 4 eval pairs 4 times = 16."""
    from prefalign.reference import reference_reads

    def args(**overrides):
        return config_for(tiny_model_dir, tmp_path, **overrides).training

    assert reference_reads(args(max_steps=-1, num_train_epochs=2), 16, 0) == (32, 0)
    assert reference_reads(args(max_steps=3), 16, 0) == (12, 0)
    assert reference_reads(args(max_steps=-1, num_train_epochs=2, eval_strategy="steps", eval_steps=2,
                                val_size=4), 16, 4) == (32, 16)


@pytest.mark.parametrize("setting, strategy, streaming, train_pairs, reads, on, phrase", [
    (None, "adapter-disabled", False, 16, (32, 0), True, "2 times"),           # 2 epochs: half the forwards
    (None, "adapter-disabled", False, 16, (16, 0), False, "nothing to save"),  # 1 epoch, weights shared
    (None, "frozen-copy", False, 16, (16, 0), True, "not held"),               # 1 epoch, a copy not made
    (None, "separate-model", False, 16, (16, 0), True, "not held"),
    (None, "frozen-copy", False, 16, (12, 0), False, "within the first epoch"),  # 12 of 16 read
    (None, "frozen-copy", True, 16, (48, 0), False, "streamed"),
    (None, "frozen-copy", False, None, (0, 0), False, "no training data"),
    (None, "none", False, 16, (48, 0), False, "no reference"),
    (False, "frozen-copy", False, 16, (48, 0), False, "false in the config"),
    (True, "adapter-disabled", False, 16, (12, 0), True, "true in the config"),
])
def test_plan_precompute(setting, strategy, streaming, train_pairs, reads, on, phrase):
    from prefalign.reference import plan_precompute

    plan = plan_precompute(setting, strategy, streaming=streaming, train_pairs=train_pairs, reads=reads)
    assert plan.on is on and phrase in plan.reason


def _live_models():
    """Causal LMs alive in this process (their inner decoders, also PreTrainedModels, not counted)."""
    import gc

    from transformers import LlamaForCausalLM

    gc.collect()
    return sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects())


@pytest.mark.parametrize("options", [{}, {"ref_model": "other"}], ids=["frozen-copy", "separate-model"])
def test_full_tuning_by_default_holds_no_reference_model(tiny_model_dir, tmp_path, options):
    """Full tuning, one epoch, defaults: the reference is precomputed, so after the trainer is built
    the only model alive is the policy (without the default: the policy and the frozen copy, or the
    separate reference model: two)."""
    if options:
        options = {"ref_model": str(_other_model(tmp_path))}
    before = _live_models()
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path / "out", finetuning_type="full", max_steps=-1,
                                       num_train_epochs=1, **options))
    assert isinstance(trainer.reference, PrecomputedReference)
    assert _live_models() - before == 1


def _other_model(tmp_path):
    from prefalign.demo import build_tiny_model, demo_texts

    return build_tiny_model(tmp_path / "other", texts=demo_texts(EXAMPLES / "data"), hidden_size=32, seed=7)


def test_default_precompute_gives_the_forced_off_losses_through_the_cli(tiny_model_dir, tmp_path):
    """`prefalign train` full tuning over 2 epochs (8 steps of 4 of 16 pairs): the default run
    precomputes (its log says so and its cache holds the reference parts), `precompute_ref_log_probs:
    false` computes the reference live; the logged losses agree to 1e-6."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    runs = {}
    for name, extra in (("default", {}), ("off", {"precompute_ref_log_probs": False})):
        out, cache = tmp_path / name, tmp_path / f"cache-{name}"
        values = {"model_name_or_path": str(tiny_model_dir), "stage": "dpo", "finetuning_type": "full",
                  "dataset": "demo_train", "dataset_dir": str(EXAMPLES / "data"), "max_samples": 16,
                  "cutoff_len": 96, "output_dir": str(out), "per_device_train_batch_size": 4,
                  "num_train_epochs": 2, "learning_rate": 1e-4, "logging_steps": 1, "save_strategy": "no",
                  "report_to": "none", "overwrite_output_dir": True, "seed": 0, **extra}
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(values))
        run = subprocess.run([sys.executable, "-m", "prefalign", "train", str(config)], capture_output=True,
                             text=True, env={**os.environ, "PREFALIGN_CACHE": str(cache)}, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        parts = list((cache / "reference").glob("*/part-*.safetensors"))
        runs[name] = ([h["loss"] for h in history if "loss" in h], run.stdout + run.stderr, parts)
    (on, on_log, on_parts), (off, off_log, off_parts) = runs["default"], runs["off"]
    assert "Reference precompute: on: training would compute each pair's reference 2 times" in on_log
    assert "Reference precompute: off: precompute_ref_log_probs: false in the config" in off_log
    assert on_parts and not off_parts
    assert len(on) == len(off) == 8
    assert on == pytest.approx(off, abs=1e-6)
    assert max(on) - min(on) > 1e-3  # the runs trained: the losses moved
