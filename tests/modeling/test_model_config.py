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


def test_a_training_runs_policy_has_the_scaled_positions(short_model_dir, tmp_path):
    """Through the workflow: cutoff_len 96 on the 32-position model, the LoRA policy's rotary embedding
    (and so its adapter-off reference's) is transformers' linear scaling by 3."""
    from prefalign.train.workflow import build_trainer

    trainer = build_trainer(config_for(short_model_dir, tmp_path / "run", rope_scaling="linear", cutoff_len=96))
    rotary = trainer.model.get_base_model().model.rotary_emb
    expected = _cos_sin(_by_hand(short_model_dir, HAND_WRITTEN["linear"], 96), 96)
    for g, e in zip(_cos_sin(rotary, 96), expected):
        assert torch.allclose(g, e, atol=1e-6, rtol=0)
