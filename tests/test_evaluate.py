"""`prefalign eval` on the tiny model: hand values, response-only log-probs, order, and agreement with training."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_random_adapter

from prefalign.cli import main

EXAMPLES = Path(__file__).parents[1] / "examples"


def write_config(path: Path, **values) -> str:
    base = {
        "stage": "dpo", "dataset": "demo_train", "eval_dataset": "demo_eval", "dataset_dir": str(EXAMPLES / "data"),
        "max_samples": 7, "cutoff_len": 96, "per_device_eval_batch_size": 3, "report_to": "none",
    }
    base.update(values)
    path.write_text(yaml.safe_dump(base))
    return str(path)


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "eval_pairs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def random_adapter(tiny_model_dir, tmp_path_factory) -> str:
    """A LoRA adapter on the tiny model with random (non-zero) A and B, so policy != base."""
    return make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapters") / "random", seed=1)


def test_policy_equal_to_reference_gives_zero_margins_and_ln2(tiny_model_dir, tmp_path):
    """Policy and reference are the same weights, so for every pair Δ = 0 exactly and the sigmoid loss is
    −log σ(β·0) = log 2 = 0.6931471805599453 (0.69314718 in fp32); accuracies (chosen > rejected) are 0.

    7 pairs in batches of 3: the last batch holds one pair and must be scored, in file order.
    """
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "eval.yaml", model_name_or_path=tiny_model_dir, ref_model=tiny_model_dir,
                       output_dir=str(out))
    assert main(["eval", cfg]) == 0
    rows = read_rows(out)
    assert [r["index"] for r in rows] == list(range(7))
    for r in rows:
        assert r["policy_chosen_logps"] == r["reference_chosen_logps"] < 0
        assert r["policy_rejected_logps"] == r["reference_rejected_logps"] < 0
        assert r["chosen_reward"] == r["rejected_reward"] == r["margin"] == 0.0
        assert r["loss"] == pytest.approx(math.log(2), abs=1e-7)
        assert isinstance(r["chosen_tokens"], int) and r["chosen_tokens"] > 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert results["eval_rewards/margins"] == 0.0 and results["eval_rewards/accuracies"] == 0.0
    assert results["eval_samples"] == 7
    assert results["eval_logps/chosen"] == pytest.approx(sum(r["policy_chosen_logps"] for r in rows) / 7)


def _hand_logps(model, tokenizer, messages, reply) -> tuple[float, int]:
    """Sum of log p(token) over the reply's tokens, up to and including <|im_end|>, with a plain forward pass."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full_ids])).logits[0].double()
    logps = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(full_ids[1:]).unsqueeze(-1)).squeeze(-1)
    n = len(full_ids) - len(prompt_ids)
    return logps[-n:].sum().item(), n


def test_adapter_is_the_policy_and_base_the_reference_response_tokens_only(tiny_model_dir, random_adapter, tmp_path):
    """Pair 0 of demo_eval, recomputed by hand: policy = base + adapter, reference = base (adapter disabled);
    only the reply and its <|im_end|> are scored (the template's trailing newline is not).
    The rows do not depend on the batch size (1 vs 3)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    outs = {}
    for bs in (3, 1):
        outs[bs] = tmp_path / f"out{bs}"
        cfg = write_config(tmp_path / f"eval{bs}.yaml", model_name_or_path=tiny_model_dir,
                           adapter_name_or_path=random_adapter, output_dir=str(outs[bs]),
                           per_device_eval_batch_size=bs, max_samples=4)
        assert main(["eval", cfg]) == 0
    rows, rows_bs1 = read_rows(outs[3]), read_rows(outs[1])

    record = json.loads((EXAMPLES / "data" / "demo_eval.json").read_text())[0]
    assert not record.get("input") and not record.get("system")
    messages = [{"role": "user", "content": record["instruction"]}]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ref_chosen, n_chosen = _hand_logps(base, tokenizer, messages, record["chosen"])
    ref_rejected, n_rejected = _hand_logps(base, tokenizer, messages, record["rejected"])
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), random_adapter).eval()
    pol_chosen, _ = _hand_logps(policy, tokenizer, messages, record["chosen"])
    pol_rejected, _ = _hand_logps(policy, tokenizer, messages, record["rejected"])

    row = rows[0]
    assert row["chosen_tokens"] == n_chosen and row["rejected_tokens"] == n_rejected
    assert row["reference_chosen_logps"] == pytest.approx(ref_chosen, abs=1e-4)
    assert row["reference_rejected_logps"] == pytest.approx(ref_rejected, abs=1e-4)
    assert row["policy_chosen_logps"] == pytest.approx(pol_chosen, abs=1e-4)
    assert row["policy_rejected_logps"] == pytest.approx(pol_rejected, abs=1e-4)
    assert abs(pol_chosen - ref_chosen) > 1e-2  # the adapter matters, so the test can tell policy from reference
    # reward = β (log π − log π_ref), β = 0.1; loss = −log σ(reward margin)
    chosen_reward = 0.1 * (pol_chosen - ref_chosen)
    rejected_reward = 0.1 * (pol_rejected - ref_rejected)
    assert row["chosen_reward"] == pytest.approx(chosen_reward, abs=1e-5)
    assert row["margin"] == pytest.approx(chosen_reward - rejected_reward, abs=1e-5)
    assert row["loss"] == pytest.approx(math.log1p(math.exp(-(chosen_reward - rejected_reward))), abs=1e-5)

    assert [r["index"] for r in rows_bs1] == [r["index"] for r in rows] == [0, 1, 2, 3]
    for a, b in zip(rows, rows_bs1):
        for key in ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key


def test_eval_reproduces_the_final_evaluation_of_training(tiny_model_dir, tmp_path):
    """A LoRA run from the base: `prefalign eval` on its adapter gives the metrics training logged at its end."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "train.yaml", model_name_or_path=tiny_model_dir, finetuning_type="lora",
                       output_dir=str(out), max_samples=8, per_device_train_batch_size=4, max_steps=2,
                       learning_rate=1e-2, save_strategy="no", logging_steps=1, overwrite_output_dir=True,
                       disable_tqdm=True, per_device_eval_batch_size=8)
    from prefalign.config import load_config
    from prefalign.train.workflow import run_train

    trained = run_train(load_config(cfg))
    eval_out = tmp_path / "eval"
    assert main(["eval", cfg, f"adapter_name_or_path={out}", f"output_dir={eval_out}"]) == 0
    results = json.loads((eval_out / "eval_results.json").read_text())
    for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/chosen", "eval_rewards/accuracies",
                "eval_logps/chosen", "eval_logps/rejected"):
        assert results[key] == pytest.approx(trained[key], abs=1e-5), key
    assert trained["eval_rewards/margins"] != 0.0


