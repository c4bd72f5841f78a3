"""Tests for prefalign.losses: hand-computed values, chosen/rejected swaps, gradient direction on a
tiny Llama, the modifiers (LD-DPO, WPO, BCO mix, SFT term, f-DPO) and config validation.

Expected numbers are computed with `math` from the papers' formulas, never by calling the code under
test; each test's docstring shows the arithmetic. Unless a test says otherwise it uses the standard
pair below with β = 0.1:

    policy     log π(y+) = -10,  log π(y-) = -14,  |y+| = 4 tokens,  |y-| = 5 tokens
    reference  log π(y+) = -12,  log π(y-) = -13
    s+ = 2,  s- = -1,  Δ = 3,  βΔ = 0.3
    averaged:  policy p̄+ = -2.5, p̄- = -2.8;  reference -3.0, -2.6;  s̄+ = 0.5, s̄- = -0.2, Δ̄ = 0.7
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch

from prefalign.contracts import LossOutput, PairLogps
from prefalign.config.checks import loss_problems
from prefalign.errors import ConfigError
from prefalign.losses import (
    F_DIVERGENCES,
    LOSSES,
    LossSettings,
    Objective,
    compute_preference_loss,
    get_loss,
    length_desensitize,
    needs_reference,
    weight_balance_warning,
    wpo_weights,
)

BETA = 0.1
DTYPE = torch.float64


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigma(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_sigma(x: float) -> float:
    return -softplus(-x)


def as_tensor(values) -> torch.Tensor:
    return torch.tensor(values if isinstance(values, list) else [values], dtype=DTYPE)


def logps(chosen, rejected, chosen_tokens=4, rejected_tokens=5, **extras) -> PairLogps:
    """PairLogps from plain numbers (one pair) or lists (a batch)."""
    chosen, rejected = as_tensor(chosen), as_tensor(rejected)
    return PairLogps(
        chosen=chosen,
        rejected=rejected,
        chosen_tokens=torch.broadcast_to(as_tensor(chosen_tokens), chosen.shape).clone(),
        rejected_tokens=torch.broadcast_to(as_tensor(rejected_tokens), rejected.shape).clone(),
        extras=extras,
    )


def swap(p: PairLogps) -> PairLogps:
    """The same pairs with chosen and rejected exchanged."""
    swapped = {}
    for key, value in p.extras.items():
        other = key.replace("chosen", "@").replace("rejected", "chosen").replace("@", "rejected")
        swapped[other] = value
    return PairLogps(p.rejected, p.chosen, p.rejected_tokens, p.chosen_tokens, extras=swapped)


POLICY = logps(-10, -14)
REFERENCE = logps(-12, -13)
# A batch of two pairs for the losses that use batch statistics (kto_pair, aot, aot_unpaired):
#   pair 0: policy -10, -14; reference -12, -13  ->  s+ = 2,  s- = -1, π-diff = 4,  ref-diff = 1
#   pair 1: policy -21, -19; reference -18, -21  ->  s+ = -3, s- = 2,  π-diff = -2, ref-diff = 3
BATCH_POLICY = logps([-10, -21], [-14, -19])
BATCH_REFERENCE = logps([-12, -18], [-13, -21])

# The properties of pairs hold for the losses that read pairs; the unpaired ones (stage: kto) have their own.
PAIR_LOSSES = sorted(name for name, spec in LOSSES.items() if not spec.unpaired)

# Settings a loss needs to be valid at all (exo_pair takes log ε).
REQUIRED_SETTINGS = {"exo_pair": {"label_smoothing": 0.1}}


def run(name: str, policy=POLICY, reference=REFERENCE, **settings) -> LossOutput:
    settings.setdefault("beta", BETA)
    return get_loss(name).fn(policy, reference, LossSettings(**settings))


def value(name: str, policy=POLICY, reference=REFERENCE, **settings) -> float:
    return run(name, policy, reference, **settings).losses.item()


def swapped_value(name: str, **settings) -> float:
    return value(name, swap(POLICY), swap(REFERENCE), **settings)


def values(name: str, policy=BATCH_POLICY, reference=BATCH_REFERENCE, **settings) -> list[float]:
    return run(name, policy, reference, **settings).losses.tolist()


# --------------------------------------------------------------------------------------------------
# One value test and one swap test per loss


def test_sigmoid_value():
    """DPO: -log σ(βΔ) = -log σ(0.3) = log(1 + e^-0.3) = 0.554355."""
    assert value("sigmoid") == pytest.approx(softplus(-0.3))
    assert value("sigmoid") == pytest.approx(0.554355, abs=1e-6)


def test_sigmoid_label_smoothing_value():
    """cDPO, ε = 0.1: 0.9·(-log σ(0.3)) + 0.1·(-log σ(-0.3)) = 0.9·0.554355 + 0.1·0.854355 = 0.584355."""
    expected = 0.9 * softplus(-0.3) + 0.1 * softplus(0.3)
    assert value("sigmoid", label_smoothing=0.1) == pytest.approx(expected)
    assert expected == pytest.approx(0.584355, abs=1e-6)


def test_sigmoid_swap():
    """Swapped, x = -βΔ: L(-x) - L(x) = (1-2ε)·x since softplus(x) - softplus(-x) = x.

    ε = 0: 0.854355 - 0.554355 = 0.3;  ε = 0.1: 0.8·0.3 = 0.24. Rewards swap, so the margin flips sign.
    """
    assert swapped_value("sigmoid") - value("sigmoid") == pytest.approx(0.3)
    eps = {"label_smoothing": 0.1}
    assert swapped_value("sigmoid", **eps) - value("sigmoid", **eps) == pytest.approx(0.24)


def test_robust_value():
    """rDPO, ε = 0.1: [0.9·(-log σ(0.3)) + 0.1·log σ(-0.3)] / 0.8 = (0.498920 - 0.085436) / 0.8 = 0.516855."""
    expected = (0.9 * softplus(-0.3) - 0.1 * softplus(0.3)) / 0.8
    assert value("robust", label_smoothing=0.1) == pytest.approx(expected)
    assert expected == pytest.approx(0.516855, abs=1e-6)


def test_robust_swap():
    """L(-x) - L(x) = [log σ(x) - log σ(-x)] / (1-2ε) = x / (1-2ε) = 0.3 / 0.8 = 0.375."""
    eps = {"label_smoothing": 0.1}
    assert swapped_value("robust", **eps) - value("robust", **eps) == pytest.approx(0.375)


def test_hinge_value():
    """SLiC hinge: max(0, 1 - βΔ) = 1 - 0.3 = 0.7; and 0 once βΔ >= 1 (Δ = 10 here)."""
    assert value("hinge") == pytest.approx(0.7)
    assert value("hinge", logps(0, -14), REFERENCE) == pytest.approx(0.0)


def test_hinge_swap():
    """max(0, 1 + 0.3) - max(0, 1 - 0.3) = 1.3 - 0.7 = 0.6 = 2βΔ (both hinges active)."""
    assert swapped_value("hinge") - value("hinge") == pytest.approx(0.6)


def test_ipo_value():
    """IPO on averaged log-ratios: (Δ̄ - 1/(2β))² = (0.7 - 5)² = 18.49."""
    assert value("ipo") == pytest.approx((0.7 - 5) ** 2)
    assert value("ipo") == pytest.approx(18.49)


def test_ipo_swap():
    """(-0.7 - 5)² - (0.7 - 5)² = 32.49 - 18.49 = 14 = 2Δ̄/β."""
    assert swapped_value("ipo") - value("ipo") == pytest.approx(14.0)


def test_kto_pair_value():
    """Batch: s+ = (2, -3), s- = (-1, 2); z+ = max(0, mean s+) = max(0, -0.5) = 0, z- = max(0, 0.5) = 0.5.

    pair 0: [1 - σ(0.1·(2 - 0.5))] + [1 - σ(0.1·(0 + 1))] = 2 - σ(0.15) - σ(0.1)
            = 2 - 0.537430 - 0.524979 = 0.937591
    pair 1: [1 - σ(0.1·(-3 - 0.5))] + [1 - σ(0.1·(0 - 2))] = 2 - σ(-0.35) - σ(-0.2)
            = 2 - 0.413382 - 0.450166 = 1.136452
    """
    expected = [2 - sigma(0.15) - sigma(0.1), 2 - sigma(-0.35) - sigma(-0.2)]
    assert values("kto_pair") == pytest.approx(expected)
    assert expected == pytest.approx([0.937591, 1.136452], abs=1e-6)


def test_kto_pair_swap():
    """Swapping exchanges the two terms' arguments and negates them: a1 = β(s+ - z-), a2 = β(z+ - s-) become
    -a2, -a1, so L_swapped = 2 - σ(-a2) - σ(-a1) = σ(a1) + σ(a2) = 2 - L for every pair."""
    forward = values("kto_pair")
    backward = values("kto_pair", swap(BATCH_POLICY), swap(BATCH_REFERENCE))
    assert [f + b for f, b in zip(forward, backward)] == pytest.approx([2.0, 2.0])


def test_orpo_value():
    """ORPO, β = λ = 0.1, on p̄+ = -2.5, p̄- = -2.8:

    log-odds(-2.5) = -2.5 - log(1 - e^-2.5) = -2.5 - log(1 - 0.082085) = -2.414350
    log-odds(-2.8) = -2.8 - log(1 - e^-2.8) = -2.8 - log(1 - 0.060810) = -2.737262
    z = 0.322913;  odds_ratio_loss = -log σ(z) = 0.544669;  loss = 2.5 + 0.1·0.544669 = 2.554467
    """
    z = (-2.5 - math.log(1 - math.exp(-2.5))) - (-2.8 - math.log(1 - math.exp(-2.8)))
    out = run("orpo")
    assert out.losses.item() == pytest.approx(2.5 + 0.1 * softplus(-z))
    assert out.losses.item() == pytest.approx(2.554467, abs=1e-6)
    assert out.metrics["odds_ratio_loss"].item() == pytest.approx(0.544669, abs=1e-6)
    assert out.metrics["sft_loss"].item() == pytest.approx(2.5)
    assert out.chosen_rewards.item() == pytest.approx(0.1 * -2.5)  # β · p̄+, reference-free


def test_orpo_swap():
    """Swapped: NLL(y-) - β log σ(-z) = 2.8 + 0.1·0.867582 = 2.886758; difference = (p̄+ - p̄-) + βz
    = 0.3 + 0.032291 = 0.332291."""
    z = (-2.5 - math.log(1 - math.exp(-2.5))) - (-2.8 - math.log(1 - math.exp(-2.8)))
    assert swapped_value("orpo") == pytest.approx(2.8 + 0.1 * softplus(z))
    assert swapped_value("orpo") - value("orpo") == pytest.approx(0.3 + 0.1 * z)


def test_orpo_is_finite_when_the_chosen_reply_is_certain():
    """p̄+ = 0 (probability 1) makes log-odds infinite; it is clamped just below, so loss and gradient stay finite."""
    chosen = torch.zeros(1, dtype=DTYPE, requires_grad=True)
    policy = PairLogps(chosen, as_tensor(-2.0), as_tensor(4), as_tensor(5))
    out = get_loss("orpo").fn(policy, None, LossSettings())
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(chosen.grad).all()


def test_simpo_value():
    """SimPO eq. 6 with β = 2, γ = 1 on p̄+ - p̄- = 0.3: -log σ(2·0.3 - 1) = softplus(0.4) = 0.913015.

    (LLaMA-Factory's -log σ(β(0.3 - γ/β)) = -log σ(2·(0.3 - 0.5)) is the same number.)
    """
    assert value("simpo", beta=2.0, simpo_gamma=1.0) == pytest.approx(softplus(0.4))
    assert value("simpo", beta=2.0, simpo_gamma=1.0) == pytest.approx(0.913015, abs=1e-6)
    assert run("simpo", reference=None, beta=2.0).chosen_rewards.item() == pytest.approx(2.0 * -2.5)


def test_simpo_swap():
    """Swapped: -log σ(2·(-0.3) - 1) = softplus(1.6) = 1.783901. With γ = 0 SimPO is antisymmetric like DPO:
    L(-d) - L(d) = βd = 2·0.3 = 0.6."""
    assert swapped_value("simpo", beta=2.0, simpo_gamma=1.0) == pytest.approx(softplus(1.6))
    no_margin = {"beta": 2.0, "simpo_gamma": 0.0}
    assert swapped_value("simpo", **no_margin) - value("simpo", **no_margin) == pytest.approx(0.6)


def test_bco_pair_value():
    """-log σ(βs+) - log σ(-βs-) = -log σ(0.2) - log σ(0.1) = 0.598139 + 0.644397 = 1.242536."""
    assert value("bco_pair") == pytest.approx(softplus(-0.2) + softplus(-0.1))
    assert value("bco_pair") == pytest.approx(1.242536, abs=1e-6)


def test_bco_pair_swap():
    """L_swapped - L = [-log σ(βs-) + log σ(-βs-)] + [-log σ(-βs+) + log σ(βs+)] = -βs- + βs+ = βΔ = 0.3."""
    assert swapped_value("bco_pair") - value("bco_pair") == pytest.approx(0.3)


def test_sppo_hard_value():
    """(s+ - 1/(2β))² + (s- + 1/(2β))² = (2 - 5)² + (-1 + 5)² = 9 + 16 = 25."""
    assert value("sppo_hard") == pytest.approx(25.0)


def test_sppo_hard_swap():
    """(-1 - 5)² + (2 + 5)² = 36 + 49 = 85; 85 - 25 = 60 = 2Δ/β."""
    assert swapped_value("sppo_hard") == pytest.approx(85.0)
    assert swapped_value("sppo_hard") - value("sppo_hard") == pytest.approx(60.0)


def test_nca_pair_value():
    """a = βs+ = 0.2, b = βs- = -0.1: -log σ(0.2) - ½ log σ(-0.2) - ½ log σ(0.1)
    = 0.598139 + ½·0.798139 + ½·0.644397 = 1.319407."""
    expected = -log_sigma(0.2) - 0.5 * log_sigma(-0.2) - 0.5 * log_sigma(0.1)
    assert value("nca_pair") == pytest.approx(expected)
    assert expected == pytest.approx(1.319407, abs=1e-6)


def test_nca_pair_swap():
    """Swapped, a = -0.1, b = 0.2: L_swapped - L = -log σ(b) + log σ(a) = softplus(0.1) - softplus(-0.2)
    = 0.744397 - 0.598139 = 0.146258 (total 1.465665)."""
    assert swapped_value("nca_pair") - value("nca_pair") == pytest.approx(softplus(0.1) - softplus(-0.2))
    assert swapped_value("nca_pair") == pytest.approx(1.465665, abs=1e-6)


def test_exo_pair_value():
    """EXO, ε = 0.1, x = 0.3: σ(x)[log σ(x) - log 0.9] + σ(-x)[log σ(-x) - log 0.1]
    = 0.574443·(-0.554355 + 0.105361) + 0.425557·(-0.854355 + 2.302585) = -0.257922 + 0.616305 = 0.358383."""
    x, eps = 0.3, 0.1
    expected = sigma(x) * (log_sigma(x) - math.log(1 - eps)) + sigma(-x) * (log_sigma(-x) - math.log(eps))
    assert value("exo_pair", label_smoothing=eps) == pytest.approx(expected)
    assert expected == pytest.approx(0.358383, abs=1e-6)


def test_exo_pair_swap():
    """L(-x) - L(x) = (σ(x) - σ(-x))·log((1-ε)/ε) = tanh(x/2)·log 9 = 0.148885·2.197225 = 0.327134."""
    eps = {"label_smoothing": 0.1}
    difference = swapped_value("exo_pair", **eps) - value("exo_pair", **eps)
    assert difference == pytest.approx(math.tanh(0.15) * math.log(9))


@pytest.mark.parametrize("name, bad", [("exo_pair", 0.0), ("robust", 0.5)])
def test_a_loss_declares_its_constraints_and_the_config_check_reports_them(name, bad):
    """log ε with ε = 0 is -inf (EXO), 1 - 2ε = 0 divides by zero (robust): the registry entry says so,
    the config check reports it before training, and the loss function itself stays pure."""
    assert [c.field for c in LOSSES[name].constraints] == ["label_smoothing"]
    problems = loss_problems([name], None, LossSettings(label_smoothing=bad), has_ref_model=False)
    assert len(problems) == 1 and f"pref_loss={name}" in problems[0] and "dpo_label_smoothing" in problems[0]
    assert loss_problems([name], None, LossSettings(label_smoothing=0.1), has_ref_model=False) == []


def test_aot_value():
    """π-diffs (4, -2) sort to (-2, 4), ref-diffs (1, 3) to (1, 3): d = (-3, 1);
    losses = -log σ(-0.3), -log σ(0.1) = 0.854355, 0.644397 (not the per-pair DPO losses at Δ = (3, -5))."""
    assert values("aot") == pytest.approx([softplus(0.3), softplus(-0.1)])


def test_aot_swap():
    """Swapped: π-diffs (-4, 2), ref-diffs (-1, -3) sorted (-3, -1): d' = (-1, 3) = -reverse(d);
    losses 0.744397, 0.554355; sum changes by β·Σd = 0.1·(-3 + 1) = -0.2 (1.298752 vs 1.498752)."""
    forward = values("aot")
    backward = values("aot", swap(BATCH_POLICY), swap(BATCH_REFERENCE))
    assert backward == pytest.approx([softplus(0.1), softplus(-0.3)])
    assert sum(backward) - sum(forward) == pytest.approx(-0.2)


def test_aot_unpaired_value():
    """s+ = (2, -3) sorts to (-3, 2), s- = (-1, 2) to (-1, 2): d = (-2, 0);
    losses = -log σ(-0.2), -log σ(0) = 0.798139, 0.693147."""
    assert values("aot_unpaired") == pytest.approx([softplus(0.2), math.log(2)])


def test_aot_unpaired_swap():
    """Swapped: d' = sort(s-) - sort(s+) = -d, so L'_i - L_i = βd_i = (-0.2, 0)."""
    forward = values("aot_unpaired")
    backward = values("aot_unpaired", swap(BATCH_POLICY), swap(BATCH_REFERENCE))
    assert [b - f for f, b in zip(forward, backward)] == pytest.approx([-0.2, 0.0])


def test_apo_zero_value():
    """[1 - σ(βs+)] + σ(βs-) = 1 - σ(0.2) + σ(-0.1) = 1 - 0.549834 + 0.475021 = 0.925187."""
    assert value("apo_zero") == pytest.approx(1 - sigma(0.2) + sigma(-0.1))
    assert value("apo_zero") == pytest.approx(0.925187, abs=1e-6)


def test_apo_zero_swap():
    """Swapped: 1 - σ(-0.1) + σ(0.2) = 1.074813; L + L_swapped = 2 since σ terms cancel."""
    assert value("apo_zero") + swapped_value("apo_zero") == pytest.approx(2.0)


def test_apo_down_value():
    """σ(βs+) + [1 - σ(βΔ)] = σ(0.2) + 1 - σ(0.3) = 0.549834 + 0.425557 = 0.975391."""
    assert value("apo_down") == pytest.approx(sigma(0.2) + 1 - sigma(0.3))
    assert value("apo_down") == pytest.approx(0.975391, abs=1e-6)


def test_apo_down_swap():
    """Swapped: σ(βs-) + 1 - σ(-βΔ) = σ(-0.1) + 1 - σ(-0.3) = 0.475021 + 0.574443 = 1.049463."""
    assert swapped_value("apo_down") == pytest.approx(sigma(-0.1) + 1 - sigma(-0.3))
    assert swapped_value("apo_down") == pytest.approx(1.049463, abs=1e-6)


def test_discopop_value():
    """x = 0.3, τ = 0.05: m = σ(6) = 0.997527; (1-m)·(-log σ(0.3)) + m·e^-0.3
    = 0.002473·0.554355 + 0.997527·0.740818 = 0.740357."""
    m = sigma(0.3 / 0.05)
    assert value("discopop") == pytest.approx((1 - m) * softplus(-0.3) + m * math.exp(-0.3))
    assert value("discopop") == pytest.approx(0.740357, abs=1e-6)


def test_discopop_swap():
    """x = -0.3: m = σ(-6) = 0.002473; 0.997527·0.854355 + 0.002473·1.349859 = 0.855580."""
    m = sigma(-0.3 / 0.05)
    assert swapped_value("discopop") == pytest.approx((1 - m) * softplus(0.3) + m * math.exp(0.3))
    assert swapped_value("discopop") == pytest.approx(0.855580, abs=1e-6)


def test_discopop_is_not_monotone_at_zero():
    """d/dx at x = βΔ = 0: -(σ'(0)/τ)·log 2 - ½·½ + σ'(0)/τ - ½ = (1 - ln 2)/(4τ) - 3/4,
    which is 0.784264 for τ = 0.05.

    Positive: at the first step (policy = reference) DiscoPOP lowers the margin. Documented in its docstring;
    the gradient-direction test starts it at βΔ = 0.5.
    """
    chosen = torch.zeros(1, dtype=DTYPE, requires_grad=True)
    policy = PairLogps(chosen, as_tensor(0.0), as_tensor(4), as_tensor(5))
    zero = PairLogps(as_tensor(0.0), as_tensor(0.0), as_tensor(4), as_tensor(5))
    get_loss("discopop").fn(policy, zero, LossSettings(beta=1.0)).losses.sum().backward()
    assert chosen.grad.item() == pytest.approx((1 - math.log(2)) / (4 * 0.05) - 0.75)


def test_sigmoid_norm_value():
    """Length-normalised DPO: -log σ(βΔ̄) = -log σ(0.07) = 0.658760; rewards β·s̄ = 0.05, -0.02."""
    out = run("sigmoid_norm")
    assert out.losses.item() == pytest.approx(softplus(-0.07))
    assert out.losses.item() == pytest.approx(0.658760, abs=1e-6)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.05, -0.02))


def test_sigmoid_norm_swap():
    """L(-x) - L(x) = x = βΔ̄ = 0.07."""
    assert swapped_value("sigmoid_norm") - value("sigmoid_norm") == pytest.approx(0.07)


def test_sft_value():
    """SFT: -p̄+ = 10 / 4 = 2.5; metric sft_loss = 2.5; it needs no reference."""
    out = run("sft", reference=None)
    assert out.losses.item() == pytest.approx(2.5)
    assert out.metrics["sft_loss"].item() == pytest.approx(2.5)


def test_sft_swap():
    """Swapped, SFT trains on the former rejected reply: 14 / 5 = 2.8."""
    assert swapped_value("sft") == pytest.approx(2.8)


# Unpaired losses (stage: kto)


def examples(chosen, rejected, desirable) -> PairLogps:
    """Unpaired (KTO) examples: each reply's log-prob on the chosen side, its KL completion's on the rejected."""
    return dataclasses.replace(logps(chosen, rejected), desirable=torch.tensor(desirable))


UNPAIRED_POLICY = examples([-4.0, -6.0, -5.0], [-7.0, -9.0, -8.0], [True, False, True])
UNPAIRED_REFERENCE = examples([-5.0, -5.0, -5.0], [-8.0, -8.5, -8.2], [True, False, True])


def flip(p: PairLogps) -> PairLogps:
    """The same examples with every label flipped."""
    return dataclasses.replace(p, desirable=~p.desirable)


def test_kto_value():
    """KTO eq. 8 with β = 0.5, λ_D = 1, λ_U = 1.5.

    log-ratios r = (-4+5, -6+5, -5+5) = (1, -1, 0); KL pairs (-7+8, -9+8.5, -8+8.2) = (1, -0.5, 0.2),
    z_ref = max(0, 0.7/3) = 0.23333;
    example 0 (desirable):   1 - σ(0.5 (1 - z))            = 1 - σ(0.38333)
    example 1 (undesirable): 1.5 (1 - σ(0.5 (z - (-1))))   = 1.5 (1 - σ(0.61667))
    example 2 (desirable):   1 - σ(0.5 (0 - z))            = 1 - σ(-0.11667)
    rewards β r = (0.5, -0.5, 0): chosen on examples 0 and 2, rejected on example 1.
    """
    s = LossSettings(beta=0.5, kto_chosen_weight=1.0, kto_rejected_weight=1.5)
    out = LOSSES["kto"].fn(UNPAIRED_POLICY, UNPAIRED_REFERENCE, s)
    z = 0.7 / 3
    expected = [1 - sigma(0.5 * (1 - z)), 1.5 * (1 - sigma(0.5 * (z + 1))), 1 - sigma(0.5 * (0 - z))]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert out.metrics["kl"].tolist() == pytest.approx([z] * 3, abs=1e-6)
    assert out.chosen_rewards[[0, 2]].tolist() == pytest.approx([0.5, 0.0]) and out.chosen_rewards[1].isnan()
    assert out.rejected_rewards[1].item() == pytest.approx(-0.5) and out.rejected_rewards[[0, 2]].isnan().all()


def test_kto_reference_point_is_clamped_at_zero_and_detached():
    """KL pairs (-9+8, -9+8.5, -9+8.2) = (-1, -0.5, -0.8): mean < 0, so z_ref = 0, and with β = 1, λ = 1:
    losses (1 - σ(1), 1 - σ(0 - (-1)), 1 - σ(0)) = (1 - σ(1), 1 - σ(1), 0.5). The reference point takes no gradient."""
    policy = examples([-4.0, -6.0, -5.0], [-9.0, -9.0, -9.0], [True, False, True])
    policy.rejected.requires_grad_(True)
    policy.chosen.requires_grad_(True)
    out = LOSSES["kto"].fn(policy, UNPAIRED_REFERENCE, LossSettings(beta=1.0))
    assert out.losses.tolist() == pytest.approx([1 - sigma(1), 1 - sigma(1), 0.5], abs=1e-6)
    out.losses.sum().backward()
    assert policy.rejected.grad is None or not policy.rejected.grad.any()
    assert policy.chosen.grad.abs().sum() > 0


def test_apo_zero_unpaired_value():
    """APO-zero unpaired, β = 0.5, λ_D = 2, λ_U = 1, r = (1, -1, 0): (2 (1 - σ(0.5)), σ(-0.5), 2 (1 - σ(0)))."""
    out = LOSSES["apo_zero_unpaired"].fn(UNPAIRED_POLICY, UNPAIRED_REFERENCE, LossSettings(beta=0.5, kto_chosen_weight=2.0))
    assert out.losses.tolist() == pytest.approx([2 * (1 - sigma(0.5)), sigma(-0.5), 2 * (1 - sigma(0))],
                                                abs=1e-6)


def test_sft_term_of_kto_reads_desirable_replies_only():
    """pref_ftx = 0.5: + 0.5 × (NLL per token = -logp / 4 tokens) on desirable examples 0 and 2 only:
    0.5 × 4/4 = 0.5 on example 0, 0 on example 1, 0.5 × 5/4 = 0.625 on example 2."""
    s = LossSettings(beta=0.5, kto_rejected_weight=1.5)
    plain = Objective(("kto",), (1.0,), s)(UNPAIRED_POLICY, UNPAIRED_REFERENCE).losses
    with_sft = Objective(("kto",), (1.0,), LossSettings(beta=0.5, kto_rejected_weight=1.5, ftx=0.5))(
        UNPAIRED_POLICY, UNPAIRED_REFERENCE)
    assert (with_sft.losses - plain).tolist() == pytest.approx([0.5, 0.0, 0.625], abs=1e-6)


def test_weight_balance_warning_follows_the_papers_range():
    """λ_D n_D / (λ_U n_U): 1·6/(1·2) = 3 > 4/3 warns and suggests λ_D in [2/6, 8/18]; 0.4·6/2 = 1.2 does not;
    6 desirable and none undesirable warns that one label is missing."""
    warning = weight_balance_warning(6, 2, LossSettings())
    assert "= 3" in warning and "[0.333, 0.444]" in warning
    assert weight_balance_warning(6, 2, LossSettings(kto_chosen_weight=0.4)) is None
    assert "no undesirable examples" in weight_balance_warning(6, 0, LossSettings())


def test_kto_swap():
    """Flipped labels with λ_D = λ_U = 1: each example's two losses sum to [1 - σ(a)] + [1 - σ(-a)] = 1,
    and its reward moves from the chosen to the rejected side."""
    forward = run("kto", UNPAIRED_POLICY, UNPAIRED_REFERENCE, beta=0.5)
    flipped = run("kto", flip(UNPAIRED_POLICY), flip(UNPAIRED_REFERENCE), beta=0.5)
    assert (forward.losses + flipped.losses).tolist() == pytest.approx([1.0] * 3)
    torch.testing.assert_close(flipped.rejected_rewards, forward.chosen_rewards, equal_nan=True)


def test_apo_zero_unpaired_swap():
    """Flipped labels, λ = 1: [1 - σ(βr)] + σ(βr) = 1 per example."""
    forward = run("apo_zero_unpaired", UNPAIRED_POLICY, UNPAIRED_REFERENCE, beta=0.5)
    flipped = run("apo_zero_unpaired", flip(UNPAIRED_POLICY), flip(UNPAIRED_REFERENCE), beta=0.5)
    assert (forward.losses + flipped.losses).tolist() == pytest.approx([1.0] * 3)


def test_every_loss_has_a_value_and_a_swap_test():
    """A newly registered loss fails here until it gets its hand-computed tests."""
    missing = [
        f"test_{name}_{kind}" for name in LOSSES for kind in ("value", "swap") if f"test_{name}_{kind}" not in globals()
    ]
    assert not missing, f"add {', '.join(missing)}"


# --------------------------------------------------------------------------------------------------
# Properties of every registered loss


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_swapping_swaps_rewards_and_flips_margins(name):
    """Rewards follow their reply: swapped, chosen_rewards are the former rejected_rewards, margins flip sign."""
    settings = REQUIRED_SETTINGS.get(name, {})
    forward = run(name, BATCH_POLICY, BATCH_REFERENCE, **settings)
    backward = run(name, swap(BATCH_POLICY), swap(BATCH_REFERENCE), **settings)
    torch.testing.assert_close(backward.chosen_rewards, forward.rejected_rewards)
    torch.testing.assert_close(backward.rejected_rewards, forward.chosen_rewards)
    assert forward.losses.shape == (2,)
    assert not forward.chosen_rewards.requires_grad


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_registry_declares_summed_or_averaged_correctly(name):
    """Doubling sums and token counts keeps averages: averaged losses must not change. Doubling only token
    counts keeps sums: summed losses must not change."""
    settings = REQUIRED_SETTINGS.get(name, {})
    base = values(name, **settings)
    double = {"chosen_tokens": [8, 8], "rejected_tokens": [10, 10]}
    if get_loss(name).averaged:
        policy = logps([-20, -42], [-28, -38], **double)
        reference = logps([-24, -36], [-26, -42], **double)
    else:
        policy = logps([-10, -21], [-14, -19], **double)
        reference = logps([-12, -18], [-13, -21], **double)
    assert values(name, policy, reference, **settings) == pytest.approx(base)


@pytest.mark.parametrize("name", sorted(name for name, spec in LOSSES.items() if not spec.needs_reference))
def test_reference_free_losses_run_without_a_reference(name):
    assert torch.isfinite(run(name, reference=None).losses).all()


def test_reference_losses_refuse_a_missing_reference():
    with pytest.raises(ValueError, match="reference=None"):
        run("sigmoid", reference=None)


def test_get_loss_suggests_a_close_name():
    with pytest.raises(ConfigError, match="did you mean 'sigmoid'"):
        get_loss("sigmod")


def test_needs_reference():
    assert needs_reference(["simpo", "sigmoid"])
    assert not needs_reference(["orpo", "sft"])
    assert needs_reference(["simpo"], LossSettings(bco_weight=0.5))


# --------------------------------------------------------------------------------------------------
# Gradient direction: one SGD step on a tiny Llama raises the chosen-minus-rejected margin

PROMPTS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
CHOSEN = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
REJECTED = torch.tensor([[30, 31, 32, 33, 34], [40, 41, 42, 43, 44]])
# Where policy = reference (Δ = 0) DiscoPOP's gradient points the wrong way (see
# test_discopop_is_not_monotone_at_zero), so it starts from a reference that gives βΔ = 0.5.
START_BETA_DELTA = {"discopop": 0.5}


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return LlamaForCausalLM(config).to(DTYPE).eval()


def response_logps(model, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of the response tokens given the prompt, shape (B,)."""
    ids = torch.cat([prompts, responses], dim=1)
    logits = model(input_ids=ids).logits[:, :-1]
    token_logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return token_logps[:, prompts.shape[1] - 1 :].sum(-1)


def model_logps(model) -> PairLogps:
    tokens = torch.full((2,), float(CHOSEN.shape[1]), dtype=DTYPE)
    return PairLogps(
        response_logps(model, PROMPTS, CHOSEN), response_logps(model, PROMPTS, REJECTED), tokens, tokens.clone()
    )


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_one_sgd_step_raises_the_margin(tiny_model, name):
    """Chosen and rejected have equal lengths, so summed and averaged margins move together."""
    model = copy.deepcopy(tiny_model)
    settings = LossSettings(beta=BETA, **REQUIRED_SETTINGS.get(name, {}))
    assert loss_problems([name], None, settings, has_ref_model=False) == []
    with torch.no_grad():
        reference = model_logps(model)
    reference.chosen = reference.chosen - START_BETA_DELTA.get(name, 0.0) / BETA

    policy = model_logps(model)
    before = (policy.chosen if name == "sft" else policy.chosen - policy.rejected).detach().mean()
    loss = compute_preference_loss(policy, reference, [name], None, settings).losses.mean()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=1e-3).step()
    with torch.no_grad():
        after_logps = model_logps(model)
    after = (after_logps.chosen if name == "sft" else after_logps.chosen - after_logps.rejected).mean()
    assert after > before, f"{name}: margin went from {before.item():.6f} to {after.item():.6f}"


# --------------------------------------------------------------------------------------------------
# Modifiers


def test_f_divergences_replace_the_dpo_logit():
    """f-DPO, s+ = 2, s- = -1, β = 0.1, -log σ(β(f'(u+) - f'(u-))):

    forward_kl  f' = -1/u:            -e^-2 + e^1 = -0.135335 + 2.718282 = 2.582947  -> loss 0.572316
    js          f' = s - softplus(s): (2 - 2.126928) - (-1 - 0.313262) = 1.186334   -> loss 0.635589
    alpha 0.5   f' = (1 - u^-α)/α:    (1 - e^-1)/0.5 - (1 - e^0.5)/0.5 = 2.561684    -> loss 0.573243
    alpha 1 equals forward_kl; reverse_kl is plain DPO (0.554355).
    """
    forward_kl = -math.exp(-2) + math.exp(1)
    js = (2 - softplus(2)) - (-1 - softplus(-1))
    alpha = ((1 - math.exp(-1)) - (1 - math.exp(0.5))) / 0.5
    assert value("sigmoid", f_divergence_type="forward_kl") == pytest.approx(softplus(-0.1 * forward_kl))
    assert value("sigmoid", f_divergence_type="forward_kl") == pytest.approx(0.572316, abs=1e-6)
    assert value("sigmoid", f_divergence_type="js_divergence") == pytest.approx(softplus(-0.1 * js))
    assert value("sigmoid", f_divergence_type="js_divergence") == pytest.approx(0.635589, abs=1e-6)
    alpha_half = {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5}
    assert value("sigmoid", **alpha_half) == pytest.approx(softplus(-0.1 * alpha))
    assert value("sigmoid", **alpha_half) == pytest.approx(0.573243, abs=1e-6)
    assert value("sigmoid", f_divergence_type="alpha_divergence") == pytest.approx(softplus(-0.1 * forward_kl))
    assert value("sigmoid", f_divergence_type="reverse_kl") == pytest.approx(softplus(-0.3))


def test_f_divergences_stay_finite_for_extreme_log_ratios():
    """u^-α = e^(-αs) overflows float32 for s < -88; the exponent is capped so the loss is finite."""
    policy = PairLogps(torch.tensor([-500.0]), torch.tensor([-400.0]), torch.tensor([4.0]), torch.tensor([5.0]))
    zero = PairLogps(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([4.0]), torch.tensor([5.0]))
    for divergence in F_DIVERGENCES:
        out = get_loss("sigmoid").fn(policy, zero, LossSettings(f_divergence_type=divergence))
        assert torch.isfinite(out.losses).all(), divergence


def ld_extras(chosen_tokens: list[list[float]], rejected_tokens: list[list[float]], chosen_offset: list[int]):
    """Per-token extras, length 6, with each reply starting at the given position (others masked out)."""
    def layout(rows, offsets):
        values = torch.zeros(len(rows), 6, dtype=DTYPE)
        mask = torch.zeros(len(rows), 6, dtype=torch.bool)
        for i, (row, offset) in enumerate(zip(rows, offsets)):
            values[i, offset : offset + len(row)] = torch.tensor(row, dtype=DTYPE)
            mask[i, offset : offset + len(row)] = True
        return values, mask

    chosen, chosen_mask = layout(chosen_tokens, chosen_offset)
    rejected, rejected_mask = layout(rejected_tokens, [0] * len(rejected_tokens))
    return {
        "chosen_token_logps": chosen,
        "chosen_mask": chosen_mask,
        "rejected_token_logps": rejected,
        "rejected_mask": rejected_mask,
    }


def test_length_desensitize():
    """α = 0.5, l_p = min(|y+|, |y-|):

    pair 0: y+ = (-1, -2, -3) (starting at position 1), y- = (-1,)*5: l_p = 3;
            y+ -> -6 (no tail), y- -> -3 + 0.5·(-2) = -4
    pair 1: y+ = (-2,)*4, y- = (-4, -4): l_p = 2;  y+ -> -4 + 0.5·(-4) = -6,  y- -> -8
    α = 1 gives the plain sums (-6, -8) and (-5, -8); α = 0 keeps only the shared length: (-6, -4), (-3, -8).
    """
    extras = ld_extras([[-1, -2, -3], [-2, -2, -2, -2]], [[-1] * 5, [-4, -4]], chosen_offset=[1, 0])
    pair = logps([-6, -8], [-5, -8], [3, 4], [5, 2], **extras)
    out = length_desensitize(pair, 0.5)
    assert out.chosen.tolist() == pytest.approx([-6, -6])
    assert out.rejected.tolist() == pytest.approx([-4, -8])
    assert out.chosen_tokens.tolist() == [3, 4]
    full = length_desensitize(pair, 1.0)
    assert (full.chosen.tolist(), full.rejected.tolist()) == ([-6, -8], [-5, -8])
    shared = length_desensitize(pair, 0.0)
    assert (shared.chosen.tolist(), shared.rejected.tolist()) == ([-6, -4], [-3, -8])


def test_ld_alpha_applies_to_policy_and_reference():
    """α = 0.5. Policy y+ = (-1, -2, -3), y- = (-1,)*5 -> -6, -4. Reference y+ = (-1,)*3, y- = (-2,)*5
    -> -3, -6 + 0.5·(-4) = -8. s+ = -3, s- = 4, Δ = -7: loss = -log σ(-0.7) = 1.103186 (without LD: Δ = -8).
    ipo reads averaged log-probs, which LD does not touch."""
    policy = logps(-6, -5, 3, 5, **ld_extras([[-1, -2, -3]], [[-1] * 5], [0]))
    reference = logps(-3, -10, 3, 5, **ld_extras([[-1] * 3], [[-2] * 5], [0]))
    settings = LossSettings(beta=BETA, ld_alpha=0.5)
    out = compute_preference_loss(policy, reference, ["sigmoid"], None, settings)
    assert out.losses.item() == pytest.approx(softplus(0.7))
    assert out.losses.item() == pytest.approx(1.103186, abs=1e-6)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-0.3, 0.4))
    plain_ipo = compute_preference_loss(policy, reference, ["ipo"], None, LossSettings(beta=BETA))
    ld_ipo = compute_preference_loss(policy, reference, ["ipo"], None, settings)
    torch.testing.assert_close(ld_ipo.losses, plain_ipo.losses)


