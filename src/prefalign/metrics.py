"""The preference metrics people read, per pair, under the names TRL and LLaMA-Factory log."""

from __future__ import annotations

import torch

from prefalign.contracts import LossOutput, PairLogps


def pair_metrics(out: LossOutput, policy: PairLogps) -> dict[str, torch.Tensor]:
    """Per-pair values, shape (B,), detached fp32: rewards, accuracies, margins, log-probs, mean logits,
    and whatever extra metrics the loss reported (`sft_loss`, `odds_ratio_loss`, `loss/<name>`, ...).

    NaN marks a value that is not defined for a pair; it counts in neither the sum nor the count
    (`sum_and_count`). Unpaired (KTO) examples get `example_metrics` instead.
    """
    if policy.desirable is not None:
        return example_metrics(out, policy)
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


def example_metrics(out: LossOutput, policy: PairLogps) -> dict[str, torch.Tensor]:
    """Per-example values of a KTO batch, (B,), under TRL's names: `rewards/chosen` and `logps/chosen` over
    desirable examples, `rewards/rejected` and `logps/rejected` over undesirable ones (NaN on the others),
    `count/chosen` and `count/rejected` (1 on the examples of that label; logged as the number of them),
    and the loss's metrics (`kl`)."""
    desirable = policy.desirable.bool()
    nan = torch.full_like(policy.chosen, float("nan"))
    values = {
        "rewards/chosen": out.chosen_rewards,
        "rewards/rejected": out.rejected_rewards,
        "logps/chosen": torch.where(desirable, policy.chosen, nan),
        "logps/rejected": torch.where(desirable, nan, policy.chosen),
        "count/chosen": desirable.float(),  # logged as totals (`reduced`)
        "count/rejected": (~desirable).float(),
    }
    if policy.chosen_mean_logit is not None:
        values["logits/chosen"] = torch.where(desirable, policy.chosen_mean_logit, nan)
        values["logits/rejected"] = torch.where(desirable, nan, policy.chosen_mean_logit)
    values.update(out.metrics)
    return {key: value.detach().float() for key, value in values.items()}


def sum_and_count(value: torch.Tensor) -> torch.Tensor:
    """(2,): the sum of a metric's defined (non-NaN) values and their number, for means that are exact
    across micro-batches and processes."""
    defined = ~torch.isnan(value)
    return torch.stack([torch.where(defined, value, 0.0).sum(), defined.sum().to(value.dtype)])


def reduced(key: str, total: float, count: float) -> float | None:
    """A metric's logged value from its summed `sum_and_count` over micro-batches and processes: the mean
    of its defined values, or for `count/*` their total (LLaMA-Factory's `count/chosen`); None when no
    value was defined (e.g. no undesirable example in the logged steps), so the key is left out."""
    if key.startswith("count/"):
        return total
    return total / count if count else None
