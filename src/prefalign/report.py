"""What a person reads after a run: metric plots (PNG) and `report.html`, one self-contained page.

The page holds the resolved config, the data summary, the curves (PNG data URIs), the final
metrics and a few held-out pairs with their policy and reference margins; it loads nothing from the
network. It renders files and data it is given and runs no model: the training workflow scores the sample
pairs (scoring.py) and saves them; `prefalign report OUTPUT_DIR` rebuilds the page from the files a
run left.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
from pathlib import Path

from prefalign.data.summary import DataSummary
from prefalign.errors import PrefalignError

PLOTTED = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
SPEED = ("throughput/tokens_per_second", "throughput/padding_fraction", "throughput/mfu",  # modeling/throughput.py
         "vision/tower_runs_per_pair")  # modeling/vision.TowerCounter
SAMPLES_FILE = "report_samples.json"
REPORT_FILE = "report.html"
NUM_SAMPLES = 5


# -- plots ------------------------------------------------------------------------------------------
def _smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """Exponential moving average, as TensorBoard draws it."""
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def load_history(output_dir: str | Path) -> list[dict]:
    """The Trainer's log history (one dict per logging step) from `trainer_state.json`."""
    path = Path(output_dir) / "trainer_state.json"
    if not path.is_file():
        raise PrefalignError(f"{path} does not exist; give the output_dir of a finished training run")
    return json.loads(path.read_text())["log_history"]