def test_modifiers_name_missing_extras():
    with pytest.raises(ValueError, match="chosen_token_logps"):
        compute_preference_loss(POLICY, REFERENCE, ["sigmoid"], None, LossSettings(ld_alpha=0.5))
    with pytest.raises(ValueError, match="chosen_token_sqnorm"):
        wpo_weights(POLICY)


# The standard pair with WPO extras: y+ tokens (-2, -3, -2, -3) sum to -10 with log Σπ² = (-1.5, -2.5, -1.5, -2.5);
# y- tokens (-2, -3, -3, -3, -3) sum to -14 with log Σπ² = (0, -1, -1, -1, -1); a padded slot holds garbage.
WPO_POLICY = dataclasses.replace(
    POLICY,
    extras={
        "chosen_token_logps": as_tensor([[-2, -3, -2, -3, 0]]),
        "chosen_token_sqnorm": as_tensor([[-1.5, -2.5, -1.5, -2.5, 99]]),
        "chosen_mask": torch.tensor([[True, True, True, True, False]]),
        "rejected_token_logps": as_tensor([[-2, -3, -3, -3, -3]]),
        "rejected_token_sqnorm": as_tensor([[0, -1, -1, -1, -1]]),
        "rejected_mask": torch.tensor([[True] * 5]),
    },
)


