"""The attention mask of prefix-shared batches (layout: contracts.BatchLayout.PREFIX_SHARED).

Query i may attend key j when j <= i and key j is in the SHARED segment (the prompt) or in the
query's own segment. So chosen tokens see the prompt and the chosen reply so far, rejected tokens
the prompt and the rejected reply so far, and padding sees only padding (a fully masked row would
give NaN, and NaN times a zero gradient is still NaN).

transformers 5 passes a 4D mask to the attention function unchanged: `sdpa` reads a boolean mask
(True = attend), `eager` adds a float mask (0 or the dtype's minimum) to the scores. Flash
attention takes no arbitrary mask; modeling/layout refuses prefix sharing with it rather than mask wrongly.

A Qwen vision-language model's rows with images take 3-D rotary positions, `shared_prefix_rope_positions`.
"""

from __future__ import annotations

import torch

from prefalign.contracts import SEGMENT_PAD, SEGMENT_REJECTED, SEGMENT_SHARED


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
