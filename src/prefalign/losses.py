"""Preference losses: one pure function per loss over per-sequence log-probabilities.

Every loss takes the policy's `PairLogps`, the reference's (None for reference-free losses) and
`LossSettings`, and returns a `LossOutput` whose tensors have shape (B,). `LOSSES` maps a
`pref_loss` name to its function, says whether it needs a reference model and whether it reads
summed or length-averaged log-probs. `compute_preference_loss` combines weighted losses and applies
the modifiers (LD-DPO, WPO, the BCO mix, the SFT term).

Notation in the docstrings: s+ = log π(y+) - log π_ref(y+), s- likewise for y-, Δ = s+ - s-,
β = `LossSettings.beta`, σ the logistic function, ε = `LossSettings.label_smoothing`. A bar
(s̄+, Δ̄) marks the same quantities on length-averaged log-probs (sum / number of response tokens).
Rewards reported in `LossOutput` are β times the log-ratios the loss reads (β·s+, β·s-); for
reference-free losses, β times the policy log-probs the loss reads. Both are detached.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from prefalign.contracts import LossOutput, PairLogps
from prefalign.distributed import mean_across_processes
from prefalign.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class LossSettings:
    """The hyper-parameters losses read, mapped from the config keys named in each field's docstring."""

    beta: float = 0.1
    """`pref_beta`: β, the inverse temperature on log-ratios (ORPO: the weight λ of its odds-ratio term)."""

    label_smoothing: float = 0.0
    """`dpo_label_smoothing`: ε in [0, 0.5), the assumed rate of flipped labels (sigmoid, robust, exo_pair, aot*)."""

    simpo_gamma: float = 0.5
    """`simpo_gamma`: γ, SimPO's target reward margin, subtracted after scaling by β (SimPO eq. 6)."""

    ftx: float = 0.0
    """`pref_ftx`: weight of the chosen responses' length-averaged NLL added to the loss (RPO)."""

    discopop_tau: float = 0.05
    """`discopop_tau`: τ, the temperature of DiscoPOP's blend between logistic and exponential losses."""

    ld_alpha: float | None = None
    """`ld_alpha`: α in [0, 1] of LD-DPO, the weight of response tokens beyond the shorter response; None: off."""

    bco_weight: float = 0.0
    """`pref_bco_weight`: w of the BCO mix, loss = (loss + w·bco_pair) / (1 + w); 0: off."""

    use_weighting: bool = False
    """`use_weighting`: weight each pair's loss by its WPO weight (how likely the policy is to sample the pair)."""

    f_divergence_type: str = "reverse_kl"
    """`f_divergence_type`: the f-divergence of f-DPO for pref_loss=sigmoid: reverse_kl (DPO), forward_kl,
    js_divergence or alpha_divergence."""

    f_alpha_divergence_coef: float = 1.0
    """`f_alpha_divergence_coef`: α of the alpha divergence (f_divergence_type=alpha_divergence), > 0."""

    kto_chosen_weight: float = 1.0
    """`kto_chosen_weight`: λ_D, the weight of a desirable example's loss (unpaired losses, stage: kto)."""

    kto_rejected_weight: float = 1.0
    """`kto_rejected_weight`: λ_U, the weight of an undesirable example's loss (unpaired losses, stage: kto)."""


LossFn = Callable[[PairLogps, "PairLogps | None", LossSettings], LossOutput]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function and what it needs."""

    fn: LossFn
    needs_reference: bool
    averaged: bool
    """Reads length-averaged log-probs (so LD-DPO, which reweighs summed log-probs, does not apply)."""
    paper: str
    reads: frozenset[str] = frozenset()
    """The `LossSettings` fields it reads besides `beta`; a setting that no chosen loss reads is a config error."""
    per_pair: bool = True
    """losses[i] belongs to pair i. False for AOT, whose losses are per quantile of the batch."""
    constraints: tuple["Constraint", ...] = ()
    """What this loss needs of the settings beyond their general ranges (checked with the config)."""
    unpaired: bool = False
    """Reads unpaired examples (stage: kto): `PairLogps.desirable`, each example's reply on the chosen
    side and its KL completion on the rejected side; it cannot read pairs, nor a pair loss examples."""


@dataclass(frozen=True)
class Constraint:
    """A condition a loss puts on one `LossSettings` field, with the problem line shown when it fails."""

    field: str
    ok: Callable[[float], bool]
    problem: str
    """Formatted with `value=`: names the config key, the loss and the fix."""


# --------------------------------------------------------------------------------------------------
# Helpers


def _log_ratios(
    policy: PairLogps, reference: PairLogps | None, averaged: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """s+ = log π(y+) - log π_ref(y+) and s- likewise, each (B,); on length-averaged log-probs if `averaged`."""
    if reference is None:
        raise ValueError(
            "this loss needs reference log-probs but got reference=None; the trainer must compute them "
            "for every loss whose LossSpec.needs_reference is True"
        )
    if averaged:
        return policy.chosen_avg - reference.chosen_avg, policy.rejected_avg - reference.rejected_avg
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


def _output(
    losses: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    s: LossSettings,
    metrics: dict[str, torch.Tensor] | None = None,
) -> LossOutput:
    """A LossOutput whose rewards are β·chosen and β·rejected, detached."""
    return LossOutput(losses, s.beta * chosen.detach(), s.beta * rejected.detach(), metrics or {})


def _smoothed_logistic(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1-ε) log σ(x) - ε log σ(-x): the logistic loss against a label flipped with probability ε."""
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


