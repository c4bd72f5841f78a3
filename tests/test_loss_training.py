"""Every registered loss, and the modifiers that need per-token values, through a real tiny training run."""

import math

import pytest
from helpers import config_for

from prefalign.losses import LOSSES
from prefalign.train.workflow import build_trainer

EXTRA = {"exo_pair": {"dpo_label_smoothing": 0.1}}


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_each_loss_trains_with_finite_loss(loss, tiny_model_dir, tmp_path):
    config = config_for(tiny_model_dir, tmp_path, pref_loss=loss, max_steps=2, max_samples=8,
                        **EXTRA.get(loss, {}))
    trainer = build_trainer(config)
    if not LOSSES[loss].needs_reference:
        assert trainer.reference.name == "none"  # reference-free: nothing loaded, nothing run
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(math.isfinite(h["loss"]) for h in logged)
    assert all(math.isfinite(h["rewards/margins"]) for h in logged)


@pytest.mark.parametrize("modifiers", [
    {"ld_alpha": 0.5},
    {"use_weighting": True},
    {"pref_ftx": 1.0},
    {"pref_loss": "sigmoid,bco_pair,sft", "pref_loss_weights": "0.8,0.2,1.0"},
    {"pref_bco_weight": 0.5},
    {"f_divergence_type": "js_divergence"},
], ids=lambda m: ",".join(m))
def test_modifiers_train_with_finite_loss(modifiers, tiny_model_dir, tmp_path):
    trainer = build_trainer(config_for(tiny_model_dir, tmp_path, max_steps=2, max_samples=8, **modifiers))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(math.isfinite(h["loss"]) for h in logged)
    if "pref_ftx" in modifiers:
        assert "sft_loss" in logged[0]
    if "pref_loss_weights" in modifiers:
        assert {"loss/sigmoid", "loss/bco_pair", "loss/sft"} <= set(logged[0])
