"""Configuration: YAML + overrides, typed groups, and every problem reported at once."""


import pytest
from helpers import EXAMPLES as EXAMPLES_DIR, ROOT

from prefalign.config import build_config, load_config, parse_overrides
from prefalign.errors import ConfigError

EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))
BASE = {"model_name_or_path": "m", "dataset": "d", "output_dir": "out"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_loads(path):
    config = load_config(path)
    assert config.finetuning.stage == ("kto" if "kto" in path.name else "dpo")
    assert config.model.model_name_or_path


def test_overrides_are_typed_and_win_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\npref_beta: 0.1\nlearning_rate: 1.0e-5\n")
    config = load_config(path, ["pref_beta=0.05", "learning_rate=5e-6", "lora_rank=16", "bf16=false"])
    assert config.finetuning.pref_beta == 0.05
    assert config.training.learning_rate == 5e-6  # "5e-6" is a string to YAML 1.1; coerced to float
    assert config.finetuning.lora_rank == 16 and isinstance(config.finetuning.lora_rank, int)
    assert config.training.bf16 is False


def test_llamafactory_spellings_are_mapped():
    config = build_config({**BASE, "warmup_ratio": 0.1, "ddp_timeout": 180000000, "flash_attn": "auto",
                           "preprocessing_num_workers": 4, "overwrite_cache": True, "dataset": ["a", "b"]})
    assert config.training.warmup_steps == 0.1
    assert config.data.dataset == ["a", "b"]
    assert config.data.preprocessing_num_workers == 4


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"unknown key 'pref_betta'; did you mean 'pref_beta'\?"):
        build_config({**BASE, "pref_betta": 0.1})


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        build_config({"stage": "sft", "finetuning_type": "qlora", "pref_beta": "high", "lora_rnak": 8,
                      "shift_attn": True, "val_size": 0.1, "eval_dataset": "e", "dataset": "d"})
    problems = info.value.problems
    text = "\n".join(problems)
    assert "stage" in text and "model_name_or_path is required" in text
    assert "finetuning_type: 'qlora'" in text
    assert "pref_beta: expected a number, got 'high'" in text
    assert "did you mean 'lora_rank'" in text
    assert "shift_attn" in text and "does not support yet" in text
    assert "val_size and eval_dataset" in text
    assert len(problems) >= 6


def test_conflicting_renamed_keys_name_both():
    with pytest.raises(ConfigError, match="warmup_ratio and warmup_steps both given"):
        build_config({**BASE, "warmup_ratio": 0.1, "warmup_steps": 10})


def test_training_argument_errors_are_config_errors():
    with pytest.raises(ConfigError, match="training arguments"):
        build_config({**BASE, "lr_scheduler_type": "not_a_scheduler"})


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["pref_beta"])


