"""`prefalign train`: the six steps, top to bottom.

    parse -> seed -> data -> policy and reference -> train -> save
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from prefalign.config import RunConfig
from prefalign.data.collate import PairCollator, run_collator, with_lengths
from prefalign.data.pipeline import prepare_data
from prefalign.errors import ConfigError, reporting_disk_full
from prefalign.modeling.load import (
    REFERENCE_ADAPTER,
    compute_dtype,
    load_policy,
    load_tokenizer,
)
from prefalign.scoring import Scorer, build_planned_reference, reference_plan

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


def build_trainer(config: RunConfig, *, need_train: bool = True):
    """Steps 3 and 4: data, policy and reference, assembled into a `PreferenceTrainer`."""
    from transformers import set_seed

    from prefalign.train.trainer import PreferenceTrainer

    args, ft = config.training, config.finetuning
    set_seed(args.seed)

    # Step 3: data
    tokenizer = load_tokenizer(config.model)
    data = prepare_data(config.data, tokenizer, seed=args.seed, need_train=need_train)
    data.write(args.output_dir)
    print(data.summary.describe(), flush=True)

    # Step 4: policy and reference
    dtype = compute_dtype(args)
    policy = load_policy(config.model, ft, dtype)
    collator = run_collator(ft, tokenizer.pad_token_id)
    plan = reference_plan(config, "train")
    precompute = ft.precompute_ref_log_probs and config.objective.needs_reference
    reference = build_planned_reference(config, plan, policy, dtype=dtype, for_precompute=precompute)
    if precompute:
        from prefalign.reference_cache import precompute_reference

        sources = {"model_name_or_path": config.model.model_name_or_path,
                   "adapter_name_or_path": config.model.adapter_name_or_path,
                   "ref_model": ft.ref_model, "ref_model_adapters": ft.ref_model_adapters}
        reference = precompute_reference(
            reference, {"train": data.train, "eval": data.eval}, collator, sources=sources,
            template=config.data.template, cutoff_len=config.data.cutoff_len, device=args.device, dtype=dtype,
            batch_size=max(args.per_device_train_batch_size, args.per_device_eval_batch_size),
            process_index=args.process_index, num_processes=args.world_size,
        )
    logger.info("Reference: %s: %s", reference.name, plan.description)
    if _checkpointing(args) and hasattr(policy, "enable_input_require_grads"):
        policy.enable_input_require_grads()

    train, eval_ = data.train, data.eval
    if args.train_sampling_strategy in ("group_by_length", "batch_rebalance"):  # the samplers read `length`
        train = with_lengths(train, prefix_sharing=ft.prefix_sharing, column=args.length_column_name)
        eval_ = with_lengths(eval_, prefix_sharing=ft.prefix_sharing, column=args.length_column_name)
    return PreferenceTrainer(
        model=policy, args=args, train_dataset=train, eval_dataset=eval_,
        data_collator=collator, processing_class=tokenizer,
        reference=reference, objective=config.objective, chunk_size=ft.logits_chunk_size,
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
    write_run_report(config, trainer)
    print(f"Done. The aligned model and its results are in {out.resolve()}", flush=True)
    return metrics


def write_run_report(config: RunConfig, trainer) -> Path:
    """Score a few held-out pairs (training pairs without held-out data), then write report.html and README.md.

    Every process scores the samples (a sharded model needs all of them in its forward pass); the
    main process writes the files.
    """
    from prefalign.model_card import write_model_card
    from prefalign.report import REPORT_FILE, write_report, write_samples

    out = Path(config.training.output_dir)
    held_out = trainer.eval_dataset is not None
    dataset = trainer.eval_dataset if held_out else trainer.train_dataset
    samples = []
    if dataset is not None and len(dataset):
        scorer = Scorer(trainer.model, trainer.reference, config.objective, config.finetuning.logits_chunk_size)
        samples = scorer.samples(dataset, PairCollator(trainer.processing_class.pad_token_id),
                                 trainer.processing_class, device=trainer.args.device,
                                 split="eval" if held_out else "train")
    if not trainer.is_world_process_zero():
        return out / REPORT_FILE
    write_samples(out, samples, held_out=held_out)
    path = write_report(out)
    write_model_card(config, out)
    return path

