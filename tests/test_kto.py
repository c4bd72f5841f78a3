"""stage: kto (the losses: tests/test_losses.py): LLaMA-Factory's and TRL's unpaired
data, paired data split in two, the KL completions, per-example eval rows, LLaMA-Factory's two KTO
example configs through the CLI, and the speed paths (precompute, prefix sharing, packing) against
the plain path. (TRL parity: benchmarks/kto_trl_parity.py, run from a venv with TRL.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PLAIN, ROOT, config_for, with_llama3_tokens, write_json


FIXTURES = ROOT / "tests" / "fixtures" / "llamafactory"
ON_CPU = [] if torch.cuda.is_available() else ["use_cpu=true"]


# -- data ---------------------------------------------------------------------------------------
SYSTEM = "You are a helpful assistant."


def kto_en_demo(folder: Path, n: int = 12) -> Path:
    """LLaMA-Factory's `data/` layout for kto_en_demo: sharegpt messages with role/content tags, the
    conversation's last (assistant) message is the reply, `label` the kto_tag (no "ranking" key)."""
    data = folder / "data"
    data.mkdir(exist_ok=True)
    write_json(data / "dataset_info.json", {"kto_en_demo": {
        "file_name": "kto_en_demo.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "kto_tag": "label"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}})
    write_json(data / "kto_en_demo.json", [
        {"messages": ([{"role": "system", "content": SYSTEM}] if i % 4 == 0 else [])
         + [{"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}." if i % 3 else "I do not know."}],
         "label": i % 3 != 0} for i in range(n)])
    return data


def test_llamafactory_sharegpt_and_alpaca_kto_tag_records(tmp_path):
    from prefalign.data.sources import load_preference_pairs

    data = kto_en_demo(tmp_path)
    registry = json.loads((data / "dataset_info.json").read_text())
    registry["kto_alpaca"] = {"file_name": "alpaca.json", "ranking": False, "columns": {"kto_tag": "tag"}}
    write_json(data / "dataset_info.json", registry)
    write_json(data / "alpaca.json", [{"instruction": "Add", "input": "2 and 2", "output": "4", "tag": True},
                                      {"instruction": "Add", "input": "", "output": "5", "tag": "False"}])
    examples, report = load_preference_pairs(["kto_en_demo", "kto_alpaca"], str(data), unpaired=True)
    assert len(examples) == 14 and report.split_pairs == {}
    first = examples[0]
    assert first.prompt == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 0 plus 0?"}]
    assert (first.chosen, first.desirable) == ("I do not know.", False)
    assert (examples[1].chosen, examples[1].desirable) == ("It is 2.", True)
    assert [(e.prompt, e.chosen, e.desirable) for e in examples[12:]] == [
        ([{"role": "user", "content": "Add\n2 and 2"}], "4", True), ([{"role": "user", "content": "Add"}], "5", False)]


def test_kto_data_under_stage_dpo_is_refused(tmp_path):
    from prefalign.data.sources import load_preference_pairs
    from prefalign.errors import DataError

    data = kto_en_demo(tmp_path)
    with pytest.raises(DataError, match="holds unpaired records .* set stage: kto|train on it with stage: kto"):
        load_preference_pairs(["kto_en_demo"], str(data))


def test_trl_unpaired_rows_and_paired_rows_split_in_two(tmp_path):
    from prefalign.data.feedback import with_kl_completions
    from prefalign.data.sources import load_preference_pairs

    unpaired = tmp_path / "unpaired.jsonl"
    unpaired.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}],
         "label": True},
        {"prompt": "Sky?", "completion": "Green.", "label": False}]) + "\n")
    paired = write_json(tmp_path / "pairs.json", [{"prompt": "Q1?", "chosen": "A1.", "rejected": "B1."},
                                                  {"prompt": "Q2?", "chosen": "A2.", "rejected": "B2."}])
    examples, report = load_preference_pairs([str(unpaired), paired], str(tmp_path), unpaired=True)
    assert report.split_pairs == {paired: 2}
    # TRL's unpair order: the chosen replies (desirable), then the rejected ones (undesirable)
    assert [(e.prompt[-1]["content"], e.chosen, e.desirable) for e in examples] == [
        ("Hi", "Hello!", True), ("Sky?", "Green.", False),
        ("Q1?", "A1.", True), ("Q2?", "A2.", True), ("Q1?", "B1.", False), ("Q2?", "B2.", False)]
    # each example's KL completion is the previous example's reply (the first takes the last one's)
    assert [e.rejected for e in with_kl_completions(examples)] == ["B2.", "Hello!", "Green.", "A1.", "A2.", "B1."]


