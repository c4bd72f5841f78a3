"""The no-learning rule of `RunWatch`, on step losses and gradient norms as a run logs them.

(The black-box side, a real run at lr 1e-30, is in test_faults.py; a run whose gradient norm is
exactly 0 at every step has no small real config, so that branch is checked here.)
"""

import math

from prefalign.train.guard import NO_LEARNING_STEPS, no_learning_warning


def test_a_gradient_norm_of_exactly_zero_at_every_step_is_named():
    warning = no_learning_warning([0.7, 0.69, 0.71] * 4, [0.0] * 12)
    assert warning.startswith("the gradient norm was exactly 0 at all 12 steps")
    assert "lora_target" in warning


def test_a_loss_stuck_at_its_first_value_is_named():
    ln2 = math.log(2)
    warning = no_learning_warning([ln2] * NO_LEARNING_STEPS, [0.3] * NO_LEARNING_STEPS)
    assert warning.startswith(f"the loss stayed at its first value {ln2:.6g} for all {NO_LEARNING_STEPS} steps")


def test_short_runs_and_runs_that_learn_get_no_warning():
    assert no_learning_warning([0.5] * (NO_LEARNING_STEPS - 1), [0.0] * (NO_LEARNING_STEPS - 1)) is None
    assert no_learning_warning([0.69] * 9 + [0.68], [0.2] * 10) is None  # moved once: it learns
    assert no_learning_warning([0.69] * 10, [0.0] * 9 + [1e-9]) is not None  # the loss rule still holds