def test_wpo_weights():
    """chosen: mean(-2+1.5, -3+2.5, ...) = -0.5; rejected: mean(-2-0, -3+1, ...) = -2; w = e^-2.5 = 0.082085."""
    assert wpo_weights(WPO_POLICY).item() == pytest.approx(math.exp(-2.5))
    assert not wpo_weights(WPO_POLICY).requires_grad


def test_use_weighting_multiplies_the_loss():
    """e^-2.5 · 0.554355 = 0.082085 · 0.554355 = 0.045504; metric wpo_weight = 0.082085."""
    out = compute_preference_loss(WPO_POLICY, REFERENCE, ["sigmoid"], None, LossSettings(use_weighting=True))
    assert out.losses.item() == pytest.approx(math.exp(-2.5) * softplus(-0.3))
    assert out.metrics["wpo_weight"].item() == pytest.approx(math.exp(-2.5))


def test_bco_mix():
    """LLaMA-Factory's mix, w = 0.5: (0.554355 + 0.5·1.242536) / 1.5 = 0.783749; metric bco_loss = 1.242536."""
    out = compute_preference_loss(POLICY, REFERENCE, ["sigmoid"], None, LossSettings(bco_weight=0.5))
    assert out.losses.item() == pytest.approx((softplus(-0.3) + 0.5 * (softplus(-0.2) + softplus(-0.1))) / 1.5)
    assert out.losses.item() == pytest.approx(0.783749, abs=1e-6)
    assert out.metrics["bco_loss"].item() == pytest.approx(1.242536, abs=1e-6)


