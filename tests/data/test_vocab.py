"""Vocabulary changes as LLaMA-Factory 0.9.5 makes them (data/vocab.py): the tokens it adds, the resize to a
multiple of 64, the new rows' initialisation, and the same embeddings in the policy and every reference."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import EXAMPLES, config_for, first_batch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from prefalign.config.args import ModelArguments
from prefalign.data.vocab import VocabChange, extend_tokenizer, resize_embeddings
from prefalign.errors import ConfigError

LLAMA3_ADDED = ["<|eot_id|>", "<|eom_id|>"]  # LF's llama3: eos replaced by <|eot_id|>, stop word <|eom_id|>


def untied_model(vocab: int, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, tie_word_embeddings=False))


def test_new_rows_are_lfs_noise_init_padded_to_64_seeded():
    """100 rows + 3 tokens -> 128 rows (LF pads to 64); each of the 28 new rows, input then output layer, is
    mean(old rows) + N(0, 1/sqrt(32)) noise, drawn from a generator seeded with the run's seed."""
    model = untied_model(100)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    added = resize_embeddings(model, VocabChange(size=103, added=("a", "b", "c"), resize=True, seed=7))
    assert added == 28 and model.config.vocab_size == 128
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_in.shape == (128, 32) and new_out.shape == (128, 32)
    generator = torch.Generator().manual_seed(7)
    noise_in = torch.randn(28, 32, generator=generator) / math.sqrt(32)
    noise_out = torch.randn(28, 32, generator=generator) / math.sqrt(32)
    torch.testing.assert_close(new_in[:100], old_in, rtol=0, atol=0)
    torch.testing.assert_close(new_in[100:], old_in.sum(0) / 100 + noise_in, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new_out[:100], old_out, rtol=0, atol=0)
    torch.testing.assert_close(new_out[100:], old_out.sum(0) / 100 + noise_out, rtol=1e-5, atol=1e-6)


def test_desc_init_is_the_mean_embedding_of_the_description():
    """desc_init: the first new row of description i = mean of the input embeddings of its token ids; LF counts
    as valid the ids below len(tokenizer) - new rows (103 - 28 = 75), so a description of ids 80 and 101 only
    gets the mean of all old rows; the padding rows keep noise_init."""
    model = untied_model(100)
    old = model.get_input_embeddings().weight.detach().clone()
    change = VocabChange(size=103, added=("x", "y", "z"), resize=True, init="desc_init",
                         descriptions=((3, 5, 11), (80, 101), (7, 90)), seed=0)
    resize_embeddings(model, change)
    rows = model.get_input_embeddings().weight
    assert rows.shape == (128, 32)
    torch.testing.assert_close(rows[100], (old[3] + old[5] + old[11]) / 3, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[101], old.sum(0) / 100, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[102], old[7], rtol=1e-5, atol=1e-6)
    noise = torch.randn(28, 32, generator=torch.Generator().manual_seed(0)) / math.sqrt(32)
    torch.testing.assert_close(rows[103:], old.sum(0) / 100 + noise[3:], rtol=1e-5, atol=1e-6)


def test_a_token_beyond_the_embeddings_without_resize_vocab_is_refused_naming_it():
    with pytest.raises(ConfigError, match="set resize_vocab: true") as error:
        resize_embeddings(untied_model(64), VocabChange(size=65, added=("<|eot_id|>",)))
    assert "<|eot_id|>" in str(error.value) and "\n" not in str(error.value)


def test_add_tokens_and_special_tokens_extend_the_tokenizer_as_lf(tiny_tokenizer, tmp_path):
    """add_tokens (ordinary) then the special ones, each turning resize on; new_special_tokens_config's keys
    replace add_special_tokens and its descriptions become token ids for desc_init."""
    size = len(tiny_tokenizer)
    config = tmp_path / "special.yaml"
    config.write_text("'<tool>': a tool call\n'<answer>': the final answer\n")
    args = ModelArguments(model_name_or_path="x", add_tokens=["zyxw"], add_special_tokens=["<ignored>"],
                          new_special_tokens_config=str(config), init_special_tokens="desc_init")
    change = extend_tokenizer(tiny_tokenizer, args, None, seed=3)
    assert change.added == ("zyxw", "<tool>", "<answer>") and change.size == size + 3 and change.resize
    assert tiny_tokenizer.convert_tokens_to_ids(["zyxw", "<tool>", "<answer>"]) == [size, size + 1, size + 2]
    assert tiny_tokenizer.encode("<tool>", add_special_tokens=False) == [size + 1]
    assert "<ignored>" not in tiny_tokenizer.get_vocab()
    assert change.init == "desc_init" and change.descriptions[0] == tuple(
        tiny_tokenizer("a tool call", add_special_tokens=False)["input_ids"])


