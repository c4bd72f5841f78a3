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
    folded_system_turns: int = 0
    """System turns the template cannot render, folded into the first user turn (on_unsupported_system: fold)."""
    appended_replies: int = 0
    """Pairs whose prompt is not a prefix of prompt + reply, the reply appended (on_prompt_not_prefix: append)."""
    skipped: int = 0
    """Pairs that failed to render or tokenize (on_bad_record: skip)."""
    token_lengths: dict[str, dict[str, float]] = field(default_factory=dict)
    """part -> {"min", "p50", "p90", "p99", "max"} (numpy's linear-interpolation percentiles)."""
    desirable: int | None = None
    """KTO examples (stage: kto): how many are desirable (their `pairs` count examples); None for pairs."""
    undesirable: int | None = None
    pairs_with_images: int = 0
    """Pairs (examples) whose prompt holds images; 0 for text data."""
    images: int = 0
    """The images of those prompts (each counted once per pair)."""
    image_tokens: int = 0
    """The prompts' image tokens (the image processor's count, after image_max_pixels)."""
    pairs_with_videos: int = 0
    """Pairs (examples) whose prompt holds videos; 0 without videos."""
    videos: int = 0
    """The videos of those prompts (each counted once per pair)."""
    video_frames: int = 0
    """The frames sampled of those videos (video_fps, video_maxlen), as the video processor gets them: an even
    number a video, the last repeated if need be."""
    video_tokens: int = 0
    """The prompts' video tokens (the video processor's count, after video_max_pixels)."""


@dataclass
class DataSummary:
    """Per dataset name the pairs used and records skipped (at parsing), the skips of every stage, the
    template and its end-of-turn token, the cutoff and each split."""

    template: str
    cutoff_len: int
    end_of_turn: str | None = None
    datasets: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_by_stage: dict[str, int] = field(default_factory=dict)
    """stage (errors.STAGES) -> records skipped there, over all datasets and splits."""
    held_out: int = 0
    split_pairs: dict[str, int] = field(default_factory=dict)
    """stage: kto: dataset name -> preference pairs split into a desirable and an undesirable example each."""
    train: SplitSummary | None = None
    eval: SplitSummary | None = None

    def splits(self) -> list[tuple[str, SplitSummary]]:
        return [(name, s) for name, s in (("train", self.train), ("eval", self.eval)) if s is not None]

    def describe(self) -> str:
        """The summary as the lines printed before training, eval and by `prefalign data`."""
        unit = "examples" if self.unpaired else "pairs"
        lines = [f"{name}: {count} {unit}" for name, count in self.datasets.items()]
        for name, count in self.split_pairs.items():
            lines.append(f"{name}: {count} preference pairs split into {count} desirable (chosen) and {count} "
                         "undesirable (rejected) KTO examples")
        if self.held_out:
            lines.append(f"val_size: {self.held_out} of those pairs held out for evaluation")
        for name, count in self.skipped.items():
            if count:
                lines.append(f"{name}: {count} records skipped (see rejected_records.jsonl)")
        by_stage = ", ".join(f"{stage} {n}" for stage, n in self.skipped_by_stage.items())
        lines.append(f"skipped records by stage: {by_stage} (see rejected_records.jsonl)" if by_stage
                     else "skipped records by stage: none")
        for split, stats in self.splits():
            lines.append(f"{split}: {stats.pairs} {unit}, {stats.truncated_prompts} prompts and "
                         f"{stats.truncated_responses} responses truncated to cutoff_len={self.cutoff_len}")
            if stats.desirable is not None:
                lines.append(f"{split}: {stats.desirable} desirable and {stats.undesirable} undesirable examples; "
                             "each one's KL completion is the previous example's reply")
            if stats.images:
                lines.append(f"{split}: {stats.pairs_with_images} {unit} with images, {stats.images} images, "
                             f"{stats.image_tokens} image tokens")
            if stats.videos:
                lines.append(f"{split}: {stats.pairs_with_videos} {unit} with videos, {stats.videos} videos, "
                             f"{stats.video_frames} sampled frames, {stats.video_tokens} video tokens")
            if stats.folded_system_turns:
                lines.append(f"{split}: {stats.folded_system_turns} system turns folded into the first user turn "
                             "(the template cannot render them; on_unsupported_system: fold)")
            if stats.appended_replies:
                lines.append(f"{split}: {stats.appended_replies} pairs whose prompt is not a prefix of prompt + "
                             "reply, reply appended to the prompt (on_prompt_not_prefix: append)")
        return "\n".join(lines)

    @property
    def unpaired(self) -> bool:
        """Whether the data is KTO examples rather than pairs."""
        return any(s.desirable is not None for _, s in self.splits())

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


def image_counts(dataset, image_token_id: int | None) -> dict[str, int]:
    """`pairs_with_images`, `images` and `image_tokens` (SplitSummary) of an encoded dataset; {} without images."""
    return _media_counts(dataset, "images", image_token_id, "pairs_with_images", "images", "image_tokens")


def video_counts(dataset, vision) -> dict[str, int]:
    """`pairs_with_videos`, `videos`, `video_frames` and `video_tokens` (SplitSummary) of an encoded dataset, for
    the run's data/vision.VisionProcessor; {} without videos. The frames are counted from each file's header."""
    from prefalign.data.vision import sampled_frame_count

    if vision is None:
        return {}
    counts = _media_counts(dataset, "videos", vision.video_token_id, "pairs_with_videos", "videos", "video_tokens")
    if counts.get("videos"):
        column = dataset.with_format("arrow")[:].column("videos")  # row by row: the files stay in the arrow table
        counts["video_frames"] = sum(sampled_frame_count(data, vision.video_fps, vision.video_maxlen)
                                     for videos in column for data in videos.as_py() or ())
    return counts


def _media_counts(dataset, column: str, token_id: int | None, pairs: str, items: str, tokens: str) -> dict[str, int]:
    import pyarrow.compute as pc

    if column not in dataset.column_names or token_id is None:
        return {}
    table = dataset.with_format("arrow")[:]
    per_pair = pc.list_value_length(table.column(column)).fill_null(0)
    count = pc.sum(pc.equal(pc.list_flatten(table.column("prompt_ids")), token_id)).as_py() or 0
    return {pairs: pc.sum(pc.greater(per_pair, 0)).as_py() or 0, items: pc.sum(per_pair).as_py() or 0, tokens: count}


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
