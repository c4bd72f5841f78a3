"""`prefalign eval`: score a trained policy against its reference on preference pairs, without training.

Which models are compared. Training reads `adapter_name_or_path` as the *starting point* (an SFT
adapter that becomes both the trainable copy and the reference); after training, the adapter to
look at is the *result*. Applying the training rule here would make the policy its own reference
(every margin zero), so eval and chat read the config this way:

  policy     `model_name_or_path` with every adapter in `adapter_name_or_path` applied (all but the
             last merged; the last one kept as a LoRA adapter that can be switched off).
  reference  the first that applies:
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
whose losses belong to quantiles rather than pairs, the per-pair `loss` is null.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from prefalign import losses
from prefalign.config import RunConfig, loss_settings
from prefalign.contracts import LossOutput, PairLogps, batch_to
from prefalign.data.collate import PairCollator, run_collator
from prefalign.errors import ConfigError
from prefalign.metrics import pair_metrics
from prefalign.modeling.load import (
    _split_paths,
    compute_dtype,
    load_causal_lm,
    load_tokenizer,
    merge_adapters,
)
from prefalign.modeling.logprobs import pair_logps
from prefalign.reference import Reference, build_reference
from prefalign.throughput import ModelShape, ThroughputMeter, matmul_rate

logger = logging.getLogger(__name__)


# -- models -----------------------------------------------------------------------------------------
def load_inference_policy(config: RunConfig, dtype: torch.dtype = torch.float32):
    """`model_name_or_path` + `adapter_name_or_path` (the last adapter kept switchable), in eval mode, frozen."""
    from peft import PeftModel

    model = load_causal_lm(config.model.model_name_or_path, config.model, dtype)
    adapters = _split_paths(config.model.adapter_name_or_path)
    model = merge_adapters(model, adapters[:-1])
    if adapters:
        model = PeftModel.from_pretrained(model, adapters[-1], is_trainable=False)
    return model.eval().requires_grad_(False)


def check_reference_source(config: RunConfig, *, needs_reference: bool, command: str = "eval") -> None:
    """Refuse a config whose policy has no reference to be compared with (see the module docstring)."""
    if needs_reference and not config.finetuning.ref_model and not _split_paths(config.model.adapter_name_or_path):
        raise ConfigError(
            f"{command}: the policy is model_name_or_path with no adapter, so there is no reference to compare "
            "it with; set ref_model: to the model training started from (run_config.yaml's "
            "model_name_or_path), or adapter_name_or_path: to the trained LoRA adapter"
        )


def build_inference_reference(config: RunConfig, policy, *, needs_reference: bool, dtype=torch.float32,
                              command: str = "eval") -> Reference:
    """The reference after training (see the module docstring), through `build_reference`."""
    ft = config.finetuning
    has_adapter = bool(_split_paths(config.model.adapter_name_or_path))
    check_reference_source(config, needs_reference=needs_reference, command=command)
    # With an adapter, the "lora" rule of build_reference gives the policy with that adapter disabled.
    finetuning = dataclasses.replace(ft, finetuning_type="lora") if has_adapter else ft
    return build_reference(dataclasses.replace(config, finetuning=finetuning), policy,
                           needs_reference=needs_reference, dtype=dtype)


# -- scoring ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Scorer:
    """Scores batches of encoded pairs with one policy, one reference and the configured loss."""

    policy: object
    reference: Reference
    loss_names: list[str]
    loss_weights: list[float]
    settings: losses.LossSettings
    chunk_size: int = 1024

    @classmethod
    def from_config(cls, config: RunConfig, policy, reference: Reference) -> "Scorer":
        return cls(policy, reference, config.loss_names, config.loss_weights, loss_settings(config.finetuning),
                   config.finetuning.logits_chunk_size)

    @property
    def per_pair_loss(self) -> bool:
        return all(losses.get_loss(name).per_pair for name in self.loss_names)

    @torch.no_grad()
    def score_batch(self, batch: dict, split: str = "eval") -> tuple[LossOutput, PairLogps, PairLogps | None]:
        """The same three calls as `PreferenceTrainer.batch_loss`, for a batch in any layout.

        `split` ("train" or "eval") tells a precomputed reference which table the pair indices refer to.
        """
        s = self.settings
        policy = pair_logps(self.policy, batch, chunk_size=self.chunk_size,
                            token_level=s.ld_alpha is not None, want_sqnorm=s.use_weighting)
        reference = self.reference.logps(batch, split=split)
        out = losses.compute_preference_loss(policy, reference, self.loss_names, self.loss_weights, s)
        return out, policy, reference

    def score(self, dataset, *, batch_size: int, pad_token_id: int, device, split: str = "eval",
              collator=None) -> tuple[list[dict], dict]:
        """Score every pair of `dataset` in order; return the per-pair rows and the mean metrics.

        `collator` lays out the batches (default: concatenated); training's layout, from
        `run_collator`, scores the same pairs as fast per pair as the training forward.

        Rows follow `eval_pairs.jsonl` (see `pair_rows`); metrics are named as the trainer logs them,
        without the `eval_` prefix (`loss`, `rewards/margins`, ...), each the mean over all pairs,
        and the `throughput/*` figures of the whole pass.
        """
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                            collate_fn=collator or PairCollator(pad_token_id))
        was_training = getattr(self.policy, "training", False)
        self.policy.eval()
        rows: list[dict] = []
        sums: dict[str, float] = defaultdict(float)
        meter = self.throughput_meter(device)
        try:
            for batch in loader:
                meter.add(batch)
                batch = batch_to(batch, device)
                out, policy, reference = self.score_batch(batch, split)
                rows += pair_rows(batch["index"], out, policy, reference, per_pair_loss=self.per_pair_loss)
                for key, value in metric_values(out, policy).items():
                    sums[key] += value.double().sum().item()
        finally:
            self.policy.train(was_training)
        count = max(len(rows), 1)
        return rows, {**{key: total / count for key, total in sums.items()}, **meter.report()}

    def throughput_meter(self, device) -> ThroughputMeter:
        """Forward passes only: the policy's, and the reference's when it runs (throughput.py)."""
        passes = 1.0 + (1.0 if self.reference.model is not None else 0.0)
        dtype = next(self.policy.parameters()).dtype
        return ThroughputMeter(ModelShape.of(self.policy), passes, matmul_rate(device, dtype))


def metric_values(out: LossOutput, policy: PairLogps) -> dict[str, torch.Tensor]:
    """Per-pair values (B,) of the metrics `PreferenceTrainer` logs, under its names, plus `loss`."""
    return {"loss": out.losses.detach().float(), **pair_metrics(out, policy)}


def pair_rows(index: torch.Tensor, out: LossOutput, policy: PairLogps, reference: PairLogps | None,
              *, per_pair_loss: bool = True) -> list[dict]:
    """One dict per pair: `index`, policy/reference log-probs, token counts, rewards, margin, loss.

    Floats are the fp32 values as Python floats (so JSON holds their exact float64 repr); reference
    log-probs are None for reference-free losses, `loss` None where losses are not per pair.
    """

    def column(t: torch.Tensor | None) -> list:
        return [None] * len(index) if t is None else t.detach().float().cpu().tolist()

    cols = {
        "index": index.tolist(),
        "policy_chosen_logps": column(policy.chosen),
        "policy_rejected_logps": column(policy.rejected),
        "reference_chosen_logps": column(reference.chosen if reference is not None else None),
        "reference_rejected_logps": column(reference.rejected if reference is not None else None),
        "chosen_tokens": [int(n) for n in policy.chosen_tokens.tolist()],
        "rejected_tokens": [int(n) for n in policy.rejected_tokens.tolist()],
        "chosen_reward": column(out.chosen_rewards),
        "rejected_reward": column(out.rejected_rewards),
        "margin": column(out.chosen_rewards - out.rejected_rewards),
        "loss": column(out.losses if per_pair_loss else None),
    }
    return [dict(zip(cols, values)) for values in zip(*cols.values())]


# -- the command ------------------------------------------------------------------------------------
def load_eval_data(config: RunConfig, tokenizer):
    """`eval_dataset` if set, else all of `dataset` (val_size is not applied), encoded, in file order."""
    from prefalign.data.pipeline import describe, prepare_data

    data_args = config.data
    if not data_args.eval_dataset and not data_args.dataset:
        raise ConfigError("eval: no data to score; set eval_dataset (or dataset) to the preference pairs to score")
    if not data_args.eval_dataset:
        if data_args.val_size:
            logger.info("eval: val_size is not applied; scoring all of dataset. To score only held-out pairs, "
                        "give them as eval_dataset")
        data_args = dataclasses.replace(data_args, val_size=0.0)
    data = prepare_data(data_args, tokenizer, seed=config.training.seed, need_train=False)
    print(describe(data.summary), flush=True)
    dataset = data.eval if data_args.eval_dataset else data.train
    if dataset is None or len(dataset) == 0:
        raise ConfigError("eval: no pairs to score; check eval_dataset (or dataset)")
    return dataset, data


def run_eval(config: RunConfig) -> dict:
    """Score the policy against the reference; write eval_pairs.jsonl and eval_results.json; return the metrics."""
    from prefalign.train.workflow import ensure_model

    args = config.training
    needs_ref = losses.needs_reference(config.loss_names, loss_settings(config.finetuning))
    check_reference_source(config, needs_reference=needs_ref)
    ensure_model(config)
    tokenizer = load_tokenizer(config.model)
    dataset, data = load_eval_data(config, tokenizer)

    dtype = compute_dtype(args)
    device = args.device
    policy = load_inference_policy(config, dtype).to(device)
    reference = build_inference_reference(config, policy, needs_reference=needs_ref, dtype=dtype).to(device)
    logger.info("eval: policy %s%s, reference: %s", config.model.model_name_or_path,
                f" + {config.model.adapter_name_or_path}" if config.model.adapter_name_or_path else "",
                config.finetuning.ref_model or reference.name)

    start = time.perf_counter()
    rows, means = Scorer.from_config(config, policy, reference).score(
        dataset, batch_size=args.per_device_eval_batch_size, pad_token_id=tokenizer.pad_token_id, device=device,
        collator=run_collator(config.finetuning, tokenizer.pad_token_id))
    metrics = {f"eval_{key}": value for key, value in sorted(means.items())}
    metrics["eval_samples"] = len(rows)
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
