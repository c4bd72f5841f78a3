"""`prefalign data`: load and encode the data exactly as training would, and show what the model sees."""

from __future__ import annotations

from prefalign.config import RunConfig
from prefalign.data.pipeline import PreparedData, describe, prepare_data


def _percentiles(lengths: list[int]) -> str:
    if not lengths:
        return "-"
    ordered = sorted(lengths)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return f"min {ordered[0]}, p50 {pick(0.5)}, p90 {pick(0.9)}, p99 {pick(0.99)}, max {ordered[-1]}"


def format_report(data: PreparedData, tokenizer, examples: int = 2) -> str:
    """The data report: pairs per dataset, skips, truncations, token lengths and rendered examples."""
    summary = data.summary
    lines = describe(summary).splitlines()[: len(summary["datasets"]) + bool(summary.get("held_out"))]
    for name, count in summary.get("skipped", {}).items():
        lines.append(f"{name}: {count} records skipped")
    lines.append(f"template: {summary['template']}, cutoff_len: {summary['cutoff_len']}")
    for split, dataset in (("train", data.train), ("eval", data.eval)):
        if dataset is None:
            continue
        stats = summary[split]
        lines.append(f"{split}: {stats['pairs']} pairs; truncated: {stats['truncated_prompts']} prompts, "
                     f"{stats['truncated_responses']} responses")
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            lengths = [len(ids) for ids in dataset[column]]
            lines.append(f"  {column.removesuffix('_ids')} tokens: {_percentiles(lengths)}")
    shown = data.train if data.train is not None else data.eval
    for row in shown.select(range(min(examples, len(shown)))):
        lines.append(f"--- example {row['index']} ---")
        lines.append("[prompt: masked, not trained]")
        lines.append(tokenizer.decode(row["prompt_ids"]))
        for side in ("chosen", "rejected"):
            lines.append(f"[{side}: trained]")
            lines.append(tokenizer.decode(row[f"{side}_ids"]))
    return "\n".join(lines)


def run_data(config: RunConfig, examples: int = 2) -> str:
    from prefalign.modeling.load import load_tokenizer
    from prefalign.train.workflow import ensure_model

    ensure_model(config)
    tokenizer = load_tokenizer(config.model)
    data = prepare_data(config.data, tokenizer, seed=config.training.seed, need_train=bool(config.data.dataset))
    report = format_report(data, tokenizer, examples)
    print(report, flush=True)
    return report