# exp() of a log-ratio overflows float32 above ~88; beyond this cap the loss is saturated anyway.
_MAX_EXP = 80.0


def _capped_exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x.clamp(max=_MAX_EXP))


def _log1mexp(p: torch.Tensor) -> torch.Tensor:
    """log(1 - e^p) for p < 0, accurate near 0 and for very negative p (Mächler 2012).

    Each branch sees only inputs in its own range, so the branch torch.where discards cannot
    produce an infinite gradient (which would turn into NaN).
    """
    cut = -math.log(2.0)
    near_zero = torch.log(-torch.expm1(p.clamp(min=cut)))
    far = torch.log1p(-torch.exp(p.clamp(max=cut)))
    return torch.where(p > cut, near_zero, far)


def _log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) from log p, computed as log p - log(1 - e^(log p)); p = 1 is clamped just below 1."""
    avg_logp = avg_logp.clamp(max=-torch.finfo(avg_logp.dtype).eps)
    return avg_logp - _log1mexp(avg_logp)


# f'(u) of f-DPO (Wang et al. 2023, Table 1), u = π/π_ref, written in s = log u and with additive
# constants dropped (they cancel in f'(u+) - f'(u-)). Each takes (s, alpha) and returns shape of s.
F_DIVERGENCES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    # f(u) = u log u; f'(u) = log u + 1
    "reverse_kl": lambda s, alpha: s,
    # f(u) = -log u; f'(u) = -1/u
    "forward_kl": lambda s, alpha: -_capped_exp(-s),
    # f(u) = u log u - (1+u) log((1+u)/2); f'(u) = log(2u/(1+u)) = log 2 + s - softplus(s)
    "js_divergence": lambda s, alpha: s - F.softplus(s),
    # f(u) = (u^(1-α) - (1-α)u - α) / (α(α-1)); f'(u) = (1 - u^(-α)) / α
    "alpha_divergence": lambda s, alpha: -_capped_exp(-alpha * s) / alpha,
}


# --------------------------------------------------------------------------------------------------
# Losses with a reference model (summed log-probs unless stated)


def sigmoid_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7): -log σ(βΔ).

    With label smoothing ε (conservative DPO, Mitchell 2023, eq. 3): -(1-ε) log σ(βΔ) - ε log σ(-βΔ).
    With `f_divergence_type` other than reverse_kl (f-DPO, Wang et al. 2023, arXiv:2309.16240),
    βΔ becomes β(f'(u+) - f'(u-)) with u = π/π_ref = e^s; see `F_DIVERGENCES`.
    """
    chosen, rejected = _log_ratios(policy, reference)
    f_prime = F_DIVERGENCES[s.f_divergence_type]
    alpha = s.f_alpha_divergence_coef
    logits = s.beta * (f_prime(chosen, alpha) - f_prime(rejected, alpha))
    return _output(_smoothed_logistic(logits, s.label_smoothing), chosen, rejected, s)


