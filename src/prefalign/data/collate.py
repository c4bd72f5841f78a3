"""Batch encoded pairs: chosen and rejected go through the model together, in one forward pass.

Two layouts:
  PairCollator          concatenated: rows [0, B) prompt+chosen, rows [B, 2B) prompt+rejected.
  PrefixSharedCollator  prefix-shared: one packed row per pair, so the prompt is computed once:

      tokens     p_0 … p_{P-2} | p_{P-1} c_0 … c_{C-1} | p_{P-1} r_0 … r_{R-1} | pad …
      segment    SHARED        | CHOSEN                | REJECTED              | PAD
      positions  0 … P-2       | P-1 … P+C-1           | P-1 … P+R-1           | 0 …

    A token attends causally to the SHARED segment and to its own segment only (the attention
    mask is built from `segment_ids` in modeling/prefix.py), so the rejected reply never sees
    the chosen one. The prompt's last token is repeated at the start of the rejected segment:
    its hidden state is the one that predicts the first reply token, and with the copy both
    replies are scored by the usual shifted labels, with the same inputs, positions and
    context as in the concatenated layout, so the same log-probs and gradients. Cost: one
    extra token per pair, against P - 1 prompt tokens saved.

`with_lengths` adds the `length` column the Trainer's `group_by_length` sampler reads, so batches
hold pairs of similar length and carry little padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefalign.contracts import (
    IGNORE_INDEX,
    SEGMENT_CHOSEN,
    SEGMENT_PAD,
    SEGMENT_REJECTED,
    SEGMENT_SHARED,
    BatchLayout,
)


def _round_up(length: int, multiple: int | None) -> int:
    return -(-length // multiple) * multiple if multiple else length


@dataclass
class PairCollator:
    """Concatenated batches: rows [0, B) are prompt+chosen, rows [B, 2B) prompt+rejected.

    Returns `input_ids`, `attention_mask` and `labels` of shape (2B, T), with T the longest row
    (rounded up to `pad_to_multiple_of`); `labels` is -100 on prompt and padding tokens, so
    only response tokens are scored. `index` (B,) is each pair's position in its dataset;
    `layout` is BatchLayout.CONCATENATED.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    vision: object | None = None  # data/vision.VisionProcessor: pairs with images get the model's image inputs

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows, labels = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for f in features:
                rows.append(list(f["prompt_ids"]) + list(f[side]))
                labels.append([IGNORE_INDEX] * len(f["prompt_ids"]) + list(f[side]))
        length = _round_up(max(len(r) for r in rows), self.pad_to_multiple_of)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        label_ids = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (row, lab) in enumerate(zip(rows, labels)):
            input_ids[i, : len(row)] = torch.tensor(row)
            label_ids[i, : len(lab)] = torch.tensor(lab)
            attention_mask[i, : len(row)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids,
                 "layout": BatchLayout.CONCATENATED}
        batch.update(per_pair_columns(features))
        if has_media(features):
            images = [f.get("images") or [] for f in features]
            batch.update(image_inputs(self.vision, input_ids, images, [*range(len(features))] * 2,
                                      [f.get("videos") or [] for f in features]))
        return batch


def has_media(features: list[dict]) -> bool:
    """Whether any of `features` (encoded pairs) has images or videos."""
    return any(f.get("images") or f.get("videos") for f in features)


