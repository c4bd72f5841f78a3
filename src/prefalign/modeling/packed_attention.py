"""Attention confined to the spans of a packed batch (layout: data/packing.py), on any device.

transformers picks a model's attention function by name (its `AttentionInterface`). A model that
scores packed batches is switched to PACKED_ATTENTION, registered here: given the batch's spans
(passed by modeling/logprobs.py as the decoder keyword `packed_spans`, which transformers hands
down to every attention call, also when a checkpointed layer is recomputed in the backward pass)
it runs torch's scaled-dot-product attention once per span:

  a sequence (no prefix)      causal attention over its own positions
  a prefix-shared reply       the reply's queries attend to the whole shared prompt and causally
                              to the reply itself: on the CPU as two maskless flash calls whose
                              outputs are merged by their log-sum-exps (`PrefixReplyAttention`);
                              elsewhere keys = [prompt | reply] with one small mask

so each position attends to exactly what it would in its own padded row, and nothing is computed
for another pair or for padding: the cost is Σ L² over sequences instead of R · T². Grouped KV
heads are read in place on the CPU (sdpa's `enable_gqa`), not repeated per query head. (One dense
sdpa call with a block mask over the packed row, which transformers builds from restarting
`position_ids`, costs T² per row: measured slower on long rows in benchmarks/RESULTS.md.)

Without spans (a batch in another layout, generation) the function is transformers' sdpa, with
sdpa's masks. With flash-attention (GPU) and no prefix sharing, the packed batch goes through
transformers' own padding-free path instead: no mask, `position_ids` restarting per sequence,
from which flash-attention's varlen kernel takes the sequence boundaries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


PACKED_ATTENTION = "prefalign_packed"
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")
_registered = False


class PackedSpans:
    """The spans of one packed batch as Python ints, with the prefix masks built once per forward.

    `spans`: (row, q_start, q_end, p_start, p_end) tuples (data/packing.py), row after row, each
    row's spans end to end from position 0 (the attention output is their concatenation), up to
    `tokens[row]`, the row's count of tokens (the rest is padding).
    """

    def __init__(self, spans: torch.Tensor, tokens: list[int]):
        self.spans = [tuple(s) for s in spans.tolist()]
        self._masks: dict = {}
        ends: dict[int, int] = {}
        for row, q0, q1, *_ in self.spans:
            if q0 != ends.get(row, 0) or q1 <= q0 or row < max(ends, default=0):
                raise ValueError(f"packed spans must cover each row end to end, in order; got {self.spans}")
            ends[row] = q1
        # a batch cut apart on its way (accelerate's dispatch once kept only the first span) attends wrongly
        if [ends.get(row, 0) for row in range(len(tokens))] != tokens:
            raise ValueError(f"packed spans cover {[ends.get(row, 0) for row in range(len(tokens))]} tokens of "
                             f"rows holding {tokens}")

    def prefix_mask(self, prefix: int, length: int, device) -> torch.Tensor:
        """(length, prefix + length) bool: every prefix key, then causal over the reply's own keys."""
        key = (prefix, length, device)
        if key not in self._masks:
            own = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            self._masks[key] = torch.cat([torch.ones(length, prefix, dtype=torch.bool, device=device), own], 1)
        return self._masks[key]