def robust_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409), an unbiased loss under label noise ε:

    [-(1-ε) log σ(βΔ) + ε log σ(-βΔ)] / (1 - 2ε).
    """
    eps = s.label_smoothing  # in [0, 0.5): the registry entry's constraint, checked with the config
    chosen, rejected = _log_ratios(policy, reference)
    logits = s.beta * (chosen - rejected)
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return _output(losses, chosen, rejected, s)


def hinge_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """SLiC hinge loss (Zhao et al. 2023, arXiv:2305.10425, calibration loss with margin 1 and the
    DPO log-ratio as score, as in the DPO authors' code): max(0, 1 - βΔ)."""
    chosen, rejected = _log_ratios(policy, reference)
    return _output(torch.relu(1 - s.beta * (chosen - rejected)), chosen, rejected, s)


def ipo_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17): (Δ̄ - 1/(2β))², β playing the role of τ.

    Δ̄ is the difference of log-ratios of length-averaged log-probs, as in the IPO authors' runs.
    """
    chosen, rejected = _log_ratios(policy, reference, averaged=True)
    return _output((chosen - rejected - 1 / (2 * s.beta)) ** 2, chosen, rejected, s)


def kto_pair_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """Paired KTO (Ethayarajh et al. 2024, arXiv:2402.01306, the KTO loss with λ_D = λ_U = 1).

    The KL reference point z0 is estimated from the batch, as in the paired form TRL and LLaMA-Factory
    used: z+ = max(0, mean_batch s+), z- = max(0, mean_batch s-), detached (the paper does not
    back-propagate through z0). Each chosen reply is measured against the rejected replies' z- and
    each rejected reply against z+; the per-pair loss is the sum of both terms:

        [1 - σ(β(s+ - z-))] + [1 - σ(β(z+ - s-))].

    (TRL concatenated the two halves and took the mean, which is half of this per pair.) z+, z- are
    batch statistics, so the loss of a pair depends on the other pairs of its (micro-)batch.
    """
    chosen, rejected = _log_ratios(policy, reference)
    chosen_kl = chosen.detach().mean().clamp(min=0)
    rejected_kl = rejected.detach().mean().clamp(min=0)
    losses = (1 - torch.sigmoid(s.beta * (chosen - rejected_kl))) + (1 - torch.sigmoid(s.beta * (chosen_kl - rejected)))
    return _output(losses, chosen, rejected, s)


def bco_pair_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """Paired BCO (Jung et al. 2024, arXiv:2404.04656, without the reward shift δ):

    -log σ(βs+) - log σ(-βs-).

    The paper's δ is a running mean of the rewards; it is left out so the loss stays a pure function
    of the batch.
    """
    chosen, rejected = _log_ratios(policy, reference)
    losses = -F.logsigmoid(s.beta * chosen) - F.logsigmoid(-s.beta * rejected)
    return _output(losses, chosen, rejected, s)


def sppo_hard_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv:2405.00675, eq. 4.7 with P(y+ ≻ y-) = 1):

    (s+ - 1/(2β))² + (s- + 1/(2β))².
    """
    chosen, rejected = _log_ratios(policy, reference)
    half = 1 / (2 * s.beta)
    return _output((chosen - half) ** 2 + (rejected + half) ** 2, chosen, rejected, s)


def nca_pair_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """NCA for pairs (Chen et al. 2024, arXiv:2402.05369, with K = 2 and a hard preference):

    -log σ(βs+) - ½ log σ(-βs+) - ½ log σ(-βs-).
    """
    chosen, rejected = _log_ratios(policy, reference)
    a, b = s.beta * chosen, s.beta * rejected
    losses = -F.logsigmoid(a) - 0.5 * F.logsigmoid(-a) - 0.5 * F.logsigmoid(-b)
    return _output(losses, chosen, rejected, s)


def exo_pair_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """EXO for pairs (Ji et al. 2024, arXiv:2402.00856, eq. 16 with K = 2): the reverse KL from the
    policy's preference distribution (σ(βΔ), σ(-βΔ)) to the label distribution (1-ε, ε):

    σ(βΔ) [log σ(βΔ) - log(1-ε)] + σ(-βΔ) [log σ(-βΔ) - log ε].

    ε > 0 is required (log ε); the EXO paper uses ε = 1e-3.
    """
    eps = s.label_smoothing  # in (0, 0.5): the registry entry's constraint, checked with the config
    chosen, rejected = _log_ratios(policy, reference)
    logits = s.beta * (chosen - rejected)
    losses = torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log(1 - eps)) + torch.sigmoid(-logits) * (
        F.logsigmoid(-logits) - math.log(eps)
    )
    return _output(losses, chosen, rejected, s)