def image_inputs(vision, input_ids: torch.Tensor, pair_images: list[list[bytes]], order: list[int] | None = None,
                 pair_videos: list[list[bytes]] | None = None) -> dict[str, torch.Tensor]:
    """The image (and video) inputs of a batch whose image tokens hold, in row-major order, the images of pair
    `order[0]`, then of pair `order[1]`, ... (`pair_images[i]`: pair i's images; a pair's index may come
    more than once: the concatenated layout's rejected rows, a packed block's two sequences), as the model
    scatters image features into its image tokens in that order; its video tokens likewise hold
    `pair_videos`. The processors run once per pair (data/vision.model_inputs); their tensors are laid out in
    that order: Qwen `pixel_values` (patches, D) and `image_grid_thw` (n, 3), `pixel_values_videos` and
    `video_grid_thw` (m, 3) (Qwen2.5-VL: `second_per_grid_ts` (m,)), LLaVA `pixel_values` (n, C, H, W). With
    `order`, `image_ids` (n,) / `video_ids` (m,) long give each placed image's (video's) index among the
    pairs' (modeling/logprobs encodes each once). The plugin's token types (R, T) (1 at image tokens, 2 at
    video tokens): the Qwen families' `mm_token_type_ids`, from which the model computes its 3-D rotary
    positions; Gemma 3's `token_type_ids`, its bidirectional attention within an image.
    Without `order` (generation, chat): each pair's media once, in pair order, and no ids."""
    if vision is None:
        raise ValueError("a batch with images needs the collator's vision processor (data/vision.py)")
    pair_videos = pair_videos or [[] for _ in pair_images]
    inputs = vision.model_inputs([data for images in pair_images for data in images],
                                 [data for videos in pair_videos for data in videos])
    if order is not None:
        for name, pixels_key, grid_key, keys in _PLACED:
            if pixels_key not in inputs:
                continue
            items = pair_images if name == "image" else pair_videos
            starts = [0]
            for own in items:
                starts.append(starts[-1] + len(own))
            ids = [k for i in order for k in range(starts[i], starts[i + 1])]
            inputs.update(_placed(inputs, ids, pixels_key, grid_key, keys))
            inputs[f"{name}_ids"] = torch.tensor(ids, dtype=torch.long)
    if vision.plugin.type_ids:
        types = (input_ids == vision.image_token_id).long()
        if vision.video_token_id is not None:
            types += 2 * (input_ids == vision.video_token_id).long()
        inputs[vision.plugin.type_ids] = types
    return inputs


_PLACED = (("image", "pixel_values", "image_grid_thw", ("image_grid_thw", "image_sizes")),
           ("video", "pixel_values_videos", "video_grid_thw", ("video_grid_thw", "second_per_grid_ts")))
"""Each kind of media: its name, its pixels, its grid and the per-item tensors placed with it."""


