"""early_stopping_steps (LLaMA-Factory): transformers' EarlyStoppingCallback with that patience."""

import pytest
from helpers import config_for

from prefalign.config import build_config
from prefalign.errors import ConfigError
from prefalign.train.workflow import build_trainer


@pytest.mark.parametrize("patience", [1, 2])
def test_training_stops_after_patience_evaluations_without_improvement(tiny_model_dir, tmp_path, patience):
    """The metric is eval_loss with greater_is_better: true, so every evaluation after the first (the loss
    falls as DPO trains) is no improvement: transformers' rule stops after step 1 + patience of max_steps 8."""
    trainer = build_trainer(config_for(
        tiny_model_dir, tmp_path, early_stopping_steps=patience, val_size=4, eval_strategy="steps", eval_steps=1,
        metric_for_best_model="eval_loss", greater_is_better=True, max_steps=8, learning_rate=1e-2))
    trainer.train()
    losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert all(b < a for a, b in zip(losses, losses[1:]))  # each evaluation worse by the metric's direction
    assert trainer.state.global_step == 1 + patience


def test_early_stopping_names_what_it_needs():
    with pytest.raises(ConfigError) as info:
        build_config({"model_name_or_path": "m", "dataset": "d", "early_stopping_steps": 3})
    assert [p.split(":")[0] for p in info.value.problems] == [
        "early_stopping_steps needs evaluations", "early_stopping_steps needs metric_for_best_model, the metric that "
        "must improve, e.g. eval_loss (or rewards/accuracies with greater_is_better", "early_stopping_steps needs "
        "held-out data"]