def aot_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """AOT for paired data (Melnyk et al. 2024, arXiv:2406.05882, logistic loss): the policy's
    log-ratios log π(y+) - log π(y-) and the reference's are each sorted over the batch, and the i-th
    smallest are compared: d_i = sort(π-diff)_i - sort(ref-diff)_i, losses_i = -(1-ε) log σ(βd_i) -
    ε log σ(-βd_i). This asks the policy's margin distribution to dominate the reference's in first
    order. losses[i] belongs to the i-th quantile, not to pair i; rewards are per pair as usual.
    """
    chosen, rejected = _log_ratios(policy, reference)
    policy_sorted, _ = torch.sort(policy.chosen - policy.rejected, dim=0)
    reference_sorted, _ = torch.sort(reference.chosen - reference.rejected, dim=0)
    losses = _smoothed_logistic(s.beta * (policy_sorted - reference_sorted), s.label_smoothing)
    return _output(losses, chosen, rejected, s)


def aot_unpaired_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """AOT for unpaired data (Melnyk et al. 2024, arXiv:2406.05882, logistic loss; TRL's `aot_pair`):
    s+ and s- are each sorted over the batch, d_i = sort(s+)_i - sort(s-)_i,
    losses_i = -(1-ε) log σ(βd_i) - ε log σ(-βd_i), asking the chosen rewards' distribution to
    dominate the rejected rewards'. losses[i] belongs to the i-th quantile, not to pair i.
    """
    chosen, rejected = _log_ratios(policy, reference)
    chosen_sorted, _ = torch.sort(chosen, dim=0)
    rejected_sorted, _ = torch.sort(rejected, dim=0)
    losses = _smoothed_logistic(s.beta * (chosen_sorted - rejected_sorted), s.label_smoothing)
    return _output(losses, chosen, rejected, s)


def apo_zero_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7): raise the chosen likelihood, lower
    the rejected one, for chosen replies better than the model's own: [1 - σ(βs+)] + σ(βs-).
    """
    chosen, rejected = _log_ratios(policy, reference)
    losses = (1 - torch.sigmoid(s.beta * chosen)) + torch.sigmoid(s.beta * rejected)
    return _output(losses, chosen, rejected, s)


def apo_down_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 8): lower both likelihoods, the rejected
    one more, for chosen replies worse than the model's own: σ(βs+) + [1 - σ(βΔ)].
    """
    chosen, rejected = _log_ratios(policy, reference)
    losses = torch.sigmoid(s.beta * chosen) + (1 - torch.sigmoid(s.beta * (chosen - rejected)))
    return _output(losses, chosen, rejected, s)


def discopop_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, arXiv:2406.08414, eq. 5), x = βΔ:

    (1 - σ(x/τ)) · (-log σ(x)) + σ(x/τ) · e^(-x),   τ = discopop_tau.

    Note: the loss is not monotone near x = 0: its derivative there is (1 - ln 2)/(4τ) - 3/4, positive
    for τ < 0.102 (the default τ = 0.05 included), so at the very first step, where the policy equals
    the reference (Δ = 0), the gradient lowers the margin until |x| leaves a band of width ~τ.
    """
    chosen, rejected = _log_ratios(policy, reference)
    logits = s.beta * (chosen - rejected)
    modulation = torch.sigmoid(logits / s.discopop_tau)
    losses = (1 - modulation) * -F.logsigmoid(logits) + modulation * _capped_exp(-logits)
    return _output(losses, chosen, rejected, s)


def sigmoid_norm_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """Length-normalised DPO (Tülu 3, Lambert et al. 2024, arXiv:2411.15124): -log σ(βΔ̄)."""
    chosen, rejected = _log_ratios(policy, reference, averaged=True)
    return _output(-F.logsigmoid(s.beta * (chosen - rejected)), chosen, rejected, s)


# --------------------------------------------------------------------------------------------------
# Unpaired losses (stage: kto). Each example i has a reply y_i and a label; r_i = log π(y_i|x_i) -
# log π_ref(y_i|x_i) is read from the chosen side. The rejected side holds the KL completion y'_i
# (another example's reply after x_i, data/feedback.py). Rewards are β·r_i, reported as
# `chosen_rewards` on desirable examples and `rejected_rewards` on undesirable ones (NaN elsewhere).


def _desirable(policy: PairLogps) -> torch.Tensor:
    if policy.desirable is None:
        raise ValueError("an unpaired loss needs PairLogps.desirable (the examples' labels); scoring.score_batch "
                         "sets it from batch['desirable'], which the collators copy from KTO examples")
    return policy.desirable.bool()


def kl_reference_point(policy: PairLogps, reference: PairLogps) -> torch.Tensor:
    """KTO's reference point z_ref (Ethayarajh et al. 2024, §4.1; TRL's KTOTrainer), a detached scalar:

        z_ref = max(0, mean_i [log π(y'_i|x_i) - log π_ref(y'_i|x_i)])

    over the batch's KL completions y'_i (mismatched pairs: an estimate of KL(π || π_ref) that carries
    no gradient). While training (gradients on), the batch mean is averaged across processes before
    the clamp, as TRL does, so every process uses the same z_ref; scoring without gradients (eval,
    which may run on one process alone) uses its own batch's.
    """
    kl = (policy.rejected - reference.rejected).detach().mean()
    if torch.is_grad_enabled():
        kl = mean_across_processes(kl)
    return kl.clamp(min=0)


def _unpaired_output(losses: torch.Tensor, logratios: torch.Tensor, desirable: torch.Tensor, s: LossSettings,
                     metrics: dict[str, torch.Tensor]) -> LossOutput:
    """Weighted per-example losses (λ_D on desirable, λ_U on undesirable) and the rewards split by label."""
    weights = torch.where(desirable, s.kto_chosen_weight, s.kto_rejected_weight).to(losses.dtype)
    rewards = s.beta * logratios.detach()
    nan = torch.full_like(rewards, float("nan"))
    return LossOutput(weights * losses, torch.where(desirable, rewards, nan), torch.where(desirable, nan, rewards),
                      metrics)


def kto_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 8, as λ_y - v(x, y)), per example:

        desirable:   λ_D · [1 - σ(β(r - z_ref))]
        undesirable: λ_U · [1 - σ(β(z_ref - r))]

    with z_ref = `kl_reference_point` and λ_D, λ_U = kto_chosen_weight, kto_rejected_weight. The mean
    over the batch is TRL's loss (TRL concatenates the weighted desirable and undesirable losses and
    takes their mean). Metric `kl`: z_ref.
    """
    desirable = _desirable(policy)
    logratios = policy.chosen - reference.chosen
    z = kl_reference_point(policy, reference)
    losses = torch.where(desirable, 1 - torch.sigmoid(s.beta * (logratios - z)),
                         1 - torch.sigmoid(s.beta * (z - logratios)))
    return _unpaired_output(losses, logratios, desirable, s, {"kl": z.expand_as(logratios)})