def _placed(inputs: dict[str, torch.Tensor], ids: list[int], pixels_key: str, grid_key: str,
            keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """One kind's processor tensors of n items with item k at place j for k = ids[j]."""
    grid = inputs.get(grid_key)
    out = {key: inputs[key][ids] for key in keys if key in inputs}
    pixels = inputs[pixels_key]
    if grid is None:  # one row of pixel_values per image
        out[pixels_key] = pixels[ids]
        return out
    ends = grid.prod(-1).cumsum(0).tolist()  # an item's patches: its grid's t * h * w rows
    out[pixels_key] = torch.cat([pixels[(ends[k - 1] if k else 0):ends[k]] for k in ids])
    return out


def per_pair_columns(features: list[dict]) -> dict[str, torch.Tensor]:
    """The per-pair tensors every layout carries: `index` (B,) long and, for KTO examples, `desirable` (B,) bool."""
    columns = {}
    if "index" in features[0]:
        columns["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
    if "desirable" in features[0]:
        columns["desirable"] = torch.tensor([bool(f["desirable"]) for f in features], dtype=torch.bool)
    return columns


def pack_pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict[str, list[int]]:
    """One pair in the prefix-shared layout (module docstring): ids, labels, segments, positions."""
    if not prompt:
        raise ValueError("prefix sharing needs a prompt of at least one token")
    p, c, r = len(prompt), len(chosen), len(rejected)
    return {
        "input_ids": list(prompt) + list(chosen) + [prompt[-1]] + list(rejected),
        "labels": [IGNORE_INDEX] * p + list(chosen) + [IGNORE_INDEX] + list(rejected),
        "segment_ids": [SEGMENT_SHARED] * (p - 1) + [SEGMENT_CHOSEN] * (c + 1) + [SEGMENT_REJECTED] * (r + 1),
        "position_ids": list(range(p + c)) + list(range(p - 1, p + r)),
    }


def padded_rows(shape: tuple[int, int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """All-padding `input_ids`, `labels`, `segment_ids`, `position_ids`, `attention_mask` of `shape`, to fill in."""
    return {
        "input_ids": torch.full(shape, pad_token_id, dtype=torch.long),
        "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
        "segment_ids": torch.full(shape, SEGMENT_PAD, dtype=torch.long),
        "position_ids": torch.zeros(shape, dtype=torch.long),
        "attention_mask": torch.zeros(shape, dtype=torch.long),
    }


@dataclass
class PrefixSharedCollator:
    """Prefix-shared batches: one packed row per pair (module docstring).

    Returns `input_ids`, `labels`, `segment_ids`, `position_ids` and `attention_mask` (padding
    only; the model gets the 4D mask built from `segment_ids`) of shape (B, T), `index` (B,) and
    `layout` (BatchLayout.PREFIX_SHARED).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    vision: object | None = None  # data/vision.VisionProcessor (a Qwen family's): the prompt's images, once per row

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        packed = [pack_pair(f["prompt_ids"], f["chosen_ids"], f["rejected_ids"]) for f in features]
        length = _round_up(max(len(p["input_ids"]) for p in packed), self.pad_to_multiple_of)
        batch = padded_rows((len(packed), length), self.pad_token_id)
        batch["layout"] = BatchLayout.PREFIX_SHARED
        for i, p in enumerate(packed):
            n = len(p["input_ids"])
            for key in ("input_ids", "labels", "segment_ids", "position_ids"):
                batch[key][i, :n] = torch.tensor(p[key])
            batch["attention_mask"][i, :n] = 1
        batch.update(per_pair_columns(features))
        if has_media(features):  # in the prompt, so once per row; the model places the rotary
            batch.update(image_inputs(self.vision, batch["input_ids"], [f.get("images") or [] for f in features],
                                      list(range(len(features))), [f.get("videos") or [] for f in features]))
        return batch  # positions of the image rows (modeling/prefix.shared_prefix_rope_positions)


def make_collator(pad_token_id: int, *, prefix_sharing: bool = False, packing: bool = False, packing_length: int = 0,
                  pad_to_multiple_of: int | None = None, vision=None):
    """The collator for a run: packed (data/packing.py), prefix-shared or concatenated; `vision`
    (data/vision.VisionProcessor) adds the image inputs of pairs with images. Which layout a model takes
    is decided once, by modeling/layout.choose_layout (its `unsupported` is the one check of the model
    facts); the collator builds the layout it is given."""
    if packing:
        from prefalign.data.packing import PackedCollator

        return PackedCollator(pad_token_id, prefix_sharing, packing_length, pad_to_multiple_of, vision)
    if prefix_sharing:
        return PrefixSharedCollator(pad_token_id, pad_to_multiple_of, vision)
    return PairCollator(pad_token_id, pad_to_multiple_of, vision)


def pair_length(prompt_len: int, chosen_len: int, rejected_len: int, *, prefix_sharing: bool = False) -> int:
    """The row length a pair occupies in a batch: the padding-relevant length for length grouping."""
    if prefix_sharing:
        return prompt_len + chosen_len + 1 + rejected_len
    return prompt_len + max(chosen_len, rejected_len)


def with_lengths(dataset, *, prefix_sharing: bool = False, column: str = "length"):
    """`dataset` with a `column` of each pair's row length (`pair_length`), for `group_by_length`."""
    if dataset is None or column in dataset.column_names:
        return dataset

    def lengths(batch):
        return {column: [pair_length(len(p), len(c), len(r), prefix_sharing=prefix_sharing)
                         for p, c, r in zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"])]}

    return dataset.map(lengths, batched=True, desc="Measuring pair lengths")