def test_split_special_tokens_tokenizes_them_as_text(tiny_model_dir):
    from prefalign.modeling.load import load_tokenizer

    whole = load_tokenizer(ModelArguments(model_name_or_path=tiny_model_dir))
    split = load_tokenizer(ModelArguments(model_name_or_path=tiny_model_dir, split_special_tokens=True))
    assert whole.encode("<|im_end|>", add_special_tokens=False) == [whole.convert_tokens_to_ids("<|im_end|>")]
    assert len(split.encode("<|im_end|>", add_special_tokens=False)) > 1


@pytest.mark.parametrize("strategy, overrides", [
    ("adapter-disabled", {}),
    ("frozen-copy", {"finetuning_type": "full"}),
    ("separate-model", {"ref_model": "SELF"}),
    ("precomputed", {"precompute_ref_log_probs": True}),
])
def test_policy_and_every_reference_see_the_same_resized_embeddings(tiny_model_dir, tmp_path, strategy, overrides):
    """template: llama3 on the chatml tiny model: LF adds <|eot_id|> (the EOS every response ends with) and
    <|eom_id|>; with resize_vocab the policy's and the reference's rows are LF's noise_init for seed 0, and
    their log-probs of the first batch (every response scores <|eot_id|>) are equal before training."""
    from prefalign.scoring import score_batch
    from prefalign.train.workflow import build_trainer

    overrides = {k: (tiny_model_dir if v == "SELF" else v) for k, v in overrides.items()}
    config = config_for(tiny_model_dir, tmp_path / "out", template="llama3", resize_vocab=True, **overrides)
    trainer = build_trainer(config)
    tokenizer = trainer.processing_class
    assert tokenizer.eos_token == "<|eot_id|>" and all(t in tokenizer.get_vocab() for t in LLAMA3_ADDED)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight.detach()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(64 - base.shape[0] % 64, 32, generator=generator) / math.sqrt(32)  # 1634 -> 1664 rows
    expected = base.sum(0) / base.shape[0] + noise
    policy_rows = trainer.model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(policy_rows[base.shape[0]:], expected, rtol=1e-5, atol=1e-6)
    if strategy != "precomputed":  # a precomputed reference has no model left, only its log-probs
        assert trainer.reference.name == strategy
        with trainer.reference._model_context():
            ref_rows = trainer.reference.model.get_input_embeddings().weight.detach()
        torch.testing.assert_close(ref_rows, policy_rows, rtol=0, atol=0)
    batch = first_batch(trainer)
    assert (batch["input_ids"] == tokenizer.eos_token_id).any()
    _, policy, reference = score_batch(trainer.model, trainer.reference, config.objective, batch)
    torch.testing.assert_close(policy.chosen, reference.chosen)
    torch.testing.assert_close(policy.rejected, reference.rejected)


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-m", "prefalign", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _write(path, values) -> str:
    path.write_text(json.dumps(values))  # YAML reads JSON
    return str(path)


def test_a_template_lf_extends_trains_saves_the_tokens_and_exports(tiny_model_dir, tmp_path):
    """CLI: template llama3 on a tokenizer without its tokens is an error naming resize_vocab; with it the run
    trains, the saved tokenizer has LF's tokens, the adapter saves the resized embedding and head in full,
    and the export loads with the new vocabulary (1636 tokens -> 1664 rows)."""
    base = {"model_name_or_path": tiny_model_dir, "stage": "dpo", "finetuning_type": "lora", "template": "llama3",
            "dataset": "demo_train", "dataset_dir": str(EXAMPLES / "data"), "max_samples": 8, "cutoff_len": 96,
            "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "max_steps": 1,
            "save_strategy": "no", "report_to": "none", "overwrite_output_dir": True, "seed": 0}
    refused = _cli("train", _write(tmp_path / "no.yaml", base), cwd=tmp_path)
    assert refused.returncode != 0
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("prefalign train: error: ") and "resize_vocab: true" in line and "<|eot_id|>" in line
    trained = _cli("train", _write(tmp_path / "yes.yaml", {**base, "resize_vocab": True}), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    out = tmp_path / "out"
    size = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    saved = AutoTokenizer.from_pretrained(out)
    assert len(saved) == size + 2 and saved.eos_token == "<|eot_id|>"
    assert saved.convert_tokens_to_ids(LLAMA3_ADDED) == [size, size + 1]
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["embed_tokens", "lm_head"]
    rows = math.ceil((size + 2) / 64) * 64
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
        shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys() if "modules_to_save" in k}
    assert shapes and all(shape == [rows, 32] for shape in shapes.values())
    export = {"model_name_or_path": tiny_model_dir, "adapter_name_or_path": str(out), "template": "llama3",
              "resize_vocab": True, "export_dir": str(tmp_path / "export")}
    exported = _cli("export", _write(tmp_path / "export.yaml", export), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert model.get_input_embeddings().weight.shape == (rows, 32) and model.config.vocab_size == rows
    assert len(AutoTokenizer.from_pretrained(tmp_path / "export")) == size + 2