def metric_figures(history: list[dict], keys: tuple[str, ...] = PLOTTED):
    """Yield (key, matplotlib figure) per metric with any logged value: train and `eval_` curves, raw and smoothed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key in keys:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for name, label in ((key, "train"), (f"eval_{key}", "eval")):
            points = [(h["step"], h[name]) for h in history if name in h]
            if not points:
                continue
            steps, values = zip(*points)
            few = len(points) < 3  # a line needs points to be seen: mark them, and smoothing means nothing
            raw = ax.plot(steps, values, alpha=1.0 if few else 0.35, marker="o" if few else None,
                          label=label if few else f"{label} (raw)")
            if not few:
                ax.plot(steps, _smooth(list(values)), color=raw[0].get_color(), label=f"{label} (smoothed)")
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
        yield key, fig
        plt.close(fig)


def plot_metrics(output_dir: str | Path, keys: tuple[str, ...] = PLOTTED) -> list[Path]:
    """Write one PNG per metric (train and eval curves, raw and smoothed) from trainer_state.json."""
    output_dir = Path(output_dir)
    written = []
    for key, fig in metric_figures(load_history(output_dir), keys):
        path = output_dir / f"training_{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        written.append(path)
    return written


def write_samples(output_dir: str | Path, samples: list[dict], *, held_out: bool) -> Path:
    """Save the scored sample pairs (scoring.Scorer.samples) that the page shows, as report_samples.json."""
    path = Path(output_dir) / SAMPLES_FILE
    path.write_text(json.dumps({"held_out": held_out, "pairs": samples}, indent=1))
    return path


# -- the page ---------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:72rem;padding:0 1rem;
color:#1d2329;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #d0d7de;padding-bottom:.3rem;margin-top:2.2rem}
.muted{color:#57606a}nav a{margin-right:1rem}
table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left;
vertical-align:top}th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.curves{display:flex;flex-wrap:wrap;gap:1rem}.curves figure{margin:0}.curves img{max-width:100%;width:30rem}
figcaption{text-align:center;color:#57606a}
pre{background:#f6f8fa;padding:.7rem;overflow:auto;font-size:.85rem}
td pre{margin:0;padding:.3rem;max-height:12rem;white-space:pre-wrap;word-break:break-word;max-width:22rem}
.good{color:#1a7f37}.bad{color:#cf222e}
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value) -> str:
    if value is None:
        return '<td class="num muted">n/a</td>'
    if isinstance(value, float):
        return f'<td class="num" title="{value!r}">{value:.4g}</td>'
    return f'<td class="num">{_esc(value)}</td>'


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _final_metrics(out: Path) -> dict:
    results = _read_json(out / "all_results.json")
    if results:
        return results
    return {**(_read_json(out / "train_results.json") or {}), **(_read_json(out / "eval_results.json") or {})}


def _metrics_section(metrics: dict) -> str:
    if not metrics:
        return '<p class="muted">No all_results.json in this folder.</p>'
    rows = "".join(f"<tr><th>{_esc(k)}</th>{_num(v)}</tr>" for k, v in sorted(metrics.items()))
    return f'<table id="metrics"><thead><tr><th>metric</th><th>value</th></tr></thead><tbody>{rows}</tbody></table>'


def _curves_section(history: list[dict] | None) -> str:
    if history is None:
        return '<p class="muted">No trainer_state.json, so no curves.</p>'
    figures = []
    for key, fig in metric_figures(history):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        figures.append(f'<figure><img class="curve" alt="{_esc(key)} curve" src="data:image/png;base64,{data}">'
                       f"<figcaption>{_esc(key)}</figcaption></figure>")
    if not figures:
        return '<p class="muted">No metric was logged (set logging_steps lower than the number of steps).</p>'
    return ('<p class="muted">Faint: the logged values; solid: smoothed (exponential moving average, weight 0.6). '
            'Eval points come from eval_strategy and the final evaluation.</p>'
            f'<div class="curves">{"".join(figures)}</div>')


def _speed_section(history: list[dict] | None) -> str:
    if history is None:
        return '<p class="muted">No trainer_state.json, so no speed figures.</p>'
    rows = []
    for key in SPEED:
        values = [h[key] for h in history if key in h]
        if values:
            rows.append(f"<tr><th>{_esc(key)}</th>{_num(sum(values) / len(values))}{_num(values[-1])}</tr>")
    if not rows:
        return '<p class="muted">No throughput figures were logged.</p>'
    towers = ("; tower runs per pair: how many times the vision tower encoded each pair's images, policy and "
              "reference together (1: once per pair, the reference reusing the policy's features; a plain "
              "concatenated batch with a live reference needs 4)" if any(SPEED[-1] in h for h in history) else "")
    return ("<p>Tokens/s counts real tokens; the padding fraction is the share of computed positions that are "
            "padding (<code>packing: true</code> computes none); MFU is the model FLOPs per second over this "
            f"device's matmul rate measured at start-up{towers}.</p>"
            '<table id="speed"><thead><tr><th>figure</th><th>mean over logged steps</th><th>last</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _data_section(summary: DataSummary | None) -> str:
    if not summary:
        return '<p class="muted">No data_summary.json in this folder.</p>'
    rows = "".join(f"<tr><th>{_esc(name)}</th>{_num(count)}{_num(summary.skipped.get(name, 0))}</tr>"
                   for name, count in summary.datasets.items())
    parts = [f'<table id="data-summary"><thead><tr><th>dataset</th><th>pairs loaded</th><th>records skipped</th>'
             f"</tr></thead><tbody>{rows}</tbody></table>"]
    splits = summary.splits()
    if splits:
        rows = "".join(f"<tr><th>{s}</th>{_num(st.pairs)}{_num(st.truncated_prompts)}"
                       f"{_num(st.truncated_responses)}{_num(st.folded_system_turns)}{_num(st.skipped)}</tr>"
                       for s, st in splits)
        parts.append(f'<table id="splits"><thead><tr><th>split</th><th>pairs</th><th>prompts truncated</th>'
                     f"<th>responses truncated</th><th>system turns folded</th><th>pairs skipped</th></tr></thead>"
                     f"<tbody>{rows}</tbody></table>")
    if any(st.images for _, st in splits):
        rows = "".join(f"<tr><th>{s}</th>{_num(st.pairs_with_images)}{_num(st.images)}{_num(st.image_tokens)}</tr>"
                       for s, st in splits)
        parts.append(f'<table id="images"><thead><tr><th>split</th><th>pairs with images</th><th>images</th>'
                     f"<th>image tokens</th></tr></thead><tbody>{rows}</tbody></table>")
    if any(st.videos for _, st in splits):
        rows = "".join(f"<tr><th>{s}</th>{_num(st.pairs_with_videos)}{_num(st.videos)}{_num(st.video_frames)}"
                       f"{_num(st.video_tokens)}</tr>" for s, st in splits)
        parts.append(f'<table id="videos"><thead><tr><th>split</th><th>pairs with videos</th><th>videos</th>'
                     f"<th>sampled frames</th><th>video tokens</th></tr></thead><tbody>{rows}</tbody></table>")
    lengths = [(split, part, q) for split, st in splits for part, q in st.token_lengths.items()]
    if lengths:
        rows = "".join(f"<tr><th>{_esc(split)} {_esc(part)}</th>"
                       + "".join(_num(q[k]) for k in ("p50", "p90", "p99", "max")) + "</tr>"
                       for split, part, q in lengths)
        parts.append(f'<table id="token-lengths"><thead><tr><th>tokens</th><th>p50</th><th>p90</th><th>p99</th>'
                     f"<th>max</th></tr></thead><tbody>{rows}</tbody></table>")
    by_stage = ", ".join(f"{stage} {n}" for stage, n in summary.skipped_by_stage.items()) or "none"
    parts.append(f'<p class="muted">Chat template: {_esc(summary.template)}; cutoff_len: '
                 f'{_esc(summary.cutoff_len)}. Skipped records by stage: {_esc(by_stage)}; they are listed in '
                 "rejected_records.jsonl.</p>")
    return "".join(parts)


def _samples_section(samples: dict | None) -> str:
    if not samples or not samples.get("pairs"):
        return '<p class="muted">No pairs were scored for this report.</p>'
    which = "held-out" if samples.get("held_out") else "training (the run had no held-out data)"
    if "label" in samples["pairs"][0]:
        return _examples_section(samples["pairs"], which)
    rows = [_sample_row(s, ("chosen", "rejected"))
            + f"{_num(s.get('policy_margin'))}{_num(s.get('reference_margin'))}"
            + _judged(s.get("margin"), lambda margin: margin > 0) + f"{_num(s.get('loss'))}</tr>"
            for s in samples["pairs"]]
    return _samples_table(
        f"The first {len(samples['pairs'])} {which} pairs. Policy margin = log π(chosen) − log π(rejected) "
        "summed over response tokens; reference margin likewise under the reference; reward margin = chosen "
        "reward − rejected reward as the loss defines them (for DPO β × the difference of the two margins). "
        "A positive reward margin means the training moved the policy towards the chosen reply.",
        ("chosen", "rejected", "policy margin", "reference margin", "reward margin", "loss"), rows)


def _examples_section(examples: list[dict], which: str) -> str:
    """The samples of a KTO run: one reply per example, its label and reward."""
    rows = [_sample_row(s, ("reply",)) + f"<td>{'desirable' if s['label'] else 'undesirable'}</td>"
            + _judged(s.get("reward"), lambda reward, label=s["label"]: (reward > 0) == label)
            + f"{_num(s.get('kl'))}{_num(s.get('loss'))}</tr>"
            for s in examples]
    return _samples_table(
        f"The first {len(examples)} {which} examples. Reward = β × (log π(reply) − log π_ref(reply)) "
        "summed over response tokens; it should grow positive for desirable replies and negative for "
        "undesirable ones. KL: the reference point z_ref of the batch.",
        ("reply", "label", "reward", "kl", "loss"), rows)


def _sample_row(sample: dict, texts: tuple[str, ...]) -> str:
    """The opening of a sample's row: its index, its prompt and its `texts` (the reply or replies), unclosed."""
    return f"<tr><td>{_esc(sample['index'])}</td>" + "".join(
        f"<td><pre>{_esc(sample[key])}</pre></td>" for key in ("prompt", *texts))


