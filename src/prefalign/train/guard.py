"""`RunWatch`: checks every optimizer step before it is applied, and stops a run cleanly.

Per step, once, before `optimizer.step()` (one all-reduce of three numbers under several
processes, so every rank takes the same decision at the same step):
  - a non-finite loss or gradient norm halts the run with `DivergenceError` naming the step and
    the last good checkpoint; the update is never applied, logged or saved as the final model
    (under fp16 a non-finite gradient norm is the loss scaler's business and is not checked);
  - a stop requested by a signal (see signals.py) on any rank stops every rank after this step,
    with a checkpoint saved whatever `save_strategy` says.
It also keeps the whole-run totals (summed step losses, runtime; carried across resumes in the
checkpoint marker) and warns at the end when the run did not learn.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from prefalign.errors import PrefalignError
from prefalign.train.checkpoints import Totals, newest_complete

logger = logging.getLogger(__name__)

NO_LEARNING_STEPS = 10  # a run this long whose grad norm is always 0, or loss always its first value, learnt nothing


class DivergenceError(PrefalignError):
    """The loss or the gradient norm became NaN or infinite."""


def no_learning_warning(losses: list[float], grad_norms: list[float]) -> str | None:
    """The warning for a run that did not learn, or None. `losses`, `grad_norms`: one per optimizer step."""
    steps = len(losses)
    if steps < NO_LEARNING_STEPS:
        return None
    if grad_norms and all(g == 0 for g in grad_norms):
        return (f"the gradient norm was exactly 0 at all {steps} steps: nothing was trained. Check that the trained "
                "parameters are on the loss's path (finetuning_type, lora_target, freeze_trainable_modules)")
    if all(loss == losses[0] for loss in losses):
        return (f"the loss stayed at its first value {losses[0]:.6g} for all {steps} steps: the weights did not "
                "change what the loss sees. Check learning_rate (too small to move fp32 weights?), the trained "
                "parameters (finetuning_type, lora_target) and pref_beta")
    return None


class RunWatch(TrainerCallback):
    def __init__(self, stop_requested: Callable[[], bool] = lambda: False):
        self.stop_requested = stop_requested
        self.prior = Totals()  # of the steps before the checkpoint this run resumed from
        self.stopped_at: int | None = None  # the step after which a signal stopped the run
        self.losses: list[float] = []  # this session's step losses (mean over micro-batches and processes)
        self.grad_norms: list[float] = []
        self._step_loss: torch.Tensor | None = None
        self._grad_norm = None
        self._started = time.monotonic()

    # fed by PreferenceTrainer
    def add_micro_batch_loss(self, loss: torch.Tensor) -> None:
        """`loss`: a micro-batch's loss already divided by the accumulation steps (as the Trainer returns it)."""
        loss = loss.detach().float()
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss

    def set_grad_norm(self, grad_norm) -> None:
        self._grad_norm = grad_norm

    # totals
    def totals(self) -> Totals:
        return Totals(self.prior.loss_sum + sum(self.losses), self.prior.runtime_s + time.monotonic() - self._started)

    def whole_run_metrics(self, metrics: dict, global_step: int) -> dict:
        """`train_loss` and `train_runtime` of the whole run, resumed parts included."""
        totals = self.totals()
        metrics = dict(metrics, train_runtime=round(totals.runtime_s, 4))
        if global_step:
            metrics["train_loss"] = totals.loss_sum / global_step
        return metrics

    # the Trainer's events
    def on_train_begin(self, args, state, control, **kwargs):
        self._started = time.monotonic()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        device = args.device
        loss = self._step_loss if self._step_loss is not None else torch.tensor(float("nan"), device=device)
        norm = self._grad_norm if self._grad_norm is not None else 0.0
        values = torch.stack([loss.to(device).reshape(()), torch.as_tensor(norm, dtype=torch.float32, device=device),
                              torch.tensor(float(self.stop_requested()), device=device)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(values)  # sum: losses averaged below, any rank's stop request counts
            values[:2] /= torch.distributed.get_world_size()
        loss_value, norm_value, stop = values.tolist()
        self._step_loss, self._grad_norm = None, None
        step = state.global_step + 1
        bad = [f"the loss is {loss_value}"] if not math.isfinite(loss_value) else []
        if not args.fp16 and not math.isfinite(norm_value):
            bad.append(f"the gradient norm is {norm_value}")
        if bad:
            raise DivergenceError(_divergence_message(step, " and ".join(bad), args.output_dir))
        self.losses.append(loss_value)
        self.grad_norms.append(norm_value)
        if stop and self.stopped_at is None:
            self.stopped_at = step

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        warning = no_learning_warning(self.losses, self.grad_norms) if self.stopped_at is None else None
        if warning:
            logger.warning("This run did not learn: %s", warning)


def _divergence_message(step: int, what: str, output_dir: str) -> str:
    last = newest_complete(output_dir)
    kept = (f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it")
    return (f"step {step}: {what}, so training stopped before applying this step; nothing was saved as the "
            f"final model and {kept}. Lower learning_rate or set max_grad_norm (e.g. 1.0), with "
            "overwrite_output_dir: true or another output_dir")
