"""The attention mask of prefix-shared batches (layout: contracts.BatchLayout.PREFIX_SHARED).

Query i may attend key j when j <= i and key j is in the SHARED segment (the prompt) or in the
query's own segment. So chosen tokens see the prompt and the chosen reply so far, rejected tokens
the prompt and the rejected reply so far, and padding sees only padding (a fully masked row would
give NaN, and NaN times a zero gradient is still NaN).

transformers 5 passes a 4D mask to the attention function unchanged: `sdpa` reads a boolean mask
(True = attend), `eager` adds a float mask (0 or the dtype's minimum) to the scores. Flash
attention takes no arbitrary mask; modeling/layout refuses prefix sharing with it rather than mask wrongly.

A Qwen vision-language model's rows with images take 3-D rotary positions: `shared_prefix_rope_positions`
for prefix-shared rows, `packed_rope_positions` for packed ones (each sequence's positions as in its own row).
"""

from __future__ import annotations

import torch

from prefalign.contracts import SEGMENT_CHOSEN, SEGMENT_PAD, SEGMENT_REJECTED, SEGMENT_SHARED


def shared_prefix_attention_mask(segment_ids: torch.Tensor, attn_implementation: str | None,
                                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """segment_ids (B, T) -> the (B, 1, T, T) mask for `attn_implementation`."""
    length = segment_ids.shape[1]
    position = torch.arange(length, device=segment_ids.device)
    causal = position[None, :] <= position[:, None]  # (T, T): key j <= query i
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    allowed = causal[None] & ((key == SEGMENT_SHARED) | (key == query))  # (B, T, T)
    allowed = allowed[:, None]
    if attn_implementation in (None, "sdpa"):
        return allowed
    # modeling/layout.unsupported refuses every other implementation before a run starts
    assert attn_implementation == "eager", f"prefix-shared batches reached attn_implementation={attn_implementation}"
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)


def shared_prefix_rope_positions(base_model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The (3, B, T) rotary positions of a prefix-shared batch with images, for a Qwen vision-language
    `base_model` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: 3-D positions from the image grids).

    The images are in the prompt, so the model's own `get_rope_index` on each row's prompt + chosen reply (the
    SHARED and CHOSEN segments, a contiguous start of the row) gives exactly the positions of the plain row
    prompt+chosen. The rejected segment (the prompt's last token again, then the rejected reply) is text
    after the same prompt: in the plain row prompt+rejected it counts on, in all three axes, from the
    prompt's last token, which is the CHOSEN segment's first token here. Padding is at 0."""
    segments = batch["segment_ids"]
    seen = (segments != SEGMENT_PAD) & (segments != SEGMENT_REJECTED)
    import inspect

    media = {key: batch[key] for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
             if key in batch and key in inspect.signature(base_model.get_rope_index).parameters}
    positions, _ = base_model.get_rope_index(
        batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], attention_mask=seen.long(), **media)
    rejected = segments == SEGMENT_REJECTED
    for row in range(segments.shape[0]):
        last_prompt = int((segments[row] == SEGMENT_SHARED).sum())  # index of the CHOSEN segment's first token
        columns = rejected[row].nonzero()[:, 0]
        steps = torch.arange(columns.numel(), device=positions.device)
        positions[:, row, columns] = positions[:, row, last_prompt, None] + steps
    return positions


def packed_rope_positions(base_model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The (4, R, T) positions of a packed batch (data/packing.py) with images, for a Qwen vision-language
    `base_model`: the text positions (the collator's, restarting per sequence; transformers reads them as the
    sequence boundaries of its padding-free path), then the three rotary axes.

    Each sequence is laid out in a row of its own (a span; a prefix-shared block's two spans are one
    prefix-shared row), and takes the positions it has there (`shared_prefix_rope_positions`, which is the
    model's own `get_rope_index` for a row without a rejected segment), so every sequence's positions restart
    as in the plain layout. The batch's grids follow its image tokens in row-major order, and so do these rows'."""
    units: list[list] = []  # [row, start, end, shared] of each sequence, in row-major order
    for row, q0, q1, p0, p1 in batch["spans"].tolist():
        if p1 > p0:  # a prefix-shared reply: the rest of its block (data/packing.pair_block)
            units[-1][2:] = [q1, True]
        else:
            units.append([row, q0, q1, False])
    shape = (len(units), max(end - start for _, start, end, _ in units))
    device = batch["input_ids"].device
    rows = {"input_ids": torch.zeros(shape, dtype=torch.long, device=device),
            "mm_token_type_ids": torch.zeros(shape, dtype=torch.long, device=device),
            "segment_ids": torch.full(shape, SEGMENT_PAD, dtype=torch.long, device=device)}
    for u, (row, start, end, shared) in enumerate(units):
        rows["input_ids"][u, :end - start] = batch["input_ids"][row, start:end]
        rows["mm_token_type_ids"][u, :end - start] = batch["mm_token_type_ids"][row, start:end]
        # a plain sequence is one segment (the collator marks a packed rejected sequence REJECTED)
        rows["segment_ids"][u, :end - start] = batch["segment_ids"][row, start:end] if shared else SEGMENT_CHOSEN
    for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
        if key in batch:
            rows[key] = batch[key]
    own = shared_prefix_rope_positions(base_model, rows)
    positions = batch["position_ids"].new_zeros((3, *batch["input_ids"].shape))
    for u, (row, start, end, _) in enumerate(units):
        positions[:, row, start:end] = own[:, u, :end - start]
    return torch.cat([batch["position_ids"][None], positions])