def test_ftx_adds_the_chosen_nll():
    """RPO, ftx = 0.2: 0.554355 + 0.2·2.5 = 1.054355; metric sft_loss = 2.5."""
    out = compute_preference_loss(POLICY, REFERENCE, ["sigmoid"], None, LossSettings(ftx=0.2))
    assert out.losses.item() == pytest.approx(softplus(-0.3) + 0.5)
    assert out.metrics["sft_loss"].item() == pytest.approx(2.5)
    assert "sft_loss" not in compute_preference_loss(POLICY, REFERENCE, ["sigmoid"], None, LossSettings()).metrics


def test_modifiers_apply_in_order():
    """WPO weighs the losses only, the BCO mix comes next, the SFT term last:
    (e^-2.5·0.554355 + 0.5·1.242536) / 1.5 + 0.2·2.5 = (0.045504 + 0.621268) / 1.5 + 0.5 = 0.944515."""
    settings = LossSettings(use_weighting=True, bco_weight=0.5, ftx=0.2)
    out = compute_preference_loss(WPO_POLICY, REFERENCE, ["sigmoid"], None, settings)
    bco = softplus(-0.2) + softplus(-0.1)
    assert out.losses.item() == pytest.approx((math.exp(-2.5) * softplus(-0.3) + 0.5 * bco) / 1.5 + 0.5)
    assert out.losses.item() == pytest.approx(0.944515, abs=1e-6)


