"""Plots of the logged training and evaluation metrics."""

from __future__ import annotations

import json
from pathlib import Path

PLOTTED = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def _smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """Exponential moving average, as TensorBoard draws it."""
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def plot_metrics(output_dir: str | Path, keys: tuple[str, ...] = PLOTTED) -> list[Path]:
    """Write one PNG per metric (train and eval curves, raw and smoothed) from trainer_state.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    written = []
    for key in keys:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for name, label in ((key, "train"), (f"eval_{key}", "eval")):
            points = [(h["step"], h[name]) for h in history if name in h]
            if not points:
                continue
            steps, values = zip(*points)
            ax.plot(steps, values, alpha=0.35, label=f"{label} (raw)")
            ax.plot(steps, _smooth(list(values)), label=f"{label} (smoothed)")
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.legend()
        path = output_dir / f"training_{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
