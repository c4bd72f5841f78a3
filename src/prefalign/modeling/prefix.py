"""The attention mask of prefix-shared batches (layout: contracts.BatchLayout.PREFIX_SHARED).

Query i may attend key j when j <= i and key j is in the SHARED segment (the prompt) or in the
query's own segment. So chosen tokens see the prompt and the chosen reply so far, rejected tokens
the prompt and the rejected reply so far, and padding sees only padding (a fully masked row would
give NaN, and NaN times a zero gradient is still NaN).

transformers 5 passes a 4D mask to the attention function unchanged: `sdpa` reads a boolean mask
(True = attend), `eager` adds a float mask (0 or the dtype's minimum) to the scores. Flash
attention takes no arbitrary mask; modeling/layout refuses prefix sharing with it rather than mask wrongly.
"""

from __future__ import annotations

import torch

from prefalign.contracts import SEGMENT_SHARED


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
