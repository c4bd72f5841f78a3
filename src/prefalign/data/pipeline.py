"""Step 3 of the workflow: records -> pairs -> held-out split -> encoded datasets, with a summary.

Nothing is dropped silently: every record is kept, skipped (and written with its reason to
`rejected_records.jsonl`), or truncated, and the counts are printed and saved as
`data_summary.json` in the output dir.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from prefalign.config.args import DataArguments
from prefalign.data.chat import ChatRenderer
from prefalign.data.encode import encode_pairs
from prefalign.data.feedback import label_counts, with_kl_completions
from prefalign.data.sources import load_preference_pairs
from prefalign.data.summary import DataSummary, SplitSummary, image_counts, token_lengths, video_counts
from prefalign.errors import STAGES, ConfigError, DataError

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: object | None  # datasets.Dataset of encoded pairs (contracts.py)
    eval: object | None
    summary: DataSummary
    rejects: list[dict] = field(default_factory=list)
    # eval_on_each_dataset: each eval_dataset's rows of `eval`, by name (their `index` is eval's)
    eval_by_dataset: dict[str, object] | None = None
    vision: object | None = None  # data/vision.VisionProcessor the pairs' images were encoded with (the collator's)

    @property
    def eval_sets(self):
        """What the trainer evaluates: `eval`, or one set per eval dataset (transformers' dict form)."""
        return self.eval_by_dataset or self.eval

    def write(self, output_dir: str | Path) -> None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.summary.write(output_dir)
        if self.rejects:
            with open(output_dir / "rejected_records.jsonl", "w", encoding="utf-8") as fh:
                for reject in self.rejects:
                    fh.write(json.dumps(reject, ensure_ascii=False, default=str) + "\n")


def split_held_out(pairs: list, val_size: float, seed: int) -> tuple[list, list]:
    """Seeded split: `val_size` in (0, 1) is a fraction, >= 1 a count of held-out pairs."""
    if val_size <= 0:
        return pairs, []
    count = int(val_size) if val_size >= 1 else max(1, round(val_size * len(pairs)))
    if count >= len(pairs):
        raise ConfigError(f"val_size: {val_size} holds out {count} of {len(pairs)} pairs, leaving none to train on")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def prepare_data(data_args: DataArguments, tokenizer, *, seed: int, need_train: bool = True,
                 cache_dir: str | None = None, unpaired: bool = False, vision=None) -> PreparedData:
    """Load, split and encode the training and evaluation data of a config.

    `unpaired` (stage: kto, `Objective.unpaired`): the data is KTO examples (data/feedback.py), each
    split's examples paired with their KL completions after the held-out split. `vision`
    (modeling/vision.load_vision): the template's image processing, for pairs with images.
    """
    renderer = ChatRenderer.from_config(tokenizer, data_args, vision)
    common = dict(max_samples=data_args.max_samples, on_bad_record=data_args.on_bad_record,
                  mix_strategy=data_args.mix_strategy, seed=seed,
                  interleave_probs=data_args.interleave_probs or None, unpaired=unpaired,
                  media_dir=data_args.media_dir)
    summary = DataSummary(template=renderer.name, cutoff_len=data_args.cutoff_len, end_of_turn=renderer.end_of_turn)
    rejects: list[dict] = []
    splits: dict[str, list] = {}
    if need_train or not data_args.eval_dataset:
        if not data_args.dataset:
            raise ConfigError("dataset is required: name the preference data to train on")
        pairs, report = load_preference_pairs(data_args.dataset, data_args.dataset_dir, **common)
        summary.datasets.update(report.used)
        summary.skipped.update(report.skipped)
        summary.split_pairs.update(report.split_pairs)
        rejects += report.rejects
        splits["train"], splits["eval"] = split_held_out(pairs, data_args.val_size, seed)
        summary.held_out = len(splits["eval"])
    if data_args.eval_dataset:
        # Evaluation data is used whole: concatenated, never sampled by the training mix.
        eval_common = {**common, "mix_strategy": "concat", "interleave_probs": None}
        pairs, report = load_preference_pairs(data_args.eval_dataset, data_args.dataset_dir, **eval_common)
        summary.datasets.update({f"{k} (eval)": v for k, v in report.used.items()})
        summary.skipped.update({f"{k} (eval)": v for k, v in report.skipped.items()})
        summary.split_pairs.update({f"{k} (eval)": v for k, v in report.split_pairs.items()})
        rejects += report.rejects
        splits["eval"] = pairs
    if data_args.default_system:
        splits = {name: [with_default_system(p, data_args.default_system) for p in pairs]
                  for name, pairs in splits.items()}
    each = bool(data_args.eval_on_each_dataset and data_args.eval_dataset)
    if unpaired:
        # evaluated on its own, an eval dataset's KL completions come from its own examples
        splits = {name: (_per_dataset(examples, with_kl_completions) if name == "eval" and each
                         else with_kl_completions(examples)) for name, examples in splits.items()}
    encoded = {}
    for name, pairs in splits.items():
        if not pairs:
            encoded[name] = None
            continue
        dataset, stats = encode_pairs(pairs, renderer, data_args.cutoff_len,
                                      num_proc=data_args.preprocessing_num_workers,
                                      batch_size=data_args.preprocessing_batch_size, cache_dir=cache_dir,
                                      overwrite_cache=data_args.overwrite_cache, on_bad_record=data_args.on_bad_record)
        split_rejects = stats.pop("rejects")
        if not len(dataset):
            first = split_rejects[0]
            raise DataError(f"{name}: all {len(pairs)} pairs failed to encode, so none is left; the first: {first['file']} "
                            f"record {first['index']} ({first['stage']}), field {first['field']}: {first['reason']}")
        rejects += split_rejects
        encoded[name] = dataset
        if unpaired:
            stats["desirable"], stats["undesirable"] = label_counts(dataset)
        images = image_counts(dataset, vision.image_token_id if vision is not None else None)
        videos = video_counts(dataset, vision)
        setattr(summary, name, SplitSummary(**stats, token_lengths=token_lengths(dataset), **images, **videos))
    summary.skipped_by_stage = {stage: n for stage in STAGES if (n := sum(r["stage"] == stage for r in rejects))}
    if need_train and not encoded.get("train"):
        raise ConfigError("dataset: no training pairs are left after loading and splitting")
    by_dataset = None
    if each and encoded.get("eval") is not None:
        by_dataset = _split_by_dataset(encoded["eval"], [p.source.dataset for p in splits["eval"]],
                                       [name.strip() for name in data_args.eval_dataset])
    return PreparedData(encoded.get("train"), encoded.get("eval"), summary, rejects, by_dataset, vision)


def with_default_system(pair, system: str):
    """`pair` with `system` as its system message when it has none or an empty one, as LLaMA-Factory's
    template encodes `system or default_system` (the pair's fingerprint, and so the encode cache key, follows)."""
    prompt = pair.prompt
    if prompt and prompt[0]["role"] == "system":
        if prompt[0]["content"]:
            return pair
        prompt = prompt[1:]
    return dataclasses.replace(pair, prompt=[{"role": "system", "content": system}] + list(prompt))


def _per_dataset(pairs: list, fn) -> list:
    """`fn` applied to each dataset's run of pairs on its own (eval data is concatenated, in order)."""
    out = []
    for _, group in itertools.groupby(pairs, key=lambda p: p.source.dataset):
        out += fn(list(group))
    return out


def _split_by_dataset(dataset, dataset_of_index: list[str], names: list[str]) -> dict:
    """Each named dataset's encoded rows (selected in memory: the encode cache folder stays as written)."""
    positions = {name: [] for name in names}
    for position, index in enumerate(dataset["index"]):
        positions[dataset_of_index[index]].append(position)
    return {name: dataset.select(rows, keep_in_memory=True) for name, rows in positions.items() if rows}