def apo_zero_unpaired_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """APO-zero for unpaired data (D'Oosterlinck et al. 2024, arXiv:2408.06266; TRL's `apo_zero_unpaired`):

        desirable:   λ_D · [1 - σ(βr)]
        undesirable: λ_U · σ(βr)

    Raises the likelihood of desirable replies and lowers that of undesirable ones, with no reference
    point (the KL completions are not read).
    """
    desirable = _desirable(policy)
    logratios = policy.chosen - reference.chosen
    losses = torch.where(desirable, 1 - torch.sigmoid(s.beta * logratios), torch.sigmoid(s.beta * logratios))
    return _unpaired_output(losses, logratios, desirable, s, {})


def weight_balance_warning(desirable: int, undesirable: int, s: LossSettings) -> str | None:
    """The warning KTO's authors (§4.2) and TRL give when λ_D·n_D / (λ_U·n_U) is outside [1, 4/3]; None inside.

    The ratio keeps the desirable examples' share of the loss at or slightly above the undesirable
    ones'. `desirable` / `undesirable`: the training examples of each label.
    """
    if not desirable or not undesirable:
        missing = "desirable" if not desirable else "undesirable"
        return (f"stage: kto: the training data has no {missing} examples, so KTO learns from one label only; "
                f"add {missing} examples (a thumbs-{'up' if missing == 'desirable' else 'down'} reply)")
    ratio = s.kto_chosen_weight * desirable / (s.kto_rejected_weight * undesirable)
    if 1 <= ratio <= 4 / 3:
        return None
    low = undesirable * s.kto_rejected_weight / desirable
    return (f"stage: kto: kto_chosen_weight * {desirable} desirable / (kto_rejected_weight * {undesirable} undesirable) "
            f"= {ratio:.3g}, outside [1, 4/3] where the KTO paper recommends it; set kto_chosen_weight in "
            f"[{low:.3g}, {low * 4 / 3:.3g}] (with kto_rejected_weight={s.kto_rejected_weight:g})")


# --------------------------------------------------------------------------------------------------
# Reference-free losses (the reference argument is ignored and may be None)