def test_swapping_chosen_and_rejected_flips_the_margin(tiny_model_dir, random_adapter, tmp_path):
    data = json.loads((EXAMPLES / "data" / "demo_eval.json").read_text())[:3]
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in data]
    for name, records in (("straight", data), ("swapped", swapped)):
        (tmp_path / f"{name}.json").write_text(json.dumps(records))
    rows = {}
    for name in ("straight", "swapped"):
        cfg = write_config(tmp_path / f"{name}.yaml", model_name_or_path=tiny_model_dir,
                           adapter_name_or_path=random_adapter, eval_dataset=str(tmp_path / f"{name}.json"),
                           output_dir=str(tmp_path / name))
        assert main(["eval", cfg]) == 0
        rows[name] = read_rows(tmp_path / name)
    for a, b in zip(rows["straight"], rows["swapped"]):
        assert a["margin"] == pytest.approx(-b["margin"], abs=1e-6) and a["margin"] != 0


def test_reference_free_loss_needs_no_reference(tiny_model_dir, tmp_path):
    """SimPO reads no reference: reference log-probs are null, and no adapter or ref_model is asked for."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "eval.yaml", model_name_or_path=tiny_model_dir, pref_loss="simpo",
                       output_dir=str(out), max_samples=2)
    assert main(["eval", cfg]) == 0
    row = read_rows(out)[0]
    assert row["reference_chosen_logps"] is None and row["reference_rejected_logps"] is None
    # SimPO reward = β · mean log-prob per token (β = 0.1)
    assert row["chosen_reward"] == pytest.approx(0.1 * row["policy_chosen_logps"] / row["chosen_tokens"], rel=1e-5)


def test_no_reference_to_compare_with_is_refused(tiny_model_dir, tmp_path, capsys):
    cfg = write_config(tmp_path / "eval.yaml", model_name_or_path=tiny_model_dir, output_dir=str(tmp_path / "o"))
    assert main(["eval", cfg]) == 2
    err = capsys.readouterr().err.strip()
    assert "ref_model" in err and "adapter_name_or_path" in err and len(err.splitlines()) == 1


def test_eval_on_each_dataset_gives_each_dataset_the_metrics_it_has_alone(tiny_model_dir, random_adapter, tmp_path):
    """eval_on_each_dataset: `eval_<name>_*` per eval dataset (training's names), each family equal to the
    `eval_*` metrics of an eval of that dataset alone; the per-pair rows are both datasets' in order."""
    def run(name, eval_dataset, **keys):
        out = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", model_name_or_path=tiny_model_dir,
                           adapter_name_or_path=random_adapter, eval_dataset=eval_dataset, output_dir=str(out),
                           max_samples=5, **keys)
        assert main(["eval", cfg]) == 0
        results = json.loads((out / "eval_results.json").read_text())
        timing = ("_runtime", "throughput/tokens_per_second", "throughput/mfu")  # wall-clock, not scores
        return {k: v for k, v in results.items() if not k.endswith(timing)}, read_rows(out)

    both, rows = run("both", "demo_eval,demo_train", eval_on_each_dataset=True)
    alone_rows = []
    for name in ("demo_eval", "demo_train"):
        alone, part_rows = run(name, name)
        alone_rows += part_rows
        assert {"eval_loss", "eval_rewards/accuracies", "eval_logps/chosen", "eval_samples"} <= set(alone)
        family = {"eval_" + k[len(f"eval_{name}_"):]: v for k, v in both.items() if k.startswith(f"eval_{name}_")}
        assert family == pytest.approx(alone, rel=1e-6)
    assert not any(k.startswith("eval_") and not k.startswith(("eval_demo_eval_", "eval_demo_train_")) for k in both)
    assert both["eval_demo_eval_loss"] != both["eval_demo_train_loss"]
    assert len(rows) == 10
    assert [r["policy_chosen_logps"] for r in rows] == pytest.approx([r["policy_chosen_logps"] for r in alone_rows])