def _judged(value, good) -> str:
    """A number cell marked good or bad by `good(value)`; n/a when there is no value."""
    if value is None:
        return _num(None)
    return f'<td class="num {"good" if good(value) else "bad"}" title="{value!r}">{value:.4g}</td>'


def _samples_table(intro: str, columns: tuple[str, ...], rows: list[str]) -> str:
    """The samples' paragraph and table (id "pairs"): #, the prompt, then `columns`."""
    head = "".join(f"<th>{name}</th>" for name in ("#", "prompt (as the model reads it)", *columns))
    return f'<p>{intro}</p><table id="pairs"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def write_report(output_dir: str | Path, samples: dict | None = None) -> Path:
    """Write `report.html` into a run's output dir from the files the run left there; return its path."""
    from prefalign import __version__

    out = Path(output_dir)
    if not out.is_dir():
        raise PrefalignError(f"{out} is not a folder; give the output_dir of a training run")
    samples = samples if samples is not None else _read_json(out / SAMPLES_FILE)
    config_text = (out / "run_config.yaml").read_text() if (out / "run_config.yaml").is_file() else ""
    model = ""
    for line in config_text.splitlines():
        if line.startswith("model_name_or_path:"):
            model = line.split(":", 1)[1].strip()
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    try:
        history = load_history(out)  # read once: the curves and the speed table both show it
    except PrefalignError:
        history = None
    sections = [
        ("metrics", "Final metrics", _metrics_section(_final_metrics(out))),
        ("curves", "Curves", _curves_section(history)),
        ("speed", "Speed", _speed_section(history)),
        ("pairs", "Pairs, policy against reference", _samples_section(samples)),
        ("data", "Data", _data_section(DataSummary.read(out))),
        ("config", "Configuration (run_config.yaml)",
         f"<pre>{_esc(config_text)}</pre>" if config_text else '<p class="muted">No run_config.yaml.</p>'),
    ]
    nav = "".join(f'<a href="#sec-{sid}">{_esc(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="sec-{sid}"><h2>{_esc(title)}</h2>{content}</section>'
                   for sid, title, content in sections)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>prefalign report: {_esc(out.resolve().name)}</title><style>{_CSS}</style></head><body>"
            f"<h1>prefalign run report</h1><p class=\"muted\">{_esc(out.resolve())}"
            f"{' · model ' + _esc(model) if model else ''} · written {_esc(now)} by prefalign {_esc(__version__)}</p>"
            f"<nav>{nav}</nav>{body}</body></html>\n")
    path = out / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path


def rebuild_report(output_dir: str | Path) -> list[Path]:
    """`prefalign report`: write report.html, and the README.md model card from run_config.yaml, again."""
    import yaml

    from prefalign.config import build_config
    from prefalign.model_card import write_model_card

    out = Path(output_dir)
    written = [write_report(out)]
    if (out / "run_config.yaml").is_file():
        config = build_config(yaml.safe_load((out / "run_config.yaml").read_text()) or {})
        written.append(write_model_card(config, out))
    return written