def orpo_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv:2403.07691, eqs. 6-7), on length-averaged log-probs p̄ = log P̄(y|x):

    -p̄+ - β log σ(log-odds(p̄+) - log-odds(p̄-)),   log-odds(p) = p - log(1 - e^p),

    β being the paper's λ. Metrics: `sft_loss` (-p̄+) and `odds_ratio_loss` (-log σ(...), without β).
    """
    chosen, rejected = policy.chosen_avg, policy.rejected_avg
    odds_ratio = -F.logsigmoid(_log_odds(chosen) - _log_odds(rejected))
    nll = -chosen
    metrics = {"sft_loss": nll.detach(), "odds_ratio_loss": odds_ratio.detach()}
    return _output(nll + s.beta * odds_ratio, chosen, rejected, s, metrics)


def simpo_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv:2405.14734, eq. 6): -log σ(β p̄+ - β p̄- - γ), γ = simpo_gamma, p̄ the
    length-averaged policy log-probs.

    γ is the paper's γ. LLaMA-Factory computes -log σ(β(p̄+ - p̄- - γ/β)), which is the same number;
    SimPO's own code takes γ/β as its setting (`gamma_beta_ratio`): simpo_gamma = β · gamma_beta_ratio.
    """
    chosen, rejected = policy.chosen_avg, policy.rejected_avg
    losses = -F.logsigmoid(s.beta * (chosen - rejected) - s.simpo_gamma)
    return _output(losses, chosen, rejected, s)


def sft_loss(policy: PairLogps, reference: PairLogps | None, s: LossSettings) -> LossOutput:
    """Supervised fine-tuning on the chosen replies: the length-averaged NLL -p̄+ (e.g. MPO's generation
    term, Wang et al. 2024, arXiv:2411.10442). Metric `sft_loss`.
    """
    nll = policy.chosen_nll
    return _output(nll, policy.chosen_avg, policy.rejected_avg, s, {"sft_loss": nll.detach()})


# --------------------------------------------------------------------------------------------------
# Registry

_EPS = frozenset({"label_smoothing"})
_KTO_WEIGHTS = frozenset({"kto_chosen_weight", "kto_rejected_weight"})
_REF, _FREE = True, False  # needs_reference
_SUM, _AVG = False, True  # averaged

LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(
        sigmoid_loss, _REF, _SUM, "Rafailov et al. 2023 (DPO), arXiv:2305.18290",
        reads=frozenset({"label_smoothing", "f_divergence_type", "f_alpha_divergence_coef"}),
    ),
    "robust": LossSpec(
        robust_loss, _REF, _SUM, "Chowdhury et al. 2024 (rDPO), arXiv:2403.00409", reads=_EPS,
        constraints=(Constraint("label_smoothing", lambda v: 0 <= v < 0.5,
                                "pref_loss=robust divides by 1 - 2*dpo_label_smoothing, so dpo_label_smoothing={value} "
                                "is not allowed; use a value in [0, 0.5)"),),
    ),
    "hinge": LossSpec(hinge_loss, _REF, _SUM, "Zhao et al. 2023 (SLiC-HF), arXiv:2305.10425"),
    "ipo": LossSpec(ipo_loss, _REF, _AVG, "Azar et al. 2023 (IPO), arXiv:2310.12036"),
    "kto_pair": LossSpec(kto_pair_loss, _REF, _SUM, "Ethayarajh et al. 2024 (KTO), arXiv:2402.01306"),
    "orpo": LossSpec(orpo_loss, _FREE, _AVG, "Hong et al. 2024 (ORPO), arXiv:2403.07691"),
    "simpo": LossSpec(
        simpo_loss, _FREE, _AVG, "Meng et al. 2024 (SimPO), arXiv:2405.14734", reads=frozenset({"simpo_gamma"})
    ),
    "bco_pair": LossSpec(bco_pair_loss, _REF, _SUM, "Jung et al. 2024 (BCO), arXiv:2404.04656"),
    "sppo_hard": LossSpec(sppo_hard_loss, _REF, _SUM, "Wu et al. 2024 (SPPO), arXiv:2405.00675"),
    "nca_pair": LossSpec(nca_pair_loss, _REF, _SUM, "Chen et al. 2024 (NCA), arXiv:2402.05369"),
    "exo_pair": LossSpec(
        exo_pair_loss, _REF, _SUM, "Ji et al. 2024 (EXO), arXiv:2402.00856", reads=_EPS,
        constraints=(Constraint("label_smoothing", lambda v: 0 < v < 0.5,
                                "pref_loss=exo_pair needs dpo_label_smoothing > 0 and < 0.5 (the loss takes its log), "
                                "not {value}; set dpo_label_smoothing, e.g. to 1e-3 as in the EXO paper"),),
    ),
    "aot": LossSpec(
        aot_loss, _REF, _SUM, "Melnyk et al. 2024 (AOT), arXiv:2406.05882", reads=_EPS, per_pair=False
    ),
    "aot_unpaired": LossSpec(
        aot_unpaired_loss, _REF, _SUM, "Melnyk et al. 2024 (AOT), arXiv:2406.05882", reads=_EPS, per_pair=False
    ),
    "apo_zero": LossSpec(apo_zero_loss, _REF, _SUM, "D'Oosterlinck et al. 2024 (APO), arXiv:2408.06266"),
    "apo_down": LossSpec(apo_down_loss, _REF, _SUM, "D'Oosterlinck et al. 2024 (APO), arXiv:2408.06266"),
    "discopop": LossSpec(
        discopop_loss, _REF, _SUM, "Lu et al. 2024 (DiscoPOP), arXiv:2406.08414", reads=frozenset({"discopop_tau"})
    ),
    "sigmoid_norm": LossSpec(sigmoid_norm_loss, _REF, _AVG, "Lambert et al. 2024 (Tülu 3), arXiv:2411.15124"),
    "sft": LossSpec(sft_loss, _FREE, _AVG, "negative log-likelihood of the chosen reply"),
    "kto": LossSpec(kto_loss, _REF, _SUM, "Ethayarajh et al. 2024 (KTO), arXiv:2402.01306", reads=_KTO_WEIGHTS,
                    unpaired=True),
    "apo_zero_unpaired": LossSpec(apo_zero_unpaired_loss, _REF, _SUM, "D'Oosterlinck et al. 2024 (APO), "
                                  "arXiv:2408.06266", reads=_KTO_WEIGHTS, unpaired=True),
}


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ConfigError(unknown_loss(name))
    return LOSSES[name]


