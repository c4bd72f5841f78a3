"""LLaMA-Factory's changes to a model's config, against transformers with the same config written by hand:
RoPE scaling (linear, dynamic, yarn, llama3)."""

import json
import logging
import shutil

import pytest
import torch
from helpers import config_for

from prefalign.config import build_config
from prefalign.config.args import ModelArguments
from prefalign.errors import ConfigError
from prefalign.modeling.load import load_causal_lm

TRAINED_POSITIONS = 32  # the copy's max_position_embeddings: model_max_length 96 -> factor ceil(96 / 32) = 3


@pytest.fixture
def short_model_dir(tiny_model_dir, tmp_path):
    """The tiny Llama, told it was trained on 32 positions (RoPE has no weights: only the config changes)."""
    path = tmp_path / "short"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = TRAINED_POSITIONS
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def _by_hand(model_dir, rope_parameters, max_positions):
    """transformers' Llama rotary embedding of the same model with the RoPE config written by hand."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = AutoConfig.from_pretrained(model_dir)
    config.rope_parameters = rope_parameters
    config.max_position_embeddings = max_positions
    return LlamaRotaryEmbedding(config)


def _cos_sin(rotary, length):
    x = torch.zeros(1, length, 8)
    return rotary(x, torch.arange(length)[None])


# factor 3 = ceil(96 / 32); 10000 is the tiny Llama's rope_theta (transformers' default)
HAND_WRITTEN = {
    "linear": {"rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 10000.0, "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 3.0, "rope_theta": 10000.0, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "factor": 3.0, "rope_theta": 10000.0, "original_max_position_embeddings": 32,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


@pytest.mark.parametrize("kind", sorted(HAND_WRITTEN))
def test_rope_scaling_positions_equal_transformers_with_the_config_written_by_hand(short_model_dir, kind):
    """96 positions on a model trained on 32: factor 3, max positions 96; cos/sin at 150 positions (past
    the 96 too, where dynamic NTK rescales) equal transformers' own rotary embedding of that config."""
    model = load_causal_lm(short_model_dir, ModelArguments(model_name_or_path=short_model_dir, rope_scaling=kind,
                                                           model_max_length=96))
    assert model.config.max_position_embeddings == 96
    assert model.config.rope_parameters == HAND_WRITTEN[kind]
    expected = _cos_sin(_by_hand(short_model_dir, HAND_WRITTEN[kind], 96), 150)
    unscaled = _cos_sin(_by_hand(short_model_dir, {"rope_type": "default", "rope_theta": 10000.0}, 32), 150)
    got = _cos_sin(model.model.rotary_emb, 150)
    for g, e, u in zip(got, expected, unscaled):
        assert torch.allclose(g, e, atol=1e-6, rtol=0)
        assert not torch.allclose(g, u, atol=1e-3)  # scaling did change the positions


def test_rope_scaling_within_the_trained_positions_scales_nothing(short_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="prefalign.modeling.model_config"):
        model = load_causal_lm(short_model_dir, ModelArguments(model_name_or_path=short_model_dir,
                                                               rope_scaling="linear", model_max_length=32))
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert model.config.max_position_embeddings == 32
    assert "model_max_length 32 is within the model's 32 positions; RoPE is not scaled" in caplog.text


def test_model_max_length_is_cutoff_len_unless_given():
    base = {"model_name_or_path": "m", "dataset": "d", "output_dir": "out", "rope_scaling": "yarn"}
    assert build_config({**base, "cutoff_len": 300}).model.model_max_length == 300
    assert build_config({**base, "cutoff_len": 300, "model_max_length": 4096}).model.model_max_length == 4096
    with pytest.raises(ConfigError, match="rope_scaling: 'ntk' is not one of linear, dynamic, yarn, llama3"):
        build_config({**base, "rope_scaling": "ntk"})