def prefalign(*args, cwd, env=None):
    """`python -m prefalign ...` in a subprocess, importing this checkout's code from any working directory."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "prefalign", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path, **(env or {})}, timeout=600)


@pytest.mark.parametrize("record, found", [({"prompt": "Q?", "completion": "A."}, "is missing"),
                                           ({"prompt": "Q?", "completion": "A.", "label": "maybe"}, "'maybe'"),
                                           ({"prompt": "Q?", "completion": "A.", "label": 1}, "a number (1)")])
def test_a_record_without_a_usable_label_is_a_named_record_error(tiny_model_dir, tmp_path, record, found):
    rows = [{"prompt": "Q0?", "completion": "A0.", "label": True}, record]
    path = tmp_path / "feedback.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = prefalign("data", "examples/lora_kto.yaml", f"model_name_or_path={tiny_model_dir}",
                    f"dataset={path}", "val_size=0", f"output_dir={tmp_path / 'out'}", cwd=ROOT,
                    env={"PREFALIGN_CACHE": str(tmp_path / "cache")})
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert "Traceback" not in run.stderr
    assert last.startswith(f"prefalign data: error: {path} record 1 (line 2), field 'label': "), last
    assert found in last


def test_prepared_kto_data_carries_labels_and_kl_completions(tiny_tokenizer, tmp_path):
    from prefalign.config.args import DataArguments
    from prefalign.data.pipeline import prepare_data

    data = kto_en_demo(tmp_path, n=6)
    prepared = prepare_data(DataArguments(dataset=["kto_en_demo"], dataset_dir=str(data), cutoff_len=256),
                            tiny_tokenizer, seed=0, cache_dir=str(tmp_path / "cache"), unpaired=True)
    train = prepared.train
    assert train["desirable"] == [False, True, True, False, True, True]
    # the KL completion of example i is example i-1's reply, encoded after example i's prompt
    assert [train[i]["rejected_ids"] for i in range(6)] == [train[(i - 1) % 6]["chosen_ids"] for i in range(6)]
    assert prepared.summary.train.desirable == 4 and prepared.summary.train.undesirable == 2
    assert "train: 4 desirable and 2 undesirable examples" in prepared.summary.describe()


# -- training and eval ----------------------------------------------------------------------------------
def kto_losses(tiny_model_dir, out, **overrides) -> list[float]:
    from prefalign.train.workflow import run_train

    values = {"stage": "kto", "max_samples": 8, "max_steps": 3, "train_sampling_strategy": "sequential",
              **overrides}
    config = config_for(tiny_model_dir, out, **values)
    run_train(config)
    history = json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def test_precompute_prefix_sharing_and_packing_give_the_plain_losses(tiny_model_dir, tmp_path):
    """KTO examples and their KL completions go through every speed path as pairs do: the same losses."""
    plain = kto_losses(tiny_model_dir, tmp_path / "plain", **PLAIN)
    assert len(plain) == 3 and plain[0] == pytest.approx(0.5, abs=1e-6)  # policy = reference: 1 - σ(0) each
    for name, options in {"precompute": {**PLAIN, "precompute_ref_log_probs": True},
                          "prefix": {**PLAIN, "prefix_sharing": True},
                          "packed": {**PLAIN, "packing": True},
                          "packed-prefix": {"packing": True, "prefix_sharing": True}}.items():
        assert kto_losses(tiny_model_dir, tmp_path / name, **options) == pytest.approx(plain, abs=1e-5), name


def test_eval_writes_one_row_per_example_with_reward_kl_and_label(tiny_model_dir, tmp_path):
    from prefalign.cli import main

    data = kto_en_demo(tmp_path, n=6)
    out = tmp_path / "out"
    kto_losses(tiny_model_dir, out, dataset="kto_en_demo", dataset_dir=str(data), max_steps=2)
    assert main(["eval", str(out / "run_config.yaml"), f"adapter_name_or_path={out}",
                 "per_device_eval_batch_size=3", f"output_dir={tmp_path / 'eval'}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "eval" / "eval_pairs.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == [False, True, True, False, True, True]
    for r in rows:  # reward = β × (policy - reference) of the reply; kl = max(0, batch mean of the KL pairs)
        assert r["reward"] == pytest.approx(0.1 * (r["policy_logps"] - r["reference_logps"]), abs=1e-5)
    for batch in (rows[:3], rows[3:]):
        z = max(0.0, sum(r["policy_kl_logps"] - r["reference_kl_logps"] for r in batch) / 3)
        assert [r["kl"] for r in batch] == pytest.approx([z] * 3, abs=1e-5)


@pytest.mark.parametrize("name", ["qwen3_lora_kto.yaml", "llama3_lora_kto.yaml"])
def test_llamafactory_kto_examples_train_unchanged(tiny_model_dir, tmp_path, name):
    """LLaMA-Factory's two KTO example configs, only the model, the output dir and max_steps changed, on an
    LF-shaped kto_en_demo (12 examples; 2 steps of 8-example accumulation)."""
    (tmp_path / name).write_text((FIXTURES / name).read_text())
    kto_en_demo(tmp_path)
    model = tiny_model_dir
    if name.startswith("llama3"):
        model = with_llama3_tokens(tiny_model_dir, tmp_path / "model")
    out = tmp_path / "out"
    run = prefalign("train", name, f"model_name_or_path={model}", f"output_dir={out}", "max_steps=2", *ON_CPU,
                    cwd=tmp_path, env={"PREFALIGN_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "kto_en_demo: 12 examples" in run.stdout
    assert "train: 8 desirable and 4 undesirable examples" in run.stdout
    assert (out / "adapter_model.safetensors").is_file()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert history[-1]["step"] == 2


# -- the rest of the workflow: every tuning and reference strategy -------------------------------------
def kto_history(out) -> list[dict]:
    return [h for h in json.loads((Path(out) / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_every_reference_strategy_gives_the_same_kto_losses(tiny_model_dir, tmp_path):
    """Full tuning: the frozen copy, a separate `ref_model` that is the same base, and the precomputed
    reference (its KL completions included) are one reference: the same losses; a step moves them."""
    full = {"finetuning_type": "full", "learning_rate": 1e-2}
    plain = kto_losses(tiny_model_dir, tmp_path / "frozen-copy", **full)
    assert plain[0] == pytest.approx(0.5, abs=1e-6) and abs(plain[2] - plain[0]) > 1e-3
    for name, options in {"separate": {"ref_model": str(tiny_model_dir)},
                          "precompute": {"precompute_ref_log_probs": True}}.items():
        assert kto_losses(tiny_model_dir, tmp_path / name, **full, **options) == pytest.approx(plain, abs=1e-5), name


def test_an_sft_adapter_reference_trains_kto_from_one_half_live_or_precomputed(tiny_model_dir, tmp_path):
    """`adapter_name_or_path`: the policy trains a copy of the SFT adapter, the reference is base + SFT
    adapter: policy = reference at step 1 (loss 0.5 although base + adapter != base), and the precomputed
    reference (KL completions included) gives the live one's losses."""
    from helpers import make_random_adapter

    sft = make_random_adapter(tiny_model_dir, tmp_path / "sft", seed=3, b_std=0.05)
    live = kto_losses(tiny_model_dir, tmp_path / "live", adapter_name_or_path=sft, learning_rate=1e-2)
    assert live[0] == pytest.approx(0.5, abs=1e-6) and abs(live[2] - live[0]) > 1e-4
    cached = kto_losses(tiny_model_dir, tmp_path / "cached", adapter_name_or_path=sft, learning_rate=1e-2,
                        precompute_ref_log_probs=True)
    assert cached == pytest.approx(live, abs=1e-5)


