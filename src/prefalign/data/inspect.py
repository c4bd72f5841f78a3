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
    """The data report: pairs per dataset, skips by stage, folded system turns, truncations, token
    lengths, and the first examples with the trained tokens marked."""
    summary = data.summary
    lines = describe(summary).splitlines()[: len(summary["datasets"]) + bool(summary.get("held_out"))]
    for name, count in summary.get("skipped", {}).items():
        lines.append(f"{name}: {count} records skipped")
    by_stage = summary.get("skipped_by_stage") or {}
    lines.append("skipped records by stage: " + (", ".join(f"{stage} {n}" for stage, n in by_stage.items()) or "none"))
    lines.append(f"template: {summary['template']}, cutoff_len: {summary['cutoff_len']}")
    for split, dataset in (("train", data.train), ("eval", data.eval)):
        if dataset is None:
            continue
        stats = summary[split]
        lines.append(f"{split}: {stats['pairs']} pairs; truncated: {stats['truncated_prompts']} prompts, "
                     f"{stats['truncated_responses']} responses; system turns folded into the first user turn: "
                     f"{stats['folded_system_turns']}; replies appended (on_prompt_not_prefix): "
                     f"{stats['appended_replies']}")
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            lengths = [len(ids) for ids in dataset[column]]
            lines.append(f"  {column.removesuffix('_ids')} tokens: {_percentiles(lengths)}")
    shown = data.train if data.train is not None else data.eval
    if shown is None:
        return "\n".join(lines)
    for row in shown.select(range(min(examples, len(shown)))):
        lines.append(f"--- example {row['index']} ---")
        lines.append(f"[prompt: masked, not trained, {len(row['prompt_ids'])} tokens]")
        lines.append(tokenizer.decode(row["prompt_ids"]))
        for side in ("chosen", "rejected"):
            lines += _trained(tokenizer, side, row[f"{side}_ids"], summary.get("end_of_turn"))
    return "\n".join(lines)


def _trained(tokenizer, side: str, ids: list[int], end_of_turn: str | None) -> list[str]:
    """A response as the loss sees it: its text between ⟦ ⟧ and its tokens, the end-of-turn token named."""
    tokens = [tokenizer.decode([i]) for i in ids]
    ends = end_of_turn is not None and tokens and tokens[-1] == end_of_turn
    last = f"the last is the end-of-turn token {end_of_turn!r}" if ends else \
        "no end-of-turn token (cut by cutoff_len)"
    shown = tokens if len(tokens) <= 12 else tokens[:8] + ["…"] + tokens[-3:]
    return [f"[{side}: trained, {len(ids)} tokens, {last}]",
            "⟦" + tokenizer.decode(ids) + "⟧",
            "  tokens: " + " ".join(t if t == "…" else repr(t) for t in shown)]


def run_data(config: RunConfig, examples: int = 2) -> str:
    from prefalign.modeling.load import load_tokenizer
    from prefalign.train.workflow import ensure_model

    ensure_model(config)
    tokenizer = load_tokenizer(config.model)
    data = prepare_data(config.data, tokenizer, seed=config.training.seed, need_train=bool(config.data.dataset))
    report = format_report(data, tokenizer, examples)
    print(report, flush=True)
    return report
