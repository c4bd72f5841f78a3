"""Turning a batch into scores: batch -> policy and reference log-probs -> losses -> per-pair rows.

One engine for every command that scores pairs: `PreferenceTrainer` (training loss and metrics),
`prefalign eval` (per-pair rows and means) and the held-out samples of the run report.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch

from prefalign.contracts import LossOutput, PairLogps, batch_to
from prefalign.losses import Objective
from prefalign.metrics import pair_metrics, reduced, sum_and_count
from prefalign.modeling.logprobs import has_media, pair_logps
from prefalign.modeling.throughput import ModelShape, ThroughputMeter, forward_passes, matmul_rate
from prefalign.modeling.vision import image_features_fixed
from prefalign.reference import Reference, ReferencePlan, build_reference, plan_reference


def reference_plan(config, phase: str) -> ReferencePlan:
    """The reference plan of a `RunConfig` in `phase` (train, eval, chat): the fields the plan reads."""
    model, ft = config.model, config.finetuning
    return plan_reference(needs_reference=config.objective.needs_reference, phase=phase,
                          finetuning_type=ft.finetuning_type, adapters=model.adapter_name_or_path,
                          create_new_adapter=ft.create_new_adapter, ref_model=ft.ref_model,
                          ref_model_adapters=ft.ref_model_adapters,
                          ref_model_quantization_bit=ft.ref_model_quantization_bit, pissa_init=ft.pissa_init)


def build_planned_reference(config, plan: ReferencePlan, policy, *, dtype: torch.dtype = torch.float32,
                            for_precompute: bool = False, vocab=None) -> Reference:
    """`build_reference` with the model-loading and log-prob settings of `config` (and the run's `vocab` change)."""
    return build_reference(plan, policy, config.model, dtype=dtype, chunk_size=config.finetuning.logits_chunk_size,
                           token_level=config.objective.settings.ld_alpha is not None, for_precompute=for_precompute,
                           vocab=vocab)


def score_batch(model, reference: Reference, objective: Objective, batch: dict, *, split: str = "train",
                chunk_size: int = 1024) -> tuple[LossOutput, PairLogps, PairLogps | None]:
    """The loss of one batch (either layout): policy log-probs, reference log-probs, `objective`.

    Gradients flow through the policy's log-probs unless the caller runs this under `torch.no_grad()`.
    `split` ("train" or "eval") tells a precomputed reference which table the pair indices refer to.
    """
    s = objective.settings
    # a reference whose vision tower is the policy's frozen one takes the policy's image (video) features
    shared = {} if (has_media(batch) and reference.same_image_features and image_features_fixed(model)) \
        else None
    policy = pair_logps(model, batch, chunk_size=chunk_size, token_level=s.ld_alpha is not None,
                        want_sqnorm=s.use_weighting, image_features=shared)
    ref = reference.logps(batch, split=split, image_features=shared)
    if objective.unpaired:  # KTO examples: the labels say which side of the loss each one is on
        if "desirable" not in batch:
            raise ValueError(f"the objective {','.join(objective.names)} reads unpaired examples, but the batch has "
                             "no 'desirable' labels; encode the data with stage: kto")
        policy = dataclasses.replace(policy, desirable=batch["desirable"])
        if ref is not None:
            ref = dataclasses.replace(ref, desirable=batch["desirable"])
    return objective(policy, ref), policy, ref


def metric_values(out: LossOutput, policy: PairLogps) -> dict[str, torch.Tensor]:
    """Per-pair values (B,) of the metrics `PreferenceTrainer` logs, under its names, plus `loss`."""
    return {"loss": out.losses.detach().float(), **pair_metrics(out, policy)}


def example_rows(index: torch.Tensor, out: LossOutput, policy: PairLogps, reference: PairLogps | None,
                 *, per_pair_loss: bool = True) -> list[dict]:
    """One dict per KTO example: `index`, `label` (true: desirable), policy/reference log-probs of the
    reply and of its KL completion, the reply's tokens, `reward` (β·log-ratio), `kl` (the batch's
    reference point, where the loss has one) and `loss`."""

    def column(t: torch.Tensor | None) -> list:
        return [None] * len(index) if t is None else t.detach().float().cpu().tolist()

    rewards = torch.where(policy.desirable.bool(), out.chosen_rewards, out.rejected_rewards)
    cols = {
        "index": index.tolist(),
        "label": policy.desirable.bool().tolist(),
        "policy_logps": column(policy.chosen),
        "reference_logps": column(reference.chosen if reference is not None else None),
        "policy_kl_logps": column(policy.rejected),
        "reference_kl_logps": column(reference.rejected if reference is not None else None),
        "tokens": [int(n) for n in policy.chosen_tokens.tolist()],
        "reward": column(rewards),
        "kl": column(out.metrics.get("kl")),
        "loss": column(out.losses if per_pair_loss else None),
    }
    return [dict(zip(cols, values)) for values in zip(*cols.values())]


def pair_rows(index: torch.Tensor, out: LossOutput, policy: PairLogps, reference: PairLogps | None,
              *, per_pair_loss: bool = True) -> list[dict]:
    """One dict per pair: `index`, policy/reference log-probs, token counts, rewards, margin, loss.

    Floats are the fp32 values as Python floats (so JSON holds their exact float64 repr); reference
    log-probs are None for reference-free losses, `loss` None where losses are not per pair.
    """

    def column(t: torch.Tensor | None) -> list:
        return [None] * len(index) if t is None else t.detach().float().cpu().tolist()

    if policy.desirable is not None:
        return example_rows(index, out, policy, reference, per_pair_loss=per_pair_loss)
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


def sample_indices(dataset, count: int) -> list[int]:
    """The rows the report shows: the first `count`; of KTO examples the first of each label in turn, in
    data order, so that both labels are shown though TRL's unpair order lists every desirable example first."""
    if "desirable" not in dataset.column_names:
        return list(range(min(count, len(dataset))))
    labels = dataset["desirable"]
    groups = [[i for i, d in enumerate(labels) if d], [i for i, d in enumerate(labels) if not d]]
    picked = []
    while len(picked) < min(count, len(labels)):
        for group in groups:
            if group and len(picked) < count:
                picked.append(group.pop(0))
    return sorted(picked)


@dataclasses.dataclass
class Scorer:
    """Scores whole datasets of encoded pairs with one policy, one reference and one objective, without gradients."""

    policy: object
    reference: Reference
    objective: Objective
    chunk_size: int = 1024

    def score(self, dataset, collator, *, batch_size: int, device, split: str = "eval") -> tuple[list[dict], dict]:
        """Score every pair of `dataset` in order; return the per-pair rows and the mean metrics.

        Rows follow `eval_pairs.jsonl` (see `pair_rows`); metrics are named as the trainer logs them,
        without the `eval_` prefix (`loss`, `rewards/margins`, ...), each the mean over all pairs,
        and the `throughput/*` figures of the whole pass. `collator` lays out the batches: the
        training layout (`modeling/layout.run_layout`) scores as fast per pair as the training forward.
        """
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, collate_fn=collator)
        was_training = getattr(self.policy, "training", False)
        self.policy.eval()
        rows: list[dict] = []
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(2, dtype=torch.float64))
        meter = self.throughput_meter(device)
        try:
            with torch.no_grad():
                for batch in loader:
                    meter.add(batch)
                    batch = batch_to(batch, device)
                    out, policy, reference = score_batch(self.policy, self.reference, self.objective, batch,
                                                         split=split, chunk_size=self.chunk_size)
                    rows += pair_rows(batch["index"], out, policy, reference, per_pair_loss=self.objective.per_pair)
                    for key, value in metric_values(out, policy).items():
                        sums[key] += sum_and_count(value.double()).cpu()
        finally:
            self.policy.train(was_training)
        means = {key: value for key, (total, count) in sums.items()
                 if (value := reduced(key, total.item(), count.item())) is not None}
        return rows, {**means, **meter.report()}

    def throughput_meter(self, device) -> ThroughputMeter:
        """Forward passes only: the policy's, and the reference's when it runs (modeling/throughput.py)."""
        passes = forward_passes(backward=False, trains_weights=False, live_reference=self.reference.model is not None)
        dtype = next(self.policy.parameters()).dtype
        return ThroughputMeter(ModelShape.of(self.policy), passes, matmul_rate(device, dtype))

    def samples(self, dataset, collator, tokenizer, *, device, split: str = "eval", count: int = 5) -> list[dict]:
        """The first `count` pairs of `dataset`, decoded, with their rows and policy / reference margins.

        KTO examples: each with its label, reply and reward (`example_rows`); the first of each label in
        turn (`sample_indices`); a batch of all of them, so their reference point is the samples' own.
        """
        subset = dataset.select(sample_indices(dataset, count))
        rows, _ = self.score(subset, collator, batch_size=len(subset), device=device, split=split)
        if "desirable" in subset.column_names:
            return [{**row, "prompt": tokenizer.decode(pair["prompt_ids"], skip_special_tokens=False),
                     "reply": tokenizer.decode(pair["chosen_ids"], skip_special_tokens=True)}
                    for row, pair in zip(rows, subset)]
        samples = []
        for row, pair in zip(rows, subset):
            ref_c, ref_r = row["reference_chosen_logps"], row["reference_rejected_logps"]
            samples.append({
                **row,
                "prompt": tokenizer.decode(pair["prompt_ids"], skip_special_tokens=False),
                "chosen": tokenizer.decode(pair["chosen_ids"], skip_special_tokens=True),
                "rejected": tokenizer.decode(pair["rejected_ids"], skip_special_tokens=True),
                "policy_margin": row["policy_chosen_logps"] - row["policy_rejected_logps"],
                "reference_margin": None if ref_c is None else ref_c - ref_r,
            })
        return samples