@pytest.mark.parametrize("options", [{"finetuning_type": "freeze"}, {"quantization_bit": 4}], ids=["freeze", "qlora"])
def test_freeze_and_qlora_train_kto_from_one_half(llama64_model_dir, tmp_path, options):
    """Freeze tuning (frozen-copy reference) and QLoRA (the 4-bit base as the adapter-disabled reference):
    policy = reference at step 1 (loss 1 - σ(0) = 0.5 for every example), and the loss moves after it."""
    pytest.importorskip("bitsandbytes")
    losses = kto_losses(llama64_model_dir, tmp_path / "out", learning_rate=1e-2, **options)
    assert losses[0] == pytest.approx(0.5, abs=1e-6) and abs(losses[2] - losses[0]) > 1e-4


# -- micro-batches of one label -------------------------------------------------------------------------
def test_micro_batches_of_one_label_log_exact_per_label_metrics(tiny_model_dir, tmp_path):
    """2 demo pairs split in TRL's order (D1 D2 U1 U2), sequential, batch 2 x accumulation 2: one micro-batch
    holds only desirable examples, the other only undesirable ones. The step's metrics are the means over
    the examples of each label and the counts are totals (2 and 2), as the batch-4 twin logs them; nothing
    is NaN. The values are checked against `prefalign eval`'s rows of the same 4 examples on the base model
    (step 1: policy = reference, so every reward and kl is 0 and the log-probs are the base model's)."""
    from prefalign.cli import main

    out = tmp_path / "accum"
    kto_losses(tiny_model_dir, out, max_samples=2, max_steps=1, per_device_train_batch_size=2,
               gradient_accumulation_steps=2)
    step = kto_history(out)[0]
    kto_losses(tiny_model_dir, tmp_path / "batch4", max_samples=2, max_steps=1)
    twin = kto_history(tmp_path / "batch4")[0]
    assert main(["eval", str(out / "run_config.yaml"), f"model_name_or_path={tiny_model_dir}", "val_size=0",
                 "max_samples=2", "finetuning_type=full", f"ref_model={tiny_model_dir}", "eval_dataset=demo_train",
                 f"output_dir={tmp_path / 'eval'}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "eval" / "eval_pairs.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == [True, True, False, False]
    desirable = [r["policy_logps"] for r in rows if r["label"]]
    undesirable = [r["policy_logps"] for r in rows if not r["label"]]
    for logged in (step, twin):
        assert all(v == v for v in logged.values())  # no NaN
        assert (logged["count/chosen"], logged["count/rejected"]) == (2, 2)
        assert logged["logps/chosen"] == pytest.approx(sum(desirable) / 2, abs=1e-4)
        assert logged["logps/rejected"] == pytest.approx(sum(undesirable) / 2, abs=1e-4)
        assert logged["rewards/chosen"] == logged["rewards/rejected"] == logged["kl"] == 0
        assert logged["loss"] == pytest.approx(0.5, abs=1e-6)


def test_a_run_of_one_label_leaves_the_other_labels_metrics_out(tiny_model_dir, tmp_path):
    """Steps whose examples are all desirable log no `rewards/rejected` or `logps/rejected` (not NaN) and
    `count/rejected` 0; the warning about the missing label is said once."""
    kto_losses(tiny_model_dir, tmp_path / "out", max_samples=4, max_steps=1, per_device_train_batch_size=4)
    step = kto_history(tmp_path / "out")[0]
    assert (step["count/chosen"], step["count/rejected"]) == (4, 0)
    assert "rewards/rejected" not in step and "logps/rejected" not in step
    assert all(v == v for v in step.values())


# -- what a KTO run writes ----------------------------------------------------------------------------------
def test_report_and_model_card_of_a_kto_run_speak_of_examples_and_labels(tiny_model_dir, tmp_path):
    """6 demo pairs split in two: the card counts 12 examples by label; the report's samples are examples
    with their label, reward and KL, shown as desirable / undesirable."""
    out = tmp_path / "out"
    kto_losses(tiny_model_dir, out, max_samples=6, max_steps=2)
    card = (out / "README.md").read_text()
    assert "KTO-style alignment on unpaired desirable/undesirable feedback" in card
    assert "6 preference pairs, each split into a desirable and an undesirable example" in card
    assert "train: 12 examples (6 desirable, 6 undesirable)" in card
    samples = json.loads((out / "report_samples.json").read_text())["pairs"]
    # the data lists the 6 desirable examples first (TRL's order); the samples take each label in turn
    assert [(s["index"], s["label"]) for s in samples] == [(0, True), (1, True), (2, True), (6, False), (7, False)]
    assert {"label", "reward", "kl", "reply"} <= samples[0].keys()
    for s in samples:  # reward = β × (policy - reference) of the reply, as in eval
        assert s["reward"] == pytest.approx(0.1 * (s["policy_logps"] - s["reference_logps"]), abs=1e-5)
    report = (out / "report.html").read_text()
    assert ">desirable<" in report and ">undesirable<" in report and "reference point z_ref" in report
