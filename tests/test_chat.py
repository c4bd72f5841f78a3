"""`prefalign chat` on the tiny model: one-shot, piped multi-turn stdin, and --compare-reference."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from prefalign.cli import main

MAX_NEW_TOKENS = 10
SEED = 7
# Sampling, not greedy: the untrained tiny model's greedy replies are mostly blank lines.
SAMPLING = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}


def write_config(path: Path, **values) -> str:
    path.write_text(yaml.safe_dump({"stage": "dpo", "report_to": "none", "max_new_tokens": MAX_NEW_TOKENS, **values}))
    return str(path)


def make_adapter(base_dir: str, path: Path, *, zero: bool) -> str:
    """A LoRA adapter; `zero`: peft's default init (B = 0), so base + adapter == base exactly."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
                        init_lora_weights=True if zero else False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config).save_pretrained(path)
    return str(path)


def expected_reply(model_dir: str, messages: list[dict]) -> str:
    """The reply plain transformers gives (seeded sampling), stopping at <|im_end|> (the demo tokenizer's eos)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    set_seed(SEED)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SAMPLING)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_one_shot_prompt_streams_the_templated_reply(tiny_model_dir, tmp_path, capsys):
    cfg = write_config(tmp_path / "chat.yaml", model_name_or_path=tiny_model_dir, **SAMPLING)
    assert main(["chat", cfg, "--prompt", "What is the capital of Austria?", "--seed", str(SEED)]) == 0
    expected = expected_reply(tiny_model_dir, [{"role": "user", "content": "What is the capital of Austria?"}])
    assert expected.strip()
    assert capsys.readouterr().out == f"Assistant: {expected}\n"


def test_interactive_reads_piped_stdin_keeps_history_and_stops_at_exit(tiny_model_dir, tmp_path):
    """Two user turns, then `exit`: the second reply continues the conversation (history in the prompt)."""
    cfg = write_config(tmp_path / "chat.yaml", model_name_or_path=tiny_model_dir, seed=SEED, **SAMPLING)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    stdin = "Hello there\nWhat color is a pumpkin?\nexit\nthis line is never answered\n"
    proc = subprocess.run([sys.executable, "-m", "prefalign", "chat", cfg], input=stdin, capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    first = expected_reply(tiny_model_dir, [{"role": "user", "content": "Hello there"}])
    history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "What color is a pumpkin?"}]
    second = expected_reply(tiny_model_dir, history)
    assert proc.stdout == (f"User: Hello there\nAssistant: {first}\n"
                           f"User: What color is a pumpkin?\nAssistant: {second}\n")


def test_session_keeps_each_turn_and_clear_forgets(tiny_model_dir, tmp_path):
    """The untrained tiny model's replies barely depend on the context, so the history is checked directly."""
    import io

    from prefalign.chat import build_session
    from prefalign.config import load_config

    cfg = write_config(tmp_path / "chat.yaml", model_name_or_path=tiny_model_dir, default_system="Be brief.",
                       **SAMPLING)
    session = build_session(load_config(cfg), seed=SEED)
    first = session.turn("Hello", io.StringIO())["assistant"]
    second = session.turn("And then?", io.StringIO())["assistant"]
    history = session.speakers[0].history
    assert history == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                       {"role": "user", "content": "And then?"}, {"role": "assistant", "content": second}]
    session.clear()
    assert session.speakers[0].history == []


def _policy_and_reference(out: str) -> tuple[str, str]:
    assert out.startswith("Policy: ") and "\nReference: " in out and out.endswith("\n"), out
    policy, reference = out[len("Policy: "):-1].split("\nReference: ")
    return policy, reference


@pytest.mark.parametrize("zero", [True, False], ids=["policy-equals-reference", "trained-adapter"])
def test_compare_reference_prints_both_answers(tiny_model_dir, tmp_path, capsys, zero):
    """Sampling with one seed: with a zero adapter (policy == reference) both answers are identical;
    with a random adapter they differ."""
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", zero=zero)
    cfg = write_config(tmp_path / "chat.yaml", model_name_or_path=tiny_model_dir, adapter_name_or_path=adapter,
                       **SAMPLING)
    assert main(["chat", cfg, "--prompt", "Tell me about dogs.", "--compare-reference", "--seed", str(SEED)]) == 0
    policy, reference = _policy_and_reference(capsys.readouterr().out)
    assert policy.strip() and reference.strip()
    assert (policy == reference) is zero


def test_compare_reference_without_a_reference_is_refused(tiny_model_dir, tmp_path, capsys):
    cfg = write_config(tmp_path / "chat.yaml", model_name_or_path=tiny_model_dir)
    assert main(["chat", cfg, "--prompt", "Hi", "--compare-reference"]) == 2
    assert "ref_model" in capsys.readouterr().err
