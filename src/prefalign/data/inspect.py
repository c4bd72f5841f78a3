"""`prefalign data`: load and encode the data exactly as training would, and show what the model sees."""

from __future__ import annotations

from prefalign.config import RunConfig
from prefalign.data.pipeline import PreparedData, prepare_data


def format_report(data: PreparedData, tokenizer, examples: int = 2) -> str:
    """The data report: the summary (`DataSummary.describe`: skips by stage, folded system turns,
    truncations), token lengths, and the first examples with the trained tokens marked."""
    summary = data.summary
    lines = summary.describe().splitlines()
    lines.append(f"template: {summary.template}, cutoff_len: {summary.cutoff_len}")
    for split, stats in summary.splits():
        for part, q in stats.token_lengths.items():
            lines.append(f"  {split} {part} tokens: min {q['min']}, p50 {q['p50']:g}, p90 {q['p90']:g}, "
                         f"p99 {q['p99']:g}, max {q['max']}")
    shown = data.train if data.train is not None else data.eval
    if shown is None:
        return "\n".join(lines)
    for row in shown.select(range(min(examples, len(shown)))):
        lines.append(f"--- example {row['index']} ---")
        lines.append(f"[prompt: masked, not trained, {len(row['prompt_ids'])} tokens]")
        if row.get("images"):
            lines += _image_tokens(tokenizer, row["prompt_ids"], data.vision)
        lines.append(_decoded(tokenizer, row["prompt_ids"], data.vision))
        for side in ("chosen", "rejected"):
            lines += _trained(tokenizer, side, row[f"{side}_ids"], summary.end_of_turn)
    return "\n".join(lines)


def _image_runs(ids: list[int], image_id: int) -> list[tuple[int, int]]:
    """(start, length) of each run of the image token in `ids`: one run per image."""
    runs = []
    for at, token in enumerate(ids):
        if token == image_id:
            if runs and runs[-1][0] + runs[-1][1] == at:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((at, 1))
    return runs


def _image_tokens(tokenizer, ids: list[int], vision) -> list[str]:
    """Where each image's tokens are in the prompt, and how many (the image processor's count)."""
    runs = _image_runs(ids, vision.image_token_id)
    where = ", ".join(f"image {n + 1}: {length} tokens at {start}-{start + length - 1}"
                      for n, (start, length) in enumerate(runs))
    return [f"[images: {len(runs)}, {sum(length for _, length in runs)} image tokens; {where}]"]


def _decoded(tokenizer, ids: list[int], vision) -> str:
    """The prompt's text, each image's run of image tokens shown once with its count."""
    if vision is None:
        return tokenizer.decode(ids)
    text, at = "", 0
    for start, length in _image_runs(ids, vision.image_token_id):
        text += tokenizer.decode(ids[at:start]) + f"{vision.plugin.image_token}×{length}"
        at = start + length
    return text + tokenizer.decode(ids[at:])


def _trained(tokenizer, side: str, ids: list[int], end_of_turn: str | None) -> list[str]:
    """A response as the loss sees it: its text between ⟦ ⟧ and its tokens, the end-of-turn token named."""
    tokens = [tokenizer.decode([i]) for i in ids]
    ends = end_of_turn is not None and tokens and tokens[-1] == end_of_turn
    # LLaMA-Factory's templates train what the assistant slot writes after the end of turn (a newline)
    trails = end_of_turn is not None and len(tokens) > 1 and tokens[-2] == end_of_turn and not tokens[-1].strip()
    last = (f"the last is the end-of-turn token {end_of_turn!r}" if ends else
            f"the end-of-turn token {end_of_turn!r}, then {tokens[-1]!r} (as LLaMA-Factory trains it)" if trails else
            "no end-of-turn token (cut by cutoff_len)")
    shown = tokens if len(tokens) <= 12 else tokens[:8] + ["…"] + tokens[-3:]
    return [f"[{side}: trained, {len(ids)} tokens, {last}]",
            "⟦" + tokenizer.decode(ids) + "⟧",
            "  tokens: " + " ".join(t if t == "…" else repr(t) for t in shown)]


def run_data(config: RunConfig, examples: int = 2) -> str:
    from prefalign.modeling.load import load_run_tokenizer
    from prefalign.modeling.vision import load_vision

    tokenizer, _ = load_run_tokenizer(config)
    data = prepare_data(config.data, tokenizer, seed=config.training.seed, need_train=bool(config.data.dataset),
                        unpaired=config.objective.unpaired, vision=load_vision(config.model, config.data, tokenizer))
    report = format_report(data, tokenizer, examples)
    print(report, flush=True)
    return report