def unknown_loss(name: str) -> str:
    """The problem line for a `pref_loss` name that is not registered."""
    hint = did_you_mean(name, LOSSES)
    return f"pref_loss: unknown loss {name!r}; {hint + ' ' if hint else ''}known losses: {', '.join(sorted(LOSSES))}"


def needs_reference(names: list[str], settings: LossSettings | None = None) -> bool:
    """Whether any of the named losses, or the BCO mix (`pref_bco_weight` > 0), reads reference log-probs."""
    if settings is not None and settings.bco_weight > 0:
        return True
    return any(get_loss(name).needs_reference for name in names)


# --------------------------------------------------------------------------------------------------
# Modifiers


def _extras(logps: PairLogps, keys: tuple[str, ...], setting: str) -> list[torch.Tensor]:
    missing = [key for key in keys if key not in logps.extras]
    if missing:
        raise ValueError(
            f"{setting} needs per-token values in PairLogps.extras, but {', '.join(missing)} are missing; "
            f"the log-prob computation must fill them whenever {setting} is set"
        )
    return [logps.extras[key] for key in keys]


def length_desensitize(logps: PairLogps, alpha: float) -> PairLogps:
    """LD-DPO (Liu et al. 2024, arXiv:2409.06411): each reply's log-prob becomes the sum over its first
    l_p = min(|y+|, |y-|) tokens plus α times the sum over the tokens beyond (only the longer reply has any).

    Reads `extras`: `chosen_token_logps`, `rejected_token_logps` (B, L) float and `chosen_mask`,
    `rejected_mask` (B, L) bool marking the response tokens (in order; any positions). Returns a copy
    with new `chosen` and `rejected` (B,); token counts and extras are unchanged.
    """
    chosen_tok, chosen_mask, rejected_tok, rejected_mask = _extras(
        logps, ("chosen_token_logps", "chosen_mask", "rejected_token_logps", "rejected_mask"), "ld_alpha"
    )
    shared = torch.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1))  # (B,)

    def desensitized_sum(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        position = mask.long().cumsum(-1) - 1  # index of each response token within its reply
        weight = torch.where(position < shared[:, None], 1.0, alpha).to(token_logps.dtype)
        return torch.where(mask, token_logps * weight, 0.0).sum(-1)

    return dataclasses.replace(
        logps,
        chosen=desensitized_sum(chosen_tok, chosen_mask),
        rejected=desensitized_sum(rejected_tok, rejected_mask),
    )


def wpo_weights(policy: PairLogps) -> torch.Tensor:
    """WPO pair weights (Zhou et al. 2024, arXiv:2406.11827, the sampling-aligned weights), shape (B,), detached:

    w = exp(mean_t [log π(y+_t) - log Σ_v π(v)²]) · exp(mean_t [log π(y-_t) - log Σ_v π(v)²]),

    how likely the policy is to sample each reply, per token, relative to its own greedy-ish sampling.
    Reads `extras`: `chosen_token_logps`, `chosen_token_sqnorm` (log Σ_v π(v)² = logsumexp_v 2 log π(v)),
    `chosen_mask`, and the same for rejected, each (B, L).
    """

    def mean_log_weight(side: str) -> torch.Tensor:
        token_logps, sqnorm, mask = _extras(
            policy, (f"{side}_token_logps", f"{side}_token_sqnorm", f"{side}_mask"), "use_weighting"
        )
        per_token = torch.where(mask, token_logps - sqnorm, 0.0)
        return per_token.sum(-1) / mask.sum(-1).clamp(min=1)

    return torch.exp(mean_log_weight("chosen") + mean_log_weight("rejected")).detach()


def compute_preference_loss(
    policy: PairLogps,
    reference: PairLogps | None,
    names: list[str],
    weights: list[float] | None,
    settings: LossSettings,
) -> LossOutput:
    """The per-pair training loss, shape (B,): the weighted sum of the named losses, then the modifiers.

    In order:
      1. LD-DPO (`ld_alpha`): summed-log-prob losses read desensitised log-probs of policy and
         reference alike; length-averaged losses and the SFT term read the original ones.
      2. The losses, summed with `weights` (None: all 1). With several, `metrics["loss/<name>"]`
         holds each unweighted component.
      3. WPO (`use_weighting`): the sum is multiplied by `wpo_weights(policy)`; metric `wpo_weight`.
      4. The BCO mix (`bco_weight` w > 0, LLaMA-Factory's): (loss + w·bco_pair) / (1 + w); metric `bco_loss`.
      5. The SFT term (`ftx` > 0, RPO, Pang et al. 2024): + ftx · chosen NLL; metric `sft_loss`.
         For unpaired examples the term is the reply's NLL on desirable examples only (LLaMA-Factory's
         KTO `pref_ftx`), 0 on undesirable ones.
    Rewards are those of the first named loss.
    """
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names) or not names:  # the config checks rule this out: a caller's bug
        raise ValueError(f"compute_preference_loss got {len(names)} loss names and {len(weights)} weights; "
                         "give at least one name and one weight per name")

    summed_policy, summed_reference = policy, reference
    if settings.ld_alpha is not None:
        summed_policy = length_desensitize(policy, settings.ld_alpha)
        if reference is not None:
            summed_reference = length_desensitize(reference, settings.ld_alpha)

    total: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = {}
    first: LossOutput | None = None
    for name, weight in zip(names, weights):
        spec = get_loss(name)
        inputs = (policy, reference) if spec.averaged else (summed_policy, summed_reference)
        out = spec.fn(*inputs, settings)
        first = first or out
        total = weight * out.losses if total is None else total + weight * out.losses
        metrics.update(out.metrics)
        if len(names) > 1:
            metrics[f"loss/{name}"] = out.losses.detach()

    if settings.use_weighting:
        pair_weights = wpo_weights(policy)
        total = total * pair_weights
        metrics["wpo_weight"] = pair_weights
    if settings.bco_weight > 0:
        bco = bco_pair_loss(summed_policy, summed_reference, settings).losses
        total = (total + settings.bco_weight * bco) / (1 + settings.bco_weight)
        metrics["bco_loss"] = bco.detach()
    if settings.ftx > 0:
        sft = policy.chosen_nll
        if policy.desirable is not None:
            sft = torch.where(policy.desirable.bool(), sft, 0.0)
        total = total + settings.ftx * sft
        metrics["sft_loss"] = sft.detach()
    return LossOutput(total, first.chosen_rewards, first.rejected_rewards, metrics)


@dataclass(frozen=True)
class Objective:
    """A run's training objective, built once from the config: the named losses, their weights, the settings."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    settings: LossSettings

    @property
    def needs_reference(self) -> bool:
        return needs_reference(list(self.names), self.settings)

    @property
    def unpaired(self) -> bool:
        """Whether the objective reads unpaired examples (stage: kto) rather than pairs."""
        return any(get_loss(name).unpaired for name in self.names)

    @property
    def per_pair(self) -> bool:
        """Whether losses[i] belongs to pair i for every named loss (not for AOT's quantiles)."""
        return all(get_loss(name).per_pair for name in self.names)

    def __call__(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        return compute_preference_loss(policy, reference, list(self.names), list(self.weights), self.settings)