def test_combined_losses_report_each_component():
    """MPO-style sigmoid + bco_pair + sft, weights 0.8, 0.2, 1: 0.8·0.554355 + 0.2·1.242536 + 2.5 = 3.191991.
    Rewards are the first loss's (β·s+ = 0.2)."""
    out = compute_preference_loss(POLICY, REFERENCE, ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], LossSettings())
    assert out.losses.item() == pytest.approx(3.191991, abs=1e-6)
    assert out.metrics["loss/sigmoid"].item() == pytest.approx(softplus(-0.3))
    assert out.metrics["loss/bco_pair"].item() == pytest.approx(softplus(-0.2) + softplus(-0.1))
    assert out.metrics["loss/sft"].item() == pytest.approx(2.5)
    assert out.metrics["sft_loss"].item() == pytest.approx(2.5)
    assert out.chosen_rewards.item() == pytest.approx(0.2)
    single = compute_preference_loss(POLICY, REFERENCE, ["sigmoid"], None, LossSettings())
    assert not any(key.startswith("loss/") for key in single.metrics)


def test_compute_preference_loss_checks_weights():
    with pytest.raises(ValueError, match="2 loss names and 1 weights"):
        compute_preference_loss(POLICY, REFERENCE, ["sigmoid", "sft"], [1.0], LossSettings())


