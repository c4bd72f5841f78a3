"""The preference metrics people read, per pair, under the names TRL and LLaMA-Factory log."""

from __future__ import annotations

import torch

from prefalign.contracts import LossOutput, PairLogps


def pair_metrics(out: LossOutput, policy: PairLogps) -> dict[str, torch.Tensor]:
    """Per-pair values, shape (B,), detached fp32: rewards, accuracies, margins, log-probs, mean logits,
    and whatever extra metrics the loss reported (`sft_loss`, `odds_ratio_loss`, `loss/<name>`, ...)."""
    values = {
        "rewards/chosen": out.chosen_rewards,
        "rewards/rejected": out.rejected_rewards,
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
        "rewards/margins": out.chosen_rewards - out.rejected_rewards,
        "logps/chosen": policy.chosen,
        "logps/rejected": policy.rejected,
    }
    if policy.chosen_mean_logit is not None:
        values["logits/chosen"] = policy.chosen_mean_logit
        values["logits/rejected"] = policy.rejected_mean_logit
    values.update(out.metrics)
    return {key: value.detach().float() for key, value in values.items()}
