"""`PreferenceTrainer`: transformers' Trainer with a preference loss and the metrics people read.

The Trainer does the optimisation, mixed precision, gradient accumulation, logging,
checkpoints and resume; this class only says how a batch becomes a loss:

    batch --scoring.score_batch--> LossOutput (policy and reference log-probs, the objective)
    --mean--> loss; per-pair metrics are stored as sums and counts, and averaged at logging time
    over all micro-batches and processes.

Two additions to the Trainer's machinery: every step's loss and gradient norm go to `RunWatch`
(guard.py: divergence halts, signal stops, whole-run totals), and a checkpoint counts only once
its completeness marker is written (checkpoints.py).

Each training log also says how fast the run goes (modeling/throughput.py): tokens/s, the fraction of
computed positions that are padding, and the MFU-style figure.
"""

from __future__ import annotations

import contextlib

import os
from collections import defaultdict

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from prefalign.contracts import LossOutput, PairLogps
from prefalign.errors import reporting_disk_full
from prefalign.losses import Objective
from prefalign.metrics import pair_metrics, reduced, sum_and_count
from prefalign.modeling.throughput import ModelShape, ThroughputMeter, forward_passes, matmul_rate
from prefalign.modeling.vision import TowerCounter
from prefalign.reference import Reference
from prefalign.scoring import score_batch
from prefalign.train.checkpoints import clear_for_save, mark_complete
from prefalign.train.guard import RunWatch


