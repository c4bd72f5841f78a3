"""`prefalign data`: load and encode the data exactly as training would, and show what the model sees."""

from __future__ import annotations

from prefalign.config import RunConfig
from prefalign.data.pipeline import PreparedData, prepare_data


def format_report(data: PreparedData, tokenizer, examples: int = 2) -> str:
    """The data report: the summary (`DataSummary.describe`), token lengths and rendered examples."""
    summary = data.summary
    lines = summary.describe().splitlines()
    lines.append(f"template: {summary.template}, cutoff_len: {summary.cutoff_len}")
    for split, stats in summary.splits():
        for part, q in stats.token_lengths.items():
            lines.append(f"  {split} {part} tokens: min {q['min']}, p50 {q['p50']:g}, p90 {q['p90']:g}, "
                         f"p99 {q['p99']:g}, max {q['max']}")
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

    tokenizer = load_tokenizer(config.model)
    data = prepare_data(config.data, tokenizer, seed=config.training.seed, need_train=bool(config.data.dataset))
    report = format_report(data, tokenizer, examples)
    print(report, flush=True)
    return report
