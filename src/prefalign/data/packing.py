"""Padding-free batches: the sequences of a micro-batch's pairs laid end to end in few rows.

A micro-batch is still B pairs (`per_device_train_batch_size`); packing only changes how they are
laid out. Each pair becomes one *block* of tokens, kept whole in one row:

  without prefix sharing   prompt+chosen, then prompt+rejected: two sequences
  with prefix sharing      the prefix-shared pair of data/collate.py (`pack_pair`): the prompt
                           once, then chosen, then the prompt's last token and rejected

Positions restart at every sequence (in a prefix-shared block the rejected segment continues the
prompt, as in the unpacked layout), and attention never crosses a sequence: each batch lists its
attention *spans*, and modeling/packed_attention.py runs attention span by span, so no position
attends to another pair and nothing is computed for padding.

Rows hold at most `packing_length` tokens; 0 puts the whole micro-batch in one row (the default:
no padding at all). Blocks are placed longest first into the first row with room. A block longer
than `packing_length` gets a row of its own, as long as it needs: a pair is never split,
truncated or dropped (splitting it would change its log-probs; `cutoff_len` already bounds it).
Rows shorter than the longest are padded at their end; padding is in no span.

Batch (R rows, T positions), `layout` BatchLayout.PACKED:
  input_ids, labels, position_ids  (R, T); labels -100 except on reply tokens
  segment_ids  (R, T)  SEGMENT_SHARED (prefix-shared prompt), SEGMENT_CHOSEN / SEGMENT_REJECTED (the
                       sequence, prompt included without prefix sharing), SEGMENT_PAD
  pair_ids     (R, T)  the pair's place in the micro-batch, 0 … B-1, or -1 on padding
  spans        (K, 5)  row, q_start, q_end, p_start, p_end: queries [q_start, q_end) attend causally
                       to themselves and to all of [p_start, p_end) (the shared prompt, or empty)
  attention_mask (R, T) 1 on tokens, 0 on padding;  index (B,)
  pixel_values, image_grid_thw, mm_token_type_ids, image_ids   pairs with images: every sequence's images
                       in row-major order (data/collate.image_inputs), a prefix-shared block's once; a Qwen
                       model's 3-D rotary positions restart per sequence (modeling/prefix.packed_rope_positions)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefalign.contracts import IGNORE_INDEX, SEGMENT_CHOSEN, SEGMENT_REJECTED, BatchLayout
from prefalign.data.collate import _round_up, has_media, image_inputs, pack_pair, padded_rows, per_pair_columns


def pair_block(prompt: list[int], chosen: list[int], rejected: list[int], *, prefix_sharing: bool) -> dict:
    """One pair as a block: its tokens, labels, segments, positions and spans (offsets in the block)."""
    if not prompt:
        # the first token of each sequence must be unscored: in a packed row it follows another sequence
        raise ValueError("packing needs a prompt of at least one token")
    if prefix_sharing:
        block = pack_pair(prompt, chosen, rejected)
        shared = len(prompt) - 1
        rejected_start = len(prompt) + len(chosen)
        n = len(block["input_ids"])
        block["spans"] = [(0, rejected_start, 0, 0), (rejected_start, n, 0, shared)]
        return block
    block = {"input_ids": [], "labels": [], "segment_ids": [], "position_ids": [], "spans": []}
    for segment, reply in ((SEGMENT_CHOSEN, chosen), (SEGMENT_REJECTED, rejected)):
        start, n = len(block["input_ids"]), len(prompt) + len(reply)
        block["input_ids"] += list(prompt) + list(reply)
        block["labels"] += [IGNORE_INDEX] * len(prompt) + list(reply)
        block["segment_ids"] += [segment] * n
        block["position_ids"] += list(range(n))
        block["spans"].append((start, start + n, start, start))
    return block


def assign_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """Block indices per row: longest first, each into the first row with room (module docstring)."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r in range(len(rows)):
            if not budget or used[r] + lengths[i] <= budget:
                rows[r].append(i)
                used[r] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
    return rows


@dataclass
class PackedCollator:
    """Packed batches (module docstring) of the pairs of one micro-batch."""

    pad_token_id: int
    prefix_sharing: bool = False
    packing_length: int = 0
    pad_to_multiple_of: int | None = None
    vision: object | None = None  # data/vision.VisionProcessor: pairs with images get the model's image inputs

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        blocks = [pair_block(f["prompt_ids"], f["chosen_ids"], f["rejected_ids"], prefix_sharing=self.prefix_sharing)
                  for f in features]
        rows = assign_rows([len(b["input_ids"]) for b in blocks], self.packing_length)
        length = _round_up(max(sum(len(blocks[i]["input_ids"]) for i in row) for row in rows),
                           self.pad_to_multiple_of)
        batch = padded_rows((len(rows), length), self.pad_token_id)
        batch["pair_ids"] = torch.full((len(rows), length), -1, dtype=torch.long)
        spans = []
        for r, row in enumerate(rows):
            offset = 0
            for i in row:
                block, n = blocks[i], len(blocks[i]["input_ids"])
                for key in ("input_ids", "labels", "segment_ids", "position_ids"):
                    batch[key][r, offset:offset + n] = torch.tensor(block[key])
                batch["pair_ids"][r, offset:offset + n] = i
                spans += [(r, offset + q0, offset + q1, offset + p0, offset + p1) for q0, q1, p0, p1 in block["spans"]]
                offset += n
            batch["attention_mask"][r, :offset] = 1
        batch["spans"] = torch.tensor(spans, dtype=torch.long)
        batch["layout"] = BatchLayout.PACKED
        batch.update(per_pair_columns(features))
        if has_media(features):  # each sequence's prompt holds its pair's images (videos), in row order
            order = [i for row in rows for i in row for _ in range(1 if self.prefix_sharing else 2)]
            batch.update(image_inputs(self.vision, batch["input_ids"], [f.get("images") or [] for f in features],
                                      order, [f.get("videos") or [] for f in features]))
        return batch