def test_yaml_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model_name_or_path: m\ndataset: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line \d+"):
        load_config(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/file.yaml")


def test_readme_config_reference_is_current():
    """The README's table is generated from the fields' help texts: regenerate it when a field changes."""
    import sys

    root = ROOT
    sys.path.insert(0, str(root / "scripts"))
    from config_reference import reference

    readme = (root / "README.md").read_text()
    section = readme.split("<!-- config-reference:start -->\n")[1].split("\n<!-- config-reference:end -->")[0]
    assert section.strip() == reference().strip(), "run: python scripts/config_reference.py and paste into README.md"


def test_ci_runs_the_readme_test_command():
    root = ROOT
    readme = (root / "README.md").read_text()
    command = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'
    assert command in readme and command in (root / ".ci" / "run").read_text()


def test_unknown_template_is_reported_with_the_other_problems():
    with pytest.raises(ConfigError) as info:
        build_config({**BASE, "template": "deepseek4", "lora_rank": 0})
    text = "\n".join(info.value.problems)
    assert "template: " in text and "Did you mean `template: deepseek" in text and "lora_rank" in text


def test_template_arguments_are_checked_with_the_other_problems():
    with pytest.raises(ConfigError) as info:
        build_config({**BASE, "template": "qwen3_nothink", "on_unsupported_system": "drop",
                      "on_prompt_not_prefix": "guess", "chat_template_kwargs": {"tokenize": True, "enable_thinking": True}})
    text = "\n".join(info.value.problems)
    assert ("chat_template_kwargs: tokenize are arguments of a tokenizer's own chat template, but template: "
            "qwen3_nothink encodes with LLaMA-Factory's slots, which read only enable_thinking") in text
    assert "on_unsupported_system: 'drop' is not one of fold, error" in text
    assert "on_prompt_not_prefix: 'guess' is not one of error, append" in text
    assert "chat_template_kwargs: tokenize are set by prefalign itself" in text
    # enable_thinking: true alone is LLaMA-Factory's default (the template's own behaviour): nothing to refuse
    assert build_config({**BASE, "template": "qwen3_nothink", "enable_thinking": True}).data.enable_thinking is None
    config = build_config({**BASE, "chat_template_kwargs": {"reasoning_effort": "low"}})  # the tokenizer's own
    assert config.data.chat_template_kwargs == {"reasoning_effort": "low"} and config.data.enable_thinking is None
    config = build_config({**BASE, "template": "qwen3", "chat_template_kwargs": {"enable_thinking": False}})
    assert config.data.chat_template_kwargs == {"enable_thinking": False}


def test_saved_resolved_config_reloads_to_the_same_run(tmp_path):
    """run_config.yaml holds every prefalign key (defaults included) and loads back to the same settings."""
    import yaml

    config = build_config({**BASE, "pref_beta": 0.05, "learning_rate": 1e-5})
    assert config.raw["lora_rank"] == 8 and config.raw["pref_beta"] == 0.05
    path = tmp_path / "run_config.yaml"
    path.write_text(yaml.safe_dump(config.raw))
    again = load_config(path)
    assert again.finetuning == config.finetuning and again.data == config.data and again.model == config.model
    assert again.training.learning_rate == 1e-5


def test_no_and_yes_stay_strings_as_in_yaml_1_2(tmp_path):
    """YAML 1.1 reads `no` as false; `save_strategy: no` must mean the strategy "no", as users write it."""
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\nsave_strategy: no\nbf16: false\n")
    config = load_config(path, ["eval_strategy=no", "overwrite_output_dir=yes", "do_train=true"])
    assert config.training.save_strategy == "no" and config.training.eval_strategy == "no"
    assert config.finetuning.overwrite_output_dir is True and config.training.bf16 is False


LIST_KEYS = {"dataset": ["a", "b"], "eval_dataset": ["e", "f"], "adapter_name_or_path": ["x", "y"],
             "lora_target": ["q_proj", "v_proj"], "additional_target": ["embed_tokens"],
             "pref_loss": ["sigmoid", "sft"], "pref_loss_weights": [0.5, 1.0],
             "freeze_trainable_modules": ["mlp"], "freeze_extra_modules": ["lm_head"], "ref_model_adapters": ["r1"],
             "interleave_probs": [0.25, 0.75]}
# the keys a list key needs beside it to be valid
NEEDS = {"ref_model_adapters": {"ref_model": "r"}, "eval_dataset": {"val_size": 0},
         "pref_loss_weights": {"pref_loss": "sigmoid,sft"},
         "interleave_probs": {"dataset": "a,b", "mix_strategy": "interleave_under"}}


@pytest.mark.parametrize("key", sorted(LIST_KEYS))
def test_list_valued_keys_are_lists_from_a_yaml_list_or_a_comma_string(key):
    value = LIST_KEYS[key]
    extra = NEEDS.get(key, {})
    from_list = build_config({**BASE, **extra, key: value})
    from_string = build_config({**BASE, **extra, key: ", ".join(str(v) for v in value)})
    group = next(g for g in (from_list.model, from_list.data, from_list.finetuning) if hasattr(g, key))
    assert getattr(group, key) == value
    assert from_list.raw[key] == from_string.raw[key] == value


def test_the_objective_is_built_once_from_the_list_keys():
    config = build_config({**BASE, "pref_loss": "sigmoid,sft", "pref_loss_weights": [0.8, 1], "pref_ftx": 0.5})
    assert config.objective.names == ("sigmoid", "sft") and config.objective.weights == (0.8, 1.0)
    assert config.objective.settings.ftx == 0.5 and config.objective.needs_reference


def test_a_list_of_numbers_that_is_not_is_one_problem_naming_the_key():
    with pytest.raises(ConfigError) as caught:
        build_config({**BASE, "pref_loss": "sigmoid,sft", "pref_loss_weights": "1,heavy"})
    assert caught.value.problems == ["pref_loss_weights: expected a list (or comma-separated string) of numbers, "
                                     "got '1,heavy'"]


def test_packing_keys():
    """LLaMA-Factory's `packing` and `neat_packing` turn packing on; `packing_length` needs it and a sane value."""
    assert build_config({**BASE, "packing": True}).finetuning.packing
    assert build_config({**BASE, "neat_packing": True}).finetuning.packing
    assert build_config({**BASE, "packing": True, "packing_length": 4096}).finetuning.packing_length == 4096
    with pytest.raises(ConfigError, match="packing_length is set but packing is off"):
        build_config({**BASE, "packing": False, "packing_length": 4096})
    assert build_config({**BASE, "packing_length": 4096}).finetuning.packing is None  # packs where the model allows
    with pytest.raises(ConfigError, match="packing_length: -1 is negative"):
        build_config({**BASE, "packing": True, "packing_length": -1})