# --------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "names, weights, settings, has_ref",
    [
        (["sigmoid"], None, {}, False),
        (["sigmoid"], None, {"label_smoothing": 0.1, "f_divergence_type": "js_divergence"}, True),
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {}, False),
        (["simpo"], None, {"simpo_gamma": 1.0, "beta": 2.0}, False),
        (["orpo"], None, {}, False),
        (["exo_pair"], None, {"label_smoothing": 1e-3}, False),
        (["sigmoid"], None, {"ld_alpha": 0.5, "use_weighting": True, "bco_weight": 0.5, "ftx": 0.1}, False),
        (["sigmoid"], None, {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5}, False),
        (["simpo"], None, {"bco_weight": 0.5}, True),
    ],
)
def test_valid_settings_have_no_problems(names, weights, settings, has_ref):
    assert loss_problems(names, weights, LossSettings(**settings), has_ref) == []


@pytest.mark.parametrize(
    "names, weights, settings, has_ref, keys",
    [
        (["hinge"], None, {"label_smoothing": 0.1}, False, ["pref_loss=hinge", "dpo_label_smoothing", "remove"]),
        (["ipo"], None, {"label_smoothing": 0.1}, False, ["pref_loss=ipo", "dpo_label_smoothing"]),
        (["exo_pair"], None, {}, False, ["pref_loss=exo_pair", "dpo_label_smoothing > 0"]),
        (["sigmoid"], None, {"label_smoothing": 0.7}, False, ["dpo_label_smoothing=0.7", "[0, 0.5)"]),
        (["robust"], None, {"label_smoothing": 0.5}, False, ["dpo_label_smoothing=0.5", "pref_loss=robust"]),
        (["simpo", "orpo"], None, {}, True, ["ref_model", "pref_loss=simpo,orpo", "remove ref_model"]),
        (["aot"], None, {"use_weighting": True}, False, ["use_weighting", "pref_loss=aot"]),
        (["aot_unpaired"], None, {"use_weighting": True}, False, ["use_weighting", "pref_loss=aot_unpaired"]),
        (["sigmoid", "sft"], [1.0], {}, False, ["pref_loss_weights has 1", "pref_loss names 2"]),
        (["sigmoid"], [-1.0], {}, False, ["pref_loss_weights", "negative"]),
        (["sigmod"], None, {}, False, ["pref_loss", "did you mean 'sigmoid'"]),
        (["sigmoid", "sigmoid"], None, {}, False, ["pref_loss lists sigmoid", "pref_loss_weights"]),
        ([], None, {}, False, ["pref_loss is empty"]),
        (["ipo"], None, {"f_divergence_type": "forward_kl"}, False, ["f_divergence_type=forward_kl", "pref_loss=ipo"]),
        (["sigmoid"], None, {"f_divergence_type": "js"}, False, ["f_divergence_type", "did you mean 'js_divergence'"]),
        (["sigmoid"], None, {"f_alpha_divergence_coef": 0.5}, False, ["f_alpha_divergence_coef", "f_divergence_type"]),
        (["sigmoid"], None, {"beta": 0.0}, False, ["pref_beta=0.0", "> 0"]),
        (["sigmoid"], None, {"simpo_gamma": 1.0}, False, ["simpo_gamma", "pref_loss=sigmoid"]),
        (["sigmoid"], None, {"discopop_tau": 0.1}, False, ["discopop_tau", "pref_loss=sigmoid"]),
        (["discopop"], None, {"discopop_tau": 0.0}, False, ["discopop_tau=0.0", "> 0"]),
        (["sigmoid"], None, {"ld_alpha": 1.5}, False, ["ld_alpha=1.5", "[0, 1]"]),
        (["simpo"], None, {"ld_alpha": 0.5}, False, ["ld_alpha", "pref_loss=simpo"]),
        (["bco_pair"], None, {"bco_weight": 0.5}, False, ["pref_bco_weight", "bco_pair", "pref_loss"]),
        (["sigmoid"], None, {"ftx": -1.0}, False, ["pref_ftx=-1.0"]),
    ],
)
def test_each_problem_names_the_keys_and_the_fix(names, weights, settings, has_ref, keys):
    problems = loss_problems(names, weights, LossSettings(**settings), has_ref)
    assert len(problems) == 1, problems
    for key in keys:
        assert key in problems[0], f"{key!r} not in {problems[0]!r}"
    assert "\n" not in problems[0]