def test_at_inference_an_unset_model_max_length_stays_unset_as_in_llamafactory():
    """LF 0.9.5 sets model_max_length = cutoff_len in training only; chat and eval leave it unset, export takes
    a cutoff_len the config gives (hparams/parser.py)."""
    base = {"model_name_or_path": "m", "dataset": "d", "output_dir": "out", "rope_scaling": "linear"}
    assert build_config(base, command="chat").model.model_max_length is None
    assert build_config({**base, "cutoff_len": 300}, command="eval").model.model_max_length is None
    assert build_config({**base, "cutoff_len": 300}, command="export").model.model_max_length == 300
    assert build_config(base, command="export").model.model_max_length is None
    assert build_config({**base, "model_max_length": 96}, command="chat").model.model_max_length == 96
    assert build_config({**base, "cutoff_len": 300}, command="data").model.model_max_length == 300


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_inference_without_model_max_length_scales_by_two_as_llamafactory(short_model_dir, kind):
    """LF's inference rule (model_utils/rope.py, model_max_length unset): factor 2, max positions 2 x 32; the
    rotary embedding equals transformers' own of that config written by hand, through the inference loader
    that chat, eval and export use."""
    from prefalign.modeling.load import load_inference_policy

    hand = {**HAND_WRITTEN[kind], "factor": 2.0}
    config = build_config({"model_name_or_path": short_model_dir, "dataset": "d", "output_dir": "out",
                           "rope_scaling": kind}, command="chat")
    model = load_inference_policy(config.model)
    assert model.config.max_position_embeddings == 64 and model.config.rope_parameters == hand
    expected = _cos_sin(_by_hand(short_model_dir, hand, 64), 100)
    unscaled = _cos_sin(_by_hand(short_model_dir, {"rope_type": "default", "rope_theta": 10000.0}, 32), 100)
    for g, e, u in zip(_cos_sin(model.model.rotary_emb, 100), expected, unscaled):
        assert torch.allclose(g, e, atol=1e-6, rtol=0)
        assert not torch.allclose(g, u, atol=1e-3)


def test_a_training_runs_policy_has_the_scaled_positions(short_model_dir, tmp_path):
    """Through the workflow: cutoff_len 96 on the 32-position model, the LoRA policy's rotary embedding
    (and so its adapter-off reference's) is transformers' linear scaling by 3."""
    from prefalign.train.workflow import build_trainer

    trainer = build_trainer(config_for(short_model_dir, tmp_path / "run", rope_scaling="linear", cutoff_len=96))
    rotary = trainer.model.get_base_model().model.rotary_emb
    expected = _cos_sin(_by_hand(short_model_dir, HAND_WRITTEN["linear"], 96), 96)
    for g, e in zip(_cos_sin(rotary, 96), expected):
        assert torch.allclose(g, e, atol=1e-6, rtol=0)


def _tiny_moe(model_dir, path, kind):
    """A tiny random Mixtral or Qwen2-MoE (4 experts, 2 per token) with the tiny Llama's tokenizer."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                  num_experts_per_tok=2, router_aux_loss_coef=0.001)
    if kind == "mixtral":
        config, cls = MixtralConfig(**common, num_local_experts=4), MixtralForCausalLM
    else:
        config, cls = Qwen2MoeConfig(**common, num_experts=4, moe_intermediate_size=32,
                                     shared_expert_intermediate_size=32), Qwen2MoeForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_aux_loss_is_the_preference_loss_plus_coef_times_transformers_router_loss(tiny_model_dir, tmp_path, kind):
    """moe_aux_loss_coef 0.5: the training loss of a batch is sigmoid DPO (by hand) + 0.5 x the `aux_loss`
    transformers' own causal LM forward returns for the same rows (its load-balancing loss over the 2B
    rows, padding masked); the reference (the adapter switched off) adds nothing."""
    from helpers import first_batch, textbook_dpo_loss

    from prefalign.train.workflow import build_trainer

    model_dir = _tiny_moe(tiny_model_dir, tmp_path / kind, kind)
    trainer = build_trainer(config_for(model_dir, tmp_path / "run", moe_aux_loss_coef=0.5, pref_beta=0.1,
                                       lora_target="q_proj,v_proj", max_steps=1))
    model = trainer.model
    assert model.config.router_aux_loss_coef == 0.5 and model.config.output_router_logits is True
    batch = first_batch(trainer)
    model.eval()  # no dropout; the router is deterministic
    with torch.no_grad():
        loss, _, policy = trainer.batch_loss(model, batch)
        preference = textbook_dpo_loss(model, batch, beta=0.1)
        aux = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_router_logits=True).aux_loss
    assert aux > 0.1  # the load-balancing loss is ~ top_k for a random router, far from 0
    assert torch.allclose(policy.router_aux_loss, 0.5 * aux, atol=1e-6, rtol=0)
    assert torch.allclose(loss, preference + 0.5 * aux, atol=1e-5, rtol=0)


def test_moe_aux_loss_coef_leaves_models_that_are_not_trained_alone(tiny_model_dir, tmp_path):
    """Only the policy being trained gets router logits; a dense model gets a warning and no change."""
    model_dir = _tiny_moe(tiny_model_dir, tmp_path / "moe", "mixtral")
    args = ModelArguments(model_name_or_path=model_dir, moe_aux_loss_coef=0.5)
    assert load_causal_lm(model_dir, args).config.output_router_logits is False
    assert load_causal_lm(model_dir, args, trainable=True).config.output_router_logits is True
    dense = load_causal_lm(tiny_model_dir, ModelArguments(model_name_or_path=tiny_model_dir, moe_aux_loss_coef=0.5),
                           trainable=True)
    assert not getattr(dense.config, "output_router_logits", False)
