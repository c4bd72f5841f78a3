"""`prefalign train`: the six steps, top to bottom.

    parse -> seed -> data -> policy and reference -> train -> save
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import yaml

from prefalign.config import RunConfig
from prefalign.config.args import OPTIMIZER_KEYS
from prefalign.data.collate import PairCollator, with_lengths
from prefalign.data.feedback import label_counts
from prefalign.data.pipeline import PreparedData, prepare_data
from prefalign.distributed import barrier, is_main_process
from prefalign.errors import PrefalignError, reporting_disk_full
from prefalign.integrity import replace_folder, write_text_atomic
from prefalign.losses import weight_balance_warning
from prefalign.modeling.layout import run_layout
from prefalign.modeling.load import (
    PISSA_CONVERTED,
    PISSA_INIT,
    REFERENCE_ADAPTER,
    compute_dtype,
    load_policy,
    load_run_tokenizer,
    save_pissa_adapter,
)
from prefalign.modeling.logprobs import causal_lm
from prefalign.modeling.vision import is_vision_language, load_vision, save_processor
from prefalign.modeling.zero import return_gathered_memory_on_cpu
from prefalign.reference import plan_precompute, reference_reads
from prefalign.scoring import Scorer, build_planned_reference, reference_plan
from prefalign.train import checkpoints
from prefalign.train.lock import LOCK_NAME, OutputDirLock
from prefalign.train.signals import Interrupted, StopSignals

logger = logging.getLogger(__name__)


def load_data(config: RunConfig, *, need_train: bool = True) -> tuple[object, PreparedData, object]:
    """Step 3: the tokenizer, the encoded data and the vocabulary change (data/vocab.py) the models get
    (nothing is written to the output dir yet)."""
    with config.training.main_process_first(desc="data encoding"):  # the other processes read its cache
        tokenizer, vocab = load_run_tokenizer(config)
        return tokenizer, prepare_data(config.data, tokenizer, seed=config.training.seed, need_train=need_train,
                                        unpaired=config.objective.unpaired,
                                        vision=load_vision(config.model, config.data, tokenizer)), vocab


def build_trainer(config: RunConfig, *, need_train: bool = True, prepared: tuple | None = None,
                  settings: dict | None = None):
    """Steps 3 and 4: data (or `prepared`, from `load_data`), policy and reference, as a `PreferenceTrainer`.

    `settings`: the run's resume settings (checkpoints.py), computed from the data when not given.
    """
    from transformers import set_seed

    from prefalign.train.trainer import PreferenceTrainer

    args, ft = config.training, config.finetuning
    tokenizer, data, vocab = prepared or load_data(config, need_train=need_train)
    if is_main_process():
        data.write(args.output_dir)
        print(data.summary.describe(), flush=True)
        if config.objective.unpaired and data.train is not None:
            balance = weight_balance_warning(*label_counts(data.train), config.objective.settings)
            if balance:
                logger.warning(balance)

    # Step 4: policy and reference
    set_seed(args.seed)
    dtype = compute_dtype(config)
    return_gathered_memory_on_cpu()
    policy = load_policy(config.model, ft, dtype, vocab)
    if ft.pissa_init and data.train is not None and is_main_process():  # before training (and any resume) moves it
        staging = Path(args.output_dir) / f".{PISSA_INIT}-staging"
        save_pissa_adapter(policy, staging)
        replace_folder(staging, Path(args.output_dir) / PISSA_INIT)
    plan = reference_plan(config, "train")
    train_pairs = len(data.train) if data.train is not None else None
    eval_pairs = len(data.eval) if data.eval is not None else 0
    precompute_plan = plan_precompute(
        ft.precompute_ref_log_probs, plan.strategy, streaming=config.data.streaming, train_pairs=train_pairs,
        eval_pairs=eval_pairs, reads=reference_reads(args, train_pairs or 0, eval_pairs))
    logger.info("Reference precompute: %s", precompute_plan.describe())
    precompute = precompute_plan.on
    reference = build_planned_reference(config, plan, policy, dtype=dtype, for_precompute=precompute, vocab=vocab)
    layout, collator = run_layout(ft, config.data, tokenizer.pad_token_id, policy, reference.model, vision=data.vision)
    if precompute:
        from prefalign.reference_cache import precompute_reference

        sources = {"model_name_or_path": config.model.model_name_or_path,
                   "adapter_name_or_path": config.model.adapter_name_or_path,
                   "ref_model": ft.ref_model, "ref_model_adapters": ft.ref_model_adapters,
                   "vocabulary": vocab.identity}
        reference = precompute_reference(
            reference, {"train": data.train, "eval": data.eval}, collator, sources=sources,
            template=config.data.template, cutoff_len=config.data.cutoff_len, device=args.device, dtype=dtype,
            batch_size=max(args.per_device_train_batch_size, args.per_device_eval_batch_size),
            process_index=args.process_index, num_processes=args.world_size,
        )
    logger.info("Reference: %s: %s", reference.name, plan.description)
    if _checkpointing(args) and hasattr(policy, "enable_input_require_grads"):
        policy.enable_input_require_grads()

    train, eval_ = data.train, data.eval_sets
    if args.train_sampling_strategy in ("group_by_length", "batch_rebalance"):  # the samplers read `length`
        def lengths(dataset):
            return with_lengths(dataset, prefix_sharing=layout.prefix_sharing, column=args.length_column_name)

        train = lengths(train)
        eval_ = {k: lengths(v) for k, v in eval_.items()} if isinstance(eval_, dict) else lengths(eval_)
    if config.data.streaming and train is not None:
        # as LLaMA-Factory streams: read in order through a seeded shuffle buffer (the Trainer adds no sampler)
        train = train.to_iterable_dataset().shuffle(seed=args.seed, buffer_size=config.data.buffer_size)
    trainer = PreferenceTrainer(
        model=policy, args=args, train_dataset=train, eval_dataset=eval_,
        data_collator=collator, processing_class=tokenizer,
        reference=reference, objective=config.objective, chunk_size=ft.logits_chunk_size,
        loraplus=None if ft.loraplus_lr_ratio is None else (ft.loraplus_lr_ratio, ft.loraplus_lr_embedding),
        optimizer_keys=ft if any(getattr(ft, key) for key in OPTIMIZER_KEYS) else None,
        activation_offload=ft.activation_offload,
    )
    if ft.use_swanlab:
        trainer.add_callback(swanlab_callback(ft))
    if ft.early_stopping_steps is not None:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=ft.early_stopping_steps))
    if data.train is not None:
        trainer.resume_settings = settings or checkpoints.resume_settings(config, data.train)
    return trainer


def swanlab_callback(ft):
    """transformers' SwanLabCallback, its run started with LLaMA-Factory's swanlab_* keys.

    The run is started here, on the main process, before the callback's own setup: that setup calls
    `swanlab.get_run()`, which swanlab >= 0.10 raises on instead of returning None when no run is active.
    """
    try:
        import swanlab
        from transformers.integrations import SwanLabCallback
    except ImportError:
        raise PrefalignError("use_swanlab: true needs the swanlab package; pip install 'prefalign[swanlab]' "
                             "(or swanlab), or set use_swanlab: false") from None

    class _Callback(SwanLabCallback):
        def setup(self, args, state, model, **kwargs):
            if state.is_world_process_zero:
                if ft.swanlab_api_key is not None:
                    swanlab.login(api_key=ft.swanlab_api_key)
                swanlab.init(project=ft.swanlab_project, workspace=ft.swanlab_workspace, name=args.run_name,
                             mode="online" if ft.swanlab_mode == "cloud" else ft.swanlab_mode,
                             log_dir=ft.swanlab_logdir)
            super().setup(args, state, model, **kwargs)

    return _Callback()


def _checkpointing(args) -> bool:
    return bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))


def run_train(config: RunConfig) -> dict:
    """parse (done by the caller) -> seed -> data -> models -> train -> save.

    Around it: the output dir's lock (lock.py), the signal handlers (signals.py), and the resume
    rules (checkpoints.py), checked before any model is loaded and before anything is written.
    """
    args = config.training
    first_process = is_main_process()
    with StopSignals() as signals, OutputDirLock(args.output_dir, enabled=first_process), \
            reporting_disk_full(args.output_dir):
        previous = checkpoints.find_previous(config, ignore=(LOCK_NAME,))
        prepared = load_data(config)
        settings = checkpoints.resume_settings(config, prepared[1].train)
        if previous is not None:
            checkpoints.check_settings(previous, settings)
            if previous.finished:
                print(f"{args.output_dir} already holds this run, finished at step {previous.marker.step} with the "
                      "same settings; nothing to do (set overwrite_output_dir: true to train it again)", flush=True)
                return _read_json(Path(args.output_dir) / "all_results.json")
        elif config.finetuning.overwrite_output_dir and first_process:
            # the run being overwritten no longer counts as finished, even if this one stops early
            (Path(args.output_dir) / checkpoints.MARKER).unlink(missing_ok=True)
        resume = str(previous.folder) if previous is not None else None
        trainer = build_trainer(config, prepared=prepared, settings=settings)
        trainer.watch.stop_requested = lambda: signals.requested
        if previous is not None:
            trainer.watch.prior = previous.marker.totals
        # Step 5: train
        signals.phase = "training"
        result = trainer.train(resume_from_checkpoint=resume)
        if trainer.watch.stopped_at is not None:
            raise Interrupted(signals.received, trainer.watch.stopped_at,
                              str(Path(args.output_dir) / f"checkpoint-{trainer.state.global_step}"))
        # Step 6: save
        signals.phase = "saving"
        result.metrics.update(trainer.watch.whole_run_metrics(result.metrics, trainer.state.global_step))
        return save_outputs(config, trainer, result)


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def save_final_model(trainer, out: Path, *, pissa_convert: bool = False, model_args=None) -> list[str]:
    """The final weights and tokenizer, each file renamed into `out` only when fully written (with
    `pissa_convert`, also the adapter converted to a LoRA of the original base, in `pissa_converted`; with
    `model_args` of a vision-language model, its image processor, as LLaMA-Factory saves the processor).

    peft saves every adapter; the frozen copy of an SFT adapter (the reference) is not an output
    (it stays loaded: the final evaluation and the report still need it).
    """
    staging = out / ".prefalign-final-save"  # one name for all processes; the lock keeps other runs out
    main = is_main_process()  # (on CPUs `args.should_save` is true on every process)
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    if main and pissa_convert:
        save_pissa_adapter(trainer.accelerator.unwrap_model(trainer.model), staging / PISSA_CONVERTED,
                           initial=out / PISSA_INIT)
    if main and model_args is not None and is_vision_language(causal_lm(trainer.model).config):
        save_processor(model_args, staging)
    trainer.accelerator.wait_for_everyone()
    names = []
    if main:
        shutil.rmtree(staging / REFERENCE_ADAPTER, ignore_errors=True)
        for path in sorted(staging.iterdir()):
            target = out / path.name
            if path.is_dir() and target.is_dir():
                shutil.rmtree(target)
            os.replace(path, target)
            names += ([p.relative_to(out).as_posix() for p in target.rglob("*") if p.is_file()]
                      if target.is_dir() else [path.name])
        staging.rmdir()
    trainer.accelerator.wait_for_everyone()
    return names


def save_outputs(config: RunConfig, trainer, result) -> dict:
    """Step 6. Every process takes part (a sharded model is gathered to be saved and scored);
    the main process writes the files."""
    args = config.training
    out = Path(args.output_dir)
    model_files = save_final_model(trainer, out, pissa_convert=config.finetuning.pissa_convert,
                                   model_args=config.model)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    trainer.save_state()  # after the final evaluation, so its log entry is in trainer_state.json (and the plots)
    if is_main_process():
        write_text_atomic(out / "run_config.yaml", yaml.safe_dump(config.raw, sort_keys=False))
        if config.finetuning.plot_loss:
            from prefalign.report import plot_metrics

            plot_metrics(out)
    write_run_report(config, trainer)  # report.html and the README.md model card (main process)
    barrier()  # the outputs are complete when any process returns
    # last: the marker that says this output dir holds a finished run, and with which settings
    if is_main_process():
        checkpoints.mark_complete(out, step=trainer.state.global_step, settings=trainer.resume_settings,
                                  totals=trainer.watch.totals(), files=model_files)
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
    from datasets import Dataset, IterableDataset, concatenate_datasets

    if isinstance(dataset, dict):  # eval_on_each_dataset: the samples come from all of them
        dataset = concatenate_datasets(list(dataset.values()))
    elif isinstance(dataset, IterableDataset):  # streaming: the stream's first pairs
        dataset = Dataset.from_list(list(dataset.take(8)))
    samples = []
    if dataset is not None and len(dataset):
        scorer = Scorer(trainer.model, trainer.reference, config.objective, config.finetuning.logits_chunk_size)
        vision = getattr(trainer.data_collator, "vision", None)  # pairs with images: the run's image processing
        samples = scorer.samples(dataset, PairCollator(trainer.processing_class.pad_token_id, vision=vision),
                                 trainer.processing_class, device=trainer.args.device,
                                 split="eval" if held_out else "train")
    if not is_main_process():
        return out / REPORT_FILE
    write_samples(out, samples, held_out=held_out)
    path = write_report(out)
    write_model_card(config, out)
    return path