class PrefixReplyAttention(torch.autograd.Function):
    """A reply's attention over [prompt | reply] (every prompt key, the reply's own keys causally), on the CPU.

    Attention over two key sets is the merge of the attention over each: with o_s, lse_s the output and
    log-sum-exp of set s, lse = log(exp(lse_1) + exp(lse_2)) and o = Σ_s exp(lse_s - lse) o_s. torch's CPU
    flash kernel returns both, so the reply runs as one maskless call over the prompt's keys and one causal
    call over its own, with no (reply x (prompt + reply)) mask and no concatenated key copies. sdpa turns a
    boolean mask into a float copy on every call and keeps it for the backward: 134 MB a layer for a
    4,096-token reply after a 4,096-token prompt, so a long pair's memory grew with the square of its length.
    The backward is the flash backward of each key set, given the merged output and log-sum-exp (the
    softmax's normaliser is the merged one): the key sets' gradients, and the query's as their sum. Values
    and gradients equal the masked call's to fp32 rounding (tests/modeling/test_packing.py); measured at
    2,048 + 2,048 tokens, forward and backward, 1.04 s -> 0.74 s, and equal at the demo data's lengths.
    """

    @staticmethod
    def forward(ctx, query, prompt_key, prompt_value, key, value, scale):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out_p, lse_p = flash(query, prompt_key, prompt_value, 0.0, False, scale=scale)
        out_r, lse_r = flash(query, key, value, 0.0, True, scale=scale)
        lse = torch.logaddexp(lse_p, lse_r)
        out = (out_p.float() * (lse_p - lse).exp_().unsqueeze(-1)
               + out_r.float() * (lse_r - lse).exp_().unsqueeze(-1)).to(query.dtype)
        ctx.save_for_backward(query, prompt_key, prompt_value, key, value, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        query, prompt_key, prompt_value, key, value, out, lse = ctx.saved_tensors
        flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad = grad.contiguous()
        dq_p, dk_p, dv_p = flash_backward(grad, query, prompt_key, prompt_value, out, lse, 0.0, False, scale=ctx.scale)
        dq_r, dk_r, dv_r = flash_backward(grad, query, key, value, out, lse, 0.0, True, scale=ctx.scale)
        return dq_p + dq_r, dk_p, dv_p, dk_r, dv_r, None


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     packed_spans: PackedSpans | None = None, **kwargs):
    """query (R, H, T, D), key / value (R, H_kv, T, D) -> (R, T, H, D), as transformers' sdpa returns."""
    if packed_spans is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    # modeling/layout.unsupported refuses both before a run starts: reaching them is a bug
    assert not kwargs.get("softcap"), "packed batches reached soft-capped attention"
    window = kwargs.get("sliding_window")
    assert not window or max(q1 - q0 + p1 - p0 for _, q0, q1, p0, p1 in packed_spans.spans) <= window, \
        f"packed batches reached a sliding window ({window} tokens) shorter than a sequence"
    groups = query.shape[1] // key.shape[1]
    # grouped KV heads: on the CPU sdpa's flash kernel reads each KV head for its group of query heads
    # (`enable_gqa`): no repeated copy, measured 1.2-1.5x faster per span, forward and backward
    # (benchmarks/results/profile_smollm2.md). Elsewhere the copy stays: a CUDA mask-taking kernel may
    # not take `enable_gqa` and would fall back to the dense math kernel.
    gqa = {"enable_gqa": True} if groups > 1 and query.device.type == "cpu" else {}
    if groups > 1 and not gqa:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    # the merged reply calls torch's CPU flash op directly: no dropout, and one dtype (sdpa would cast under autocast)
    merged_reply = (query.device.type == "cpu" and not dropout and not torch.is_autocast_enabled("cpu")
                    and query.dtype == key.dtype == value.dtype)
    rows: list[list[torch.Tensor]] = [[] for _ in range(query.shape[0])]
    for row, q0, q1, p0, p1 in packed_spans.spans:
        q = query[row:row + 1, :, q0:q1]
        if p1 > p0 and merged_reply:
            o = PrefixReplyAttention.apply(q, key[row:row + 1, :, p0:p1], value[row:row + 1, :, p0:p1],
                                           key[row:row + 1, :, q0:q1], value[row:row + 1, :, q0:q1], scaling)
        elif p1 > p0:
            k = torch.cat([key[row:row + 1, :, p0:p1], key[row:row + 1, :, q0:q1]], 2)
            v = torch.cat([value[row:row + 1, :, p0:p1], value[row:row + 1, :, q0:q1]], 2)
            mask = packed_spans.prefix_mask(p1 - p0, q1 - q0, query.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, **gqa)
        else:
            o = F.scaled_dot_product_attention(q, key[row:row + 1, :, q0:q1], value[row:row + 1, :, q0:q1],
                                               dropout_p=dropout, is_causal=True, scale=scaling, **gqa)
        rows[row].append(o)
    length = query.shape[2]
    for parts in rows:  # padding at the row's end: zeros, attending nowhere
        used = sum(part.shape[2] for part in parts)
        if used < length:
            parts.append(query.new_zeros(1, query.shape[1], length - used, query.shape[3]))
    out = torch.cat([torch.cat(parts, 2) for parts in rows], 0)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(PACKED_ATTENTION, packed_attention)
        AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
        _registered = True


def packed_model_inputs(lm, batch: dict) -> tuple[torch.Tensor | None, dict]:
    """(attention_mask, extra decoder kwargs) for scoring a packed `batch` with the causal LM `lm`.

    Switches `lm`'s language model to PACKED_ATTENTION for good (not just for this call: a checkpointed
    layer is recomputed after the call returns, and must attend the same way). Only the language model: a
    vision-language model's forward can hand the spans to its vision tower too (transformers before
    `mm_encoder_outputs`), whose attention must stay its own.
    """
    decoder = lm.get_decoder()  # the language model; a text-only model's base model
    implementation = getattr(decoder.config, "_attn_implementation", None)
    spans = PackedSpans(batch["spans"], batch["attention_mask"].sum(1).tolist())
    # modeling/layout.unsupported refuses what these assert before a run starts: reaching them is a bug
    if implementation in FLASH_ATTENTION:
        assert not any(p1 > p0 for *_, p0, p1 in spans.spans), f"prefix-shared packed batches reached {implementation}"
        return None, {}  # transformers' padding-free path: sequence boundaries from position_ids
    if implementation != PACKED_ATTENTION:
        assert implementation in (None, "sdpa", "eager"), f"packed batches reached attn_implementation={implementation}"
        _register()
        decoder.set_attn_implementation(PACKED_ATTENTION)
    # A 4D mask is passed through by transformers' mask creation untouched; this one is empty
    # (the spans say what attends to what) and stops transformers from building a dense mask.
    rows = batch["input_ids"].shape[0]
    empty_mask = torch.ones(rows, 1, 0, 0, dtype=torch.bool, device=batch["input_ids"].device)
    return empty_mask, {"packed_spans": spans}
