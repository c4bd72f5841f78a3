"""Chat data through the real command line: LLaMA-Factory's own DPO/ORPO/SimPO example configs, and
`on_bad_record: skip` at every stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import EXAMPLES, ROOT, model_with_template, with_llama3_tokens, write_json

from prefalign.data.templates import resolve_template

FIXTURES = ROOT / "tests" / "fixtures" / "llamafactory"
SYSTEM = "You are a helpful assistant."


def prefalign(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "prefalign", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def dpo_en_demo(folder: Path, n: int = 12) -> None:
    """LLaMA-Factory's `data/` layout for its dpo_en_demo dataset (sharegpt, some records with a system turn)."""
    data = folder / "data"
    data.mkdir()
    write_json(data / "dataset_info.json", {"dpo_en_demo": {
        "file_name": "dpo_en_demo.json", "ranking": True, "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}})
    write_json(data / "dpo_en_demo.json", [
        {"conversations": ([{"from": "system", "value": SYSTEM}] if i % 4 == 0 else [])
         + [{"from": "human", "value": f"What is {i} plus {i}?"}],
         "chosen": {"from": "gpt", "value": f"It is {2 * i}."},
         "rejected": {"from": "gpt", "value": "I do not know."}} for i in range(n)])




def example(tmp_path: Path, name: str, pref_loss: str = "sigmoid") -> Path:
    """LLaMA-Factory's example config in a LLaMA-Factory-like working directory; ORPO and SimPO runs of
    it differ only in pref_loss (the choice its own comment lists)."""
    text = (FIXTURES / name).read_text().replace("pref_loss: sigmoid", f"pref_loss: {pref_loss}")
    (tmp_path / name).write_text(text)
    dpo_en_demo(tmp_path)
    return tmp_path / name


@pytest.mark.parametrize("name, pref_loss", [("qwen3_lora_dpo.yaml", "sigmoid"), ("qwen3_lora_dpo.yaml", "orpo"),
                                             ("qwen3_lora_dpo.yaml", "simpo"), ("llama3_lora_dpo.yaml", "sigmoid"),
                                             ("llama3_oft_dpo.yaml", "sigmoid")])
def test_llamafactory_example_configs_load_unchanged(tmp_path, name, pref_loss):
    from prefalign.config import load_config

    config = load_config(example(tmp_path, name, pref_loss), ["model_name_or_path=m"])
    assert config.finetuning.pref_loss == [pref_loss] and config.data.dataset == ["dpo_en_demo"]
    assert resolve_template(config.data.template).builtin.name == {"qwen3_lora_dpo.yaml": "qwen3_nothink",
                                                                    "llama3_lora_dpo.yaml": "llama3",
                                                                    "llama3_oft_dpo.yaml": "llama3"}[name]


def test_llamafactory_qwen3_example_runs_prefalign_data_unchanged(tiny_model_dir, tmp_path):
    config = example(tmp_path, "qwen3_lora_dpo.yaml")
    run = prefalign("data", str(config), f"model_name_or_path={tiny_model_dir}", cwd=tmp_path,
                    env={"PREFALIGN_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "dpo_en_demo: 12 pairs" in run.stdout
    assert "template: qwen3_nothink (LLaMA-Factory 0.9.5's slots, encoded slot by slot (EOS replaced by <|im_end|>))" \
        in run.stdout
    assert "<think>" not in run.stdout  # Qwen3 Instruct-2507: no think block, as LLaMA-Factory writes it
    assert "[chosen: trained, " in run.stdout and "the end-of-turn token '<|im_end|>', then '\\n'" in run.stdout


def test_llamafactory_llama3_example_uses_the_builtin_llama3_format(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from prefalign.cli import main

    model = with_llama3_tokens(tiny_model_dir, tmp_path / "model")
    config = example(tmp_path, "llama3_lora_dpo.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["data", str(config), f"model_name_or_path={model}"]) == 0
    out = capsys.readouterr().out
    assert "template: llama3 (LLaMA-Factory 0.9.5's slots, encoded slot by slot" in out
    # LLaMA-Factory's llama3 format, the system turn first
    assert (f"<|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|><|start_header_id|>user<|end_header_id|>"
            "\n\nWhat is 0 plus 0?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n") in out
    assert "the last is the end-of-turn token '<|eot_id|>'" in out


@pytest.mark.slow
def test_llamafactory_example_trains_unchanged(tiny_model_dir, tmp_path):
    """A whole (short: 12 pairs, 3 epochs of 8-pair accumulation) run of LLaMA-Factory's config, as SimPO."""
    config = example(tmp_path, "qwen3_lora_dpo.yaml", "simpo")
    run = prefalign("train", str(config), f"model_name_or_path={tiny_model_dir}", cwd=tmp_path,
                    env={"PREFALIGN_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "saves" / "qwen3-4b" / "lora" / "dpo"
    assert (out / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["train"]["pairs"] == 12


@pytest.mark.slow
@pytest.mark.parametrize("name, adapter, pref_loss", [
    ("llama3_lora_dpo.yaml", "LORA", "sigmoid"), ("qwen3_lora_dpo.yaml", "LORA", "sigmoid"),
    ("qwen3_lora_dpo.yaml", "LORA", "orpo"), ("llama3_oft_dpo.yaml", "OFT", "sigmoid")])
def test_llamafactory_dpo_examples_train_unchanged_on_the_cpu(tiny_model_dir, tmp_path, name, adapter, pref_loss):
    """LF's own DPO example configs (bf16: true, LoRA or OFT) train with only the model path changed and
    max_steps shortened; no use_cpu, no other key added. The Llama 3 ones get a model with Llama 3's markup.
    qwen3_lora_dpo.yaml also as ORPO, the other choice its pref_loss comment lists (SimPO: the whole run above)."""
    model = with_llama3_tokens(tiny_model_dir, tmp_path / "model") if name.startswith("llama3") else tiny_model_dir
    config = example(tmp_path, name, pref_loss)
    run = prefalign("train", str(config), f"model_name_or_path={model}", "max_steps=2", cwd=tmp_path,
                    env={"PREFALIGN_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr[-3000:]
    import yaml

    out = tmp_path / yaml.safe_load(config.read_text())["output_dir"]
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == adapter
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["bf16"] is True and saved["finetuning_type"] == adapter.lower()
    assert saved["pref_loss"] in (pref_loss, [pref_loss])


# A template of our own that fails each stage for a different record: a tool turn cannot be rendered;
# a system turn goes into the last user turn only (not a prefix); contents are joined without markup,
# so a reply can merge with the prompt's last word into one token.
STAGE_TEMPLATE = (
    "{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{% for m in (messages[1:] if sys else messages) %}"
    "{% if m['role'] == 'tool' %}{{ raise_exception('no tool turns in this format') }}{% endif %}"
    "{% if m['role'] == 'user' and loop.last and sys %}{{ sys + ' ' }}{% endif %}"
    "{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ '<|im_end|>' }}{% endif %}{% endfor %}"
)


def stage_data(folder: Path) -> Path:
    good = [{"prompt": f"Question {i}?\n", "chosen": f"Answer {i}.", "rejected": "No."} for i in range(3)]
    lines = [json.dumps(r) for r in good[:1]] + [
        "{not json",                                                                          # parse
        json.dumps({"prompt": [{"role": "user", "content": "Hi\n"}, {"role": "assistant", "content": "Hello\n"},
                               {"role": "tool", "content": "42\n"}], "chosen": "Ok.", "rejected": "No."}),  # render
        json.dumps({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?\n"}],
                    "chosen": "A.", "rejected": "B."}),                                        # prefix
        json.dumps({"prompt": "The capit", "chosen": "al of France is Paris.", "rejected": "No."}),  # tokenize
    ] + [json.dumps(r) for r in good[1:]]
    path = folder / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def stage_config(tmp_path, tiny_model_dir, on_bad_record: str) -> list[str]:
    model = model_with_template(tiny_model_dir, tmp_path / "model", STAGE_TEMPLATE)
    return [f"model_name_or_path={model}", f"dataset={stage_data(tmp_path)}", f"on_bad_record={on_bad_record}",
            "cutoff_len=64", "val_size=0", f"output_dir={tmp_path / 'out'}"]


def test_skip_counts_records_failing_at_every_stage(tiny_model_dir, tmp_path):
    run = prefalign("data", "examples/lora_dpo.yaml", *stage_config(tmp_path, tiny_model_dir, "skip"),
                    cwd=ROOT, env={"PREFALIGN_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "skipped records by stage: parse 1, render 1, prefix 1, tokenize 1" in run.stdout
    assert "train: 3 pairs" in run.stdout


def test_error_stops_at_the_first_bad_record_naming_file_record_and_field(tiny_model_dir, tmp_path, capsys):
    from prefalign.cli import main

    assert main(["data", str(EXAMPLES / "lora_dpo.yaml"),
                 *stage_config(tmp_path, tiny_model_dir, "error"), "build_demo_model=false"]) == 2
    assert "mixed.jsonl record 1 (line 2), field '(whole record)'" in capsys.readouterr().err


def test_every_skipped_record_is_written_with_its_stage(tiny_model_dir, tmp_path):
    from prefalign.config import load_config
    from prefalign.data.pipeline import prepare_data
    from prefalign.modeling.load import load_tokenizer

    config = load_config(EXAMPLES / "lora_dpo.yaml",
                         stage_config(tmp_path, tiny_model_dir, "skip"), command="data")
    data = prepare_data(config.data, load_tokenizer(config.model), seed=0, cache_dir=str(tmp_path / "cache"))
    data.write(tmp_path / "out")
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejected_records.jsonl").read_text().splitlines()]
    assert [(r["index"], r["stage"], r["field"]) for r in rejects] == [
        (1, "parse", "(whole record)"), (2, "render", "prompt"), (3, "prefix", "chosen"), (4, "tokenize", "chosen")]
    assert "no tool turns in this format" in rejects[1]["reason"]
    assert rejects[3]["record"]["prompt"] == [{"role": "user", "content": "The capit"}]
    summary = json.loads((tmp_path / "out" / "data_summary.json").read_text())
    assert summary["skipped_by_stage"] == {"parse": 1, "render": 1, "prefix": 1, "tokenize": 1}
    assert summary["train"]["pairs"] == 3 and summary["train"]["skipped"] == 3


def test_prefalign_data_with_template_qwen_shows_a_tool_records_definitions_in_the_system_turn(tiny_model_dir,
                                                                                               tmp_path):
    """LLaMA-Factory's ShareGPT tool record (a tools column, function_call and observation turns) through the real
    CLI: the prompt shown starts with the system turn holding Qwen's default system and then the definitions
    (Qwen 2.5's "# Tools ... <tools>" block, the definition as JSON), the call and the result follow it."""
    tool = {"name": "get_weather", "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    data = tmp_path / "data"
    data.mkdir()
    write_json(data / "dataset_info.json", {"tools_demo": {
        "file_name": "tools_demo.json", "ranking": True, "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "tools": "tools"}}})
    write_json(data / "tools_demo.json", [{
        "conversations": [{"from": "human", "value": "Weather in Oslo?"},
                          {"from": "function_call", "value": json.dumps({"name": "get_weather",
                                                                         "arguments": {"city": "Oslo"}})},
                          {"from": "observation", "value": "-3 and snow"}],
        "chosen": {"from": "gpt", "value": "It is -3 and snowing."}, "rejected": {"from": "gpt", "value": "Sunny."},
        "tools": json.dumps([tool])}])
    (tmp_path / "run.yaml").write_text("stage: dpo\ntemplate: qwen\ndataset: tools_demo\ndataset_dir: data\n"
                                       f"output_dir: {tmp_path / 'out'}\n")
    run = prefalign("data", "run.yaml", f"model_name_or_path={tiny_model_dir}", cwd=tmp_path,
                    env={"PREFALIGN_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr[-3000:]
    prompt = run.stdout.split("[prompt: masked, not trained, ")[1].split("\n", 1)[1].split("\n[chosen: ")[0]
    system = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
    assert prompt.startswith(system), prompt[:300]
    definitions = prompt[len(system):prompt.index("<|im_end|>")]
    assert "<tools>\n" + json.dumps({"type": "function", "function": tool}) + "\n</tools>" in definitions
    assert prompt.index("<|im_start|>user\nWeather in Oslo?") > prompt.index("</tools>")
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in prompt
    assert "<tool_response>\n-3 and snow\n</tool_response>" in prompt