def test_all_problems_are_reported_together():
    settings = LossSettings(beta=-1.0, label_smoothing=0.2, use_weighting=True)
    problems = loss_problems(["aot", "simpo", "hing"], [1.0, 1.0], settings, has_ref_model=False)
    joined = "\n".join(problems)
    for fragment in ("did you mean 'hinge'", "pref_loss_weights has 2", "pref_beta=-1.0", "use_weighting"):
        assert fragment in joined
    assert len(problems) == 4


# --------------------------------------------------------------------------------------------------
# docs/losses.md stays in step with the registry

DOCS = Path(__file__).resolve().parents[1] / "docs" / "losses.md"


def test_docs_table_lists_every_loss_as_registered():
    rows = {}
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\|\s*`([a-z_]+)`\s*\|.*\|\s*(yes|no)\s*\|\s*(summed|averaged)\s*\|(.*)\|\s*$", line)
        if match:
            rows[match.group(1)] = (match.group(2) == "yes", match.group(3) == "averaged", match.group(4))
    assert sorted(rows) == sorted(LOSSES)
    for name, (reference, averaged, paper) in rows.items():
        spec = LOSSES[name]
        assert (reference, averaged) == (spec.needs_reference, spec.averaged), name
        arxiv = re.search(r"\d{4}\.\d{5}", spec.paper)
        assert arxiv is None or arxiv.group(0) in paper, name


def test_loss_functions_never_raise_config_errors():
    """Settings problems are the config check's (registry constraints); a loss function only computes."""
    import ast
    import inspect

    for name, spec in LOSSES.items():
        tree = ast.parse(inspect.getsource(spec.fn).lstrip())
        raised = [ast.unparse(node.exc) for node in ast.walk(tree) if isinstance(node, ast.Raise) and node.exc]
        assert not any("ConfigError" in r for r in raised), name