class PreferenceTrainer(Trainer):
    def __init__(self, *args, reference: Reference, objective: Objective, chunk_size: int = 1024,
                 loraplus: tuple[float, float] | None = None, optimizer_keys=None, activation_offload: bool = False,
                 **kwargs):
        self.activation_offload = activation_offload  # the policy's saved activations in CPU memory
        self.loraplus = loraplus  # (loraplus_lr_ratio, loraplus_lr_embedding), or None: the Trainer's groups
        self.optimizer_keys = optimizer_keys  # FinetuningArguments with an LF optimizer key set (use_galore...), or None
        super().__init__(*args, **kwargs)
        self.reference = reference.to(self.args.device)
        self.objective = objective
        self.chunk_size = chunk_size
        # Our loss is a mean over pairs: the Trainer must divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._metric_sums: dict[str, dict[str, list]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        if optimizer_keys is not None and optimizer_keys.use_badam:
            self._badam_hooks()
        self.watch = RunWatch()
        self.add_callback(self.watch)
        self.resume_settings: dict = {}  # recorded in every checkpoint's marker (set by the workflow)
        self._throughput: ThroughputMeter | None = None
        self._towers: TowerCounter | None = None  # a vision-language model's tower runs per pair

    def _badam_hooks(self) -> None:
        """What BAdam needs of the Trainer (as LLaMA-Factory wires it): the torch 1.13 clip_grad_norm_ (ratio mode's
        gradients are sparse, which torch's foreach norm refuses) and BAdam's callback (gradient checkpointing
        that backpropagates into the active block only)."""
        from types import MethodType

        from badam import BAdamCallback, clip_grad_norm_old_version

        self.accelerator.clip_grad_norm_ = MethodType(clip_grad_norm_old_version, self.accelerator)
        self.add_callback(BAdamCallback)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer; with an LF optimizer key (use_galore, use_apollo, use_muon, use_adam_mini, use_badam), that
        optimizer (train/optimizers.py); with LoRA+, peft's LoRA+ parameter groups (peft.optimizers): A matrices
        at learning_rate, B matrices and 1-D parameters at learning_rate x ratio, the parameters of LoRA
        embedding layers at loraplus_lr_embedding; weight decay the Trainer's `weight_decay`."""
        if self.optimizer is not None or (self.loraplus is None and self.optimizer_keys is None):
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if self.optimizer_keys is not None:
            from prefalign.train.optimizers import custom_optimizer

            self.optimizer = custom_optimizer(opt_model, self.optimizer_keys, self.args,
                                              self.get_decay_parameter_names(opt_model), kwargs)
            return self.optimizer
        from peft.optimizers import create_loraplus_optimizer

        kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
        ratio, embedding_lr = self.loraplus
        self.optimizer = create_loraplus_optimizer(
            opt_model, optimizer_cls, lr=self.args.learning_rate, loraplus_lr_ratio=ratio,
            loraplus_lr_embedding=embedding_lr, loraplus_weight_decay=self.args.weight_decay, **kwargs)
        return self.optimizer

    # -- the loss -------------------------------------------------------------------------
    def batch_loss(self, model, inputs, split: str = "train") -> tuple[torch.Tensor, LossOutput, PairLogps]:
        # `split`: a precomputed reference keeps one table per split (pair indices restart at 0 in each)
        out, policy, _ = score_batch(model, self.reference, self.objective, inputs, split=split,
                                     chunk_size=self.chunk_size)
        loss = out.losses.mean()
        if policy.router_aux_loss is not None:  # moe_aux_loss_coef: the router's load balance, added as transformers does
            loss = loss + policy.router_aux_loss.to(loss.dtype)
        return loss, out, policy

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.throughput_meter(model).add(inputs)  # before the forward: the meter's clock starts at its first batch
        offload = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) \
            if self.activation_offload and torch.is_grad_enabled() else contextlib.nullcontext()
        if self._towers is None:
            self._towers = TowerCounter([model, self.reference.model])
        with offload, self._towers.counting(inputs):
            loss, out, policy = self.batch_loss(model, inputs)
        self._store_metrics(out, policy, "train")
        return (loss, out) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, out, policy = self.batch_loss(model, inputs, split="eval")
        self._store_metrics(out, policy, "eval")
        return loss.detach(), None, None

    # -- the step watch and complete checkpoints ---------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.watch.add_micro_batch_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self.watch.set_grad_norm(grad_norm)
        return grad_norm

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, then the marker that makes it count, then the rotation of old ones.

        Rotation waits for the marker, so a save cut short never costs the previous complete checkpoint.
        """
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        # the accelerator's main process: on CPUs `args.should_save` is true on every process of a torchrun run
        main = self.accelerator.is_main_process
        if main:
            clear_for_save(folder)
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            with reporting_disk_full(folder):  # cut short: no marker, so the last complete checkpoint is resumed
                super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states, shards) are written
        if main:
            mark_complete(folder, step=self.state.global_step, settings=self.resume_settings,
                          totals=self.watch.totals())
            rotate_checkpoints(output_dir=self._get_output_dir(trial=trial), save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    # -- metrics --------------------------------------------------------------------------
    def _store_metrics(self, out: LossOutput, policy: PairLogps, split: str) -> None:
        store = self._metric_sums[split]
        for key, value in pair_metrics(out, policy).items():
            store[key].append(sum_and_count(value))

    def throughput_meter(self, model) -> ThroughputMeter:
        """The training meter, made at the first batch: the model's shape, its passes per step, the device's rate."""
        if self._throughput is None:
            params = [p for p in model.parameters()]
            trains_weights = sum(p.numel() for p in params if p.requires_grad) > 0.5 * sum(p.numel() for p in params)
            passes = forward_passes(backward=True, trains_weights=trains_weights,
                                    live_reference=self.reference.model is not None)
            dtype = next(p for p in params).dtype
            if self.args.bf16 or self.args.fp16:
                dtype = torch.bfloat16 if self.args.bf16 else torch.float16
            self._throughput = ThroughputMeter(ModelShape.of(model), passes, matmul_rate(self.args.device, dtype))
        return self._throughput

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # a dict of eval sets comes back here once per set, as `eval_<name>`: its metrics take that prefix
        self._eval_prefix = f"{metric_key_prefix}_"
        try:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._eval_prefix = "eval_"

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "train" if "loss" in logs else "eval"
        prefix = getattr(self, "_eval_prefix", "eval_") if split == "eval" else ""
        if split == "train" and self._throughput is not None and self._throughput.start is not None:
            totals = self.accelerator.reduce(self._throughput.totals().to(self.args.device), reduction="sum")
            logs.update(self._throughput.report(totals.cpu(), processes=self.accelerator.num_processes))
        if split == "train" and self._towers is not None:
            totals = self.accelerator.reduce(self._towers.totals().to(self.args.device), reduction="sum")
            logs.update(self._towers.report(totals.cpu()))
        store = self._metric_sums[split]
        if store:
            keys = sorted(store)
            totals = torch.stack([torch.stack(store[k]).sum(0) for k in keys])  # (K, 2): sum, count
            totals = self.accelerator.reduce(totals.to(self.args.device), reduction="sum")
            for key, (total, count) in zip(keys, totals.tolist()):
                if (value := reduced(key, total, count)) is not None:
                    logs[prefix + key] = value
            store.clear()
        super().log(logs, start_time)
