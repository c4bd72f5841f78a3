"""`prefalign eval`: score a trained policy against its reference on preference pairs, without training.

Which models are compared. Training reads `adapter_name_or_path` as the *starting point* (an SFT
adapter that becomes both the trainable copy and the reference); after training, the adapter to
look at is the *result*. Applying the training rule here would make the policy its own reference
(every margin zero), so eval and chat read the config this way:

  policy     `model_name_or_path` with every adapter in `adapter_name_or_path` applied (all but the
             last merged; the last one kept as a LoRA adapter that can be switched off).
  reference  `reference.plan_reference(phase="eval")`, the first that applies:
    none                reference-free losses (orpo, simpo, sft): nothing is loaded or run;
    `ref_model`         that model (+ `ref_model_adapters` merged), as in training;
    adapter-disabled    the policy with its last adapter switched off (base + earlier adapters):
                        the reference a LoRA run had when it started from the base.
  With no adapter and no `ref_model` there is nothing to compare with, which is an error. A run that
  started from an SFT adapter had base + SFT adapter as its reference: give `ref_model: <base>` and
  `ref_model_adapters: <SFT adapter>`. A full fine-tune needs `ref_model: <the model it started from>`.

Per pair the log-probs are summed over the response tokens only (up to and including the end-of-turn
token), exactly as the training loss reads them, and the loss is `pref_loss`. Pairs are scored in
file order in batches of `per_device_eval_batch_size`, last partial batch included. Losses that
read batch statistics (`kto_pair`, `aot`, `aot_unpaired`) depend on that batch size; for `aot*`,
whose losses belong to quantiles rather than pairs, the per-pair `loss` is null. With
`eval_on_each_dataset`, each eval dataset is scored on its own and its metrics are `eval_<name>_*`, as
training's evaluation names them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

from prefalign.config import RunConfig
from prefalign.distributed import gather_objects, is_main_process, rank, world_size
from prefalign.errors import ConfigError
from prefalign.modeling.layout import run_layout
from prefalign.modeling.load import compute_dtype, load_inference_policy, load_run_tokenizer
from prefalign.modeling.vision import load_vision
from prefalign.modeling.zero import loaded_whole
from prefalign.scoring import Scorer, build_planned_reference, reference_plan

logger = logging.getLogger(__name__)


def load_eval_data(config: RunConfig, tokenizer):
    """`eval_dataset` if set, else all of `dataset` (val_size is not applied), encoded, in file order."""
    from prefalign.data.pipeline import prepare_data

    data_args = config.data
    if not data_args.eval_dataset and not data_args.dataset:
        raise ConfigError("eval: no data to score; set eval_dataset (or dataset) to the preference pairs to score")
    if not data_args.eval_dataset:
        if data_args.val_size:
            logger.info("eval: val_size is not applied; scoring all of dataset. To score only held-out pairs, "
                        "give them as eval_dataset")
        data_args = dataclasses.replace(data_args, val_size=0.0)
    data = prepare_data(data_args, tokenizer, seed=config.training.seed, need_train=False,
                        unpaired=config.objective.unpaired, vision=load_vision(config.model, data_args, tokenizer))
    if is_main_process():
        print(data.summary.describe(), flush=True)
    dataset = data.eval if data_args.eval_dataset else data.train
    if dataset is None or len(dataset) == 0:
        raise ConfigError("eval: no pairs to score; check eval_dataset (or dataset)")
    return dataset, data


def _score_shards(scorer, dataset, collator, batch_size: int, device) -> tuple[list[dict], dict]:
    """Score `dataset`; under a launcher each process one contiguous shard. The main process gets every row,
    in file order, and the means over all of them; the others get ([], {})."""
    shard = dataset.shard(num_shards=world_size(), index=rank(), contiguous=True) if world_size() > 1 else dataset
    rows, means = scorer.score(shard, collator, batch_size=batch_size, device=device)
    pieces = gather_objects((rows, means))
    if not is_main_process():
        return [], {}
    rows = [row for part, _ in pieces for row in part]  # contiguous shards in rank order: file order
    return rows, {key: sum(m[key] * len(part) for part, m in pieces if part) / max(len(rows), 1) for key in means}


def run_eval(config: RunConfig) -> dict:
    """Score the policy against the reference; write eval_pairs.jsonl and eval_results.json; return the metrics.

    Under a launcher each process scores one contiguous shard of the pairs; the main process
    gathers the rows, in file order, and writes the files (the other processes return {}).
    """
    args = config.training
    plan = reference_plan(config, "eval")  # before loading anything: a config with no reference fails fast
    with args.main_process_first(desc="data encoding"):  # the other processes read its cache
        tokenizer, vocab = load_run_tokenizer(config)
        dataset, data = load_eval_data(config, tokenizer)

    dtype = compute_dtype(config)
    device = args.device
    with loaded_whole():  # eval is data-parallel: whole models in every process, whatever `deepspeed:` says
        policy = load_inference_policy(config.model, dtype, vocab).to(device)
        reference = build_planned_reference(config, plan, policy, dtype=dtype, vocab=vocab).to(device)
    logger.info("eval: policy %s%s, reference: %s", config.model.model_name_or_path,
                f" + {','.join(config.model.adapter_name_or_path)}" if config.model.adapter_name_or_path else "",
                plan.description)

    start = time.perf_counter()
    scorer = Scorer(policy, reference, config.objective, config.finetuning.logits_chunk_size)
    _, collator = run_layout(config.finetuning, config.data, tokenizer.pad_token_id, policy, reference.model,
                             vision=data.vision)
    # eval_on_each_dataset: each eval dataset scored on its own, its metrics `eval_<name>_*` as training's
    # eval gives them (transformers' dict of eval sets); else one set, `eval_*`
    sets = data.eval_by_dataset or {"": dataset}
    rows, metrics = [], {}
    for name, part in sets.items():
        part_rows, means = _score_shards(scorer, part, collator, args.per_device_eval_batch_size, device)
        if not is_main_process():
            continue
        prefix = f"eval_{name}_" if name else "eval_"
        metrics.update({f"{prefix}{key}": value for key, value in sorted(means.items())})
        metrics[f"{prefix}samples"] = len(part_rows)
        rows += part_rows
    if not is_main_process():
        return {}
    metrics["eval_runtime"] = round(time.perf_counter() - start, 4)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "eval_pairs.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    (out / "eval_results.json").write_text(json.dumps(metrics, indent=4, sort_keys=True) + "\n")
    if data.rejects:
        with open(out / "eval_rejected_records.jsonl", "w", encoding="utf-8") as fh:
            for reject in data.rejects:
                fh.write(json.dumps(reject, ensure_ascii=False, default=str) + "\n")
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"  {key:<{width}} = {value:.6g}" if isinstance(value, float) and math.isfinite(value)
              else f"  {key:<{width}} = {value}", flush=True)
    print(f"Per-pair scores: {(out / 'eval_pairs.jsonl').resolve()}", flush=True)
    return metrics
