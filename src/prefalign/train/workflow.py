"""`prefalign train`: the six steps, top to bottom.

    parse -> seed -> data -> policy and reference -> train -> save
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from prefalign import losses
from prefalign.config import RunConfig, loss_settings
from prefalign.data.collate import run_collator, with_lengths
from prefalign.data.pipeline import describe, prepare_data
from prefalign.errors import ConfigError, reporting_disk_full
from prefalign.modeling.load import (
    REFERENCE_ADAPTER,
    compute_dtype,
    load_policy,
    load_tokenizer,
)
from prefalign.reference import build_reference

logger = logging.getLogger(__name__)


def prepare_output_dir(config: RunConfig) -> str | None:
    """Check the output dir; return the checkpoint to resume from, if any.

    A dir holding checkpoints is resumed from its last one (unless `overwrite_output_dir`); a dir
    holding anything else is refused, so a finished run is never overwritten by accident.
    """
    from transformers.trainer_utils import get_last_checkpoint

    args = config.training
    out = Path(args.output_dir)
    if args.resume_from_checkpoint:
        return args.resume_from_checkpoint
    if not out.is_dir() or not any(out.iterdir()) or config.finetuning.overwrite_output_dir:
        return None
    last = get_last_checkpoint(str(out))
    if last is None:
        raise ConfigError(
            f"output_dir: {out} already holds files and no checkpoint to resume from; "
            "set overwrite_output_dir: true or choose another output_dir"
        )
    logger.info("Resuming from %s (set overwrite_output_dir: true to start over)", last)
    return last


def ensure_model(config: RunConfig) -> None:
    """Build the tiny demo model when the config asks for it and it is missing."""
    if config.model.build_demo_model:
        from prefalign.demo import ensure_demo_model

        ensure_demo_model(config.model.model_name_or_path)


def build_trainer(config: RunConfig, *, need_train: bool = True):
    """Steps 3 and 4: data, policy and reference, assembled into a `PreferenceTrainer`."""
    from transformers import set_seed

    from prefalign.train.trainer import PreferenceTrainer

    args, ft = config.training, config.finetuning
    set_seed(args.seed)

    # Step 3: data
    ensure_model(config)
    tokenizer = load_tokenizer(config.model)
    data = prepare_data(config.data, tokenizer, seed=args.seed, need_train=need_train)
    data.write(args.output_dir)
    print(describe(data.summary), flush=True)

    # Step 4: policy and reference
    dtype = compute_dtype(args)
    policy = load_policy(config.model, ft, dtype)
    settings = loss_settings(ft)
    needs_ref = losses.needs_reference(config.loss_names, settings)
    collator = run_collator(ft, tokenizer.pad_token_id)
    precompute = ft.precompute_ref_log_probs and needs_ref
    reference = build_reference(config, policy, needs_reference=needs_ref, dtype=dtype, for_precompute=precompute)
    if precompute:
        from prefalign.reference_cache import precompute_reference

        reference = precompute_reference(
            config, reference, {"train": data.train, "eval": data.eval}, collator, device=args.device, dtype=dtype,
            batch_size=max(args.per_device_train_batch_size, args.per_device_eval_batch_size),
            process_index=args.process_index, num_processes=args.world_size,
        )
    logger.info("Reference: %s", reference.name)
    if _checkpointing(args) and hasattr(policy, "enable_input_require_grads"):
        policy.enable_input_require_grads()

    train, eval_ = data.train, data.eval
    if args.train_sampling_strategy in ("group_by_length", "batch_rebalance"):  # the samplers read `length`
        train = with_lengths(train, prefix_sharing=ft.prefix_sharing, column=args.length_column_name)
        eval_ = with_lengths(eval_, prefix_sharing=ft.prefix_sharing, column=args.length_column_name)
    return PreferenceTrainer(
        model=policy, args=args, train_dataset=train, eval_dataset=eval_,
        data_collator=collator, processing_class=tokenizer,
        reference=reference, loss_names=config.loss_names, loss_weights=config.loss_weights,
        loss_settings=settings, chunk_size=ft.logits_chunk_size,
    )


def _checkpointing(args) -> bool:
    return bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))


def run_train(config: RunConfig) -> dict:
    """parse (done by the caller) -> seed -> data -> models -> train -> save."""
    resume = prepare_output_dir(config)
    with reporting_disk_full(config.training.output_dir):
        trainer = build_trainer(config)
        # Step 5: train
        result = trainer.train(resume_from_checkpoint=resume)
        # Step 6: save
        return save_outputs(config, trainer, result)


def save_outputs(config: RunConfig, trainer, result) -> dict:
    args = config.training
    out = Path(args.output_dir)
    trainer.save_model()
    # peft saves every adapter; the frozen copy of an SFT adapter (the reference) is not an output.
    # It stays loaded: the final evaluation and the report still need it.
    shutil.rmtree(out / REFERENCE_ADAPTER, ignore_errors=True)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    trainer.save_state()  # after the final evaluation, so its log entry is in trainer_state.json (and the plots)
    (out / "run_config.yaml").write_text(yaml.safe_dump(config.raw, sort_keys=False))
    if config.finetuning.plot_loss:
        from prefalign.report import plot_metrics

        plot_metrics(out)
    from prefalign.report import write_run_report

    write_run_report(config, trainer)  # report.html and the README.md model card
    print(f"Done. The aligned model and its results are in {out.resolve()}", flush=True)
    return metrics

