"""Batch encoded pairs: chosen and rejected go through the model together, in one forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class PairCollator:
    """Concatenated batches: rows [0, B) are prompt+chosen, rows [B, 2B) prompt+rejected.

    Returns `input_ids`, `attention_mask` and `labels` of shape (2B, T), with T the longest row
    (rounded up to `pad_to_multiple_of`); `labels` is -100 on prompt and padding tokens, so
    only response tokens are scored. `index` (B,) is each pair's position in its dataset.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows, labels = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for f in features:
                rows.append(list(f["prompt_ids"]) + list(f[side]))
                labels.append([IGNORE_INDEX] * len(f["prompt_ids"]) + list(f[side]))
        length = max(len(r) for r in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        label_ids = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (row, lab) in enumerate(zip(rows, labels)):
            input_ids[i, : len(row)] = torch.tensor(row)
            label_ids[i, : len(lab)] = torch.tensor(lab)
            attention_mask[i, : len(row)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}
        if "index" in features[0]:
            batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
        return batch
