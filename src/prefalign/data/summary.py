"""`DataSummary`: what a run's data is, counted once when it is prepared.

`data/pipeline.prepare_data` fills it; `describe` is the one text form (printed by `prefalign data`,
train and eval); it is saved as `data_summary.json` and read back, unchanged, by the report and
the model card.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

SUMMARY_FILE = "data_summary.json"
LENGTH_PARTS = (("prompt_ids", "prompt"), ("chosen_ids", "chosen"), ("rejected_ids", "rejected"))


@dataclass
class SplitSummary:
    """One encoded split: pairs, truncations, and token-length percentiles per part (prompt, chosen, rejected)."""

    pairs: int
    truncated_prompts: int = 0
    truncated_responses: int = 0
    token_lengths: dict[str, dict[str, float]] = field(default_factory=dict)
    """part -> {"min", "p50", "p90", "p99", "max"} (numpy's linear-interpolation percentiles)."""


@dataclass
class DataSummary:
    """Per dataset name the pairs used and records skipped, the template, the cutoff and each split."""

    template: str
    cutoff_len: int
    datasets: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    held_out: int = 0
    train: SplitSummary | None = None
    eval: SplitSummary | None = None

    def splits(self) -> list[tuple[str, SplitSummary]]:
        return [(name, s) for name, s in (("train", self.train), ("eval", self.eval)) if s is not None]

    def describe(self) -> str:
        """The summary as the lines printed before training, eval and by `prefalign data`."""
        lines = [f"{name}: {count} pairs" for name, count in self.datasets.items()]
        if self.held_out:
            lines.append(f"val_size: {self.held_out} of those pairs held out for evaluation")
        for name, count in self.skipped.items():
            if count:
                lines.append(f"{name}: {count} records skipped (see rejected_records.jsonl)")
        for split, stats in self.splits():
            lines.append(f"{split}: {stats.pairs} pairs, {stats.truncated_prompts} prompts and "
                         f"{stats.truncated_responses} responses truncated to cutoff_len={self.cutoff_len}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DataSummary":
        values = dict(values)
        for split in ("train", "eval"):
            if values.get(split) is not None:
                values[split] = SplitSummary(**values[split])
        return cls(**values)

    def write(self, output_dir: str | Path) -> Path:
        path = Path(output_dir) / SUMMARY_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def read(cls, output_dir: str | Path) -> "DataSummary | None":
        """The summary a run saved in `output_dir`, or None when it saved none."""
        path = Path(output_dir) / SUMMARY_FILE
        return cls.from_dict(json.loads(path.read_text())) if path.is_file() else None


def token_lengths(dataset) -> dict[str, dict[str, float]]:
    """Percentiles (min, p50, p90, p99, max) of the prompt, chosen and rejected token counts of an encoded dataset."""
    import numpy as np
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]
    stats = {}
    for column, name in LENGTH_PARTS:
        lengths = pc.list_value_length(table.column(column)).to_numpy(zero_copy_only=False)
        if len(lengths):
            p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
            stats[name] = {"min": int(lengths.min()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
                           "max": int(lengths.max())}
    return stats
