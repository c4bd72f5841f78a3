"""Every registered loss, and the modifiers that need per-token values, through a real tiny training run."""

import math

import pytest
from helpers import config_for

from prefalign.data.collate import PairCollator
from prefalign.losses import LOSSES
from prefalign.scoring import Scorer
from prefalign.train.workflow import build_trainer

EXTRA = {"exo_pair": {"dpo_label_smoothing": 0.1}}
# DiscoPOP's gradient at policy = reference points the wrong way (tests/test_losses.py,
# test_discopop_is_not_monotone_at_zero), so from the step-0 policy its margin need not rise.
NOT_MONOTONE_AT_START = {"discopop"}


def mean_margin(trainer, config, averaged: bool) -> float:
    """The policy's mean log π(chosen) - log π(rejected) over the training pairs (length-averaged if `averaged`)."""
    scorer = Scorer(trainer.model, trainer.reference, config.objective)
    rows, _ = scorer.score(trainer.train_dataset, PairCollator(trainer.processing_class.pad_token_id),
                           batch_size=len(trainer.train_dataset), device=trainer.args.device, split="train")
    if averaged:
        margins = [r["policy_chosen_logps"] / r["chosen_tokens"] - r["policy_rejected_logps"] / r["rejected_tokens"]
                   for r in rows]
    else:
        margins = [r["policy_chosen_logps"] - r["policy_rejected_logps"] for r in rows]
    return sum(margins) / len(margins)


# the pair losses; the unpaired ones (stage: kto) train in tests/test_kto.py
@pytest.mark.parametrize("loss", sorted(name for name, spec in LOSSES.items() if not spec.unpaired))
def test_each_loss_trains_and_moves_the_margin_towards_chosen(loss, tiny_model_dir, tmp_path):
    """Two steps on the 8 training pairs: finite losses, and the margin the loss reads (summed or
    length-averaged) grows on those pairs, as the loss asks (the reference is fixed, so the
    policy's margin moves as β·Δ does)."""
    config = config_for(tiny_model_dir, tmp_path, pref_loss=loss, max_steps=2, max_samples=8,
                        **EXTRA.get(loss, {}))
    trainer = build_trainer(config)
    if not LOSSES[loss].needs_reference:
        assert trainer.reference.name == "none"  # reference-free: nothing loaded, nothing run
    averaged = LOSSES[loss].averaged
    before = mean_margin(trainer, config, averaged)
    trainer.train()
    after = mean_margin(trainer, config, averaged)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(math.isfinite(h["loss"]) for h in logged)
    assert all(math.isfinite(h["rewards/margins"]) for h in logged)
    if loss not in NOT_MONOTONE_AT_START:
        assert after > before, f"{loss}: margin {before:.6f} -> {after:.6f}"


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
