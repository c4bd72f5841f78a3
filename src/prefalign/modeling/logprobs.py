"""Per-sequence log-probabilities of the response tokens, without logits for the prompt.

The decoder runs over the whole batch, but the vocabulary projection and log-softmax run only on
the positions that predict a response token, accumulating in fp32. DPO never reads the prompt's
logits, and for a large vocabulary they are most of a naive implementation's memory.

Two kernels compute the projection + log-softmax (`response_token_logps` picks one):
  fused      the output head is a plain `nn.Linear`: a custom autograd function tiles the
             (positions x vocabulary) logits, keeps an online log-sum-exp per position, and in the
             backward pass recomputes each tile once and forms its gradient in place
             (softmax - one-hot), so no logits tile outlives its loop iteration. On a CPU this is
             ~2x faster than autograd through `logsumexp` (fewer passes over each tile). A frozen
             head (LoRA) needs only the input gradient, whose direction the forward forms as it goes:
             its backward does no pass over the vocabulary at all.
  per-chunk  any other head (a LoRA-wrapped head, a ZeRO-3 / FSDP-sharded one, one with hooks):
             the head module is called on chunks of positions, each chunk checkpointed.

Batches come in the three layouts of `contracts.BatchLayout`, named by `batch["layout"]`:
concatenated (rows [0, B) chosen, [B, 2B) rejected), prefix-shared (one packed row per pair, with
`segment_ids`; see modeling/prefix.py) and packed (several pairs per row, attention confined by
spans; see modeling/packed_attention.py).

Wrapped models (DDP, DeepSpeed, FSDP, PEFT): the whole computation runs inside the wrapped model's
own forward call (the causal LM's `forward` is swapped for the duration of the call), so the
wrapper's hooks run: DDP prepares its gradient all-reduce, FSDP gathers its shards. Calling
`model.get_decoder()` on an unwrapped inner model would skip them and, under DDP, silently leave
the gradients unsynchronised across processes.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math

import torch
from torch.utils.checkpoint import checkpoint

from prefalign.contracts import IGNORE_INDEX, SEGMENT_REJECTED, VISION_INPUTS, BatchLayout, PairLogps, batch_layout
from prefalign.modeling.vision import is_vision_language

# Vocabulary columns per logits tile of the fused kernel (tile: chunk_size x columns), by device type.
# On the CPU a 1024 x 2048 fp32 tile (8 MB) stays in cache through its exp / sum passes: measured 1.2-1.3x
# the speed of 4096 columns for hidden 256-896 and a 152k vocabulary, one thread (benchmarks/RESULTS.md).
VOCAB_BLOCK = {"cpu": 2048}
DEFAULT_VOCAB_BLOCK = 4096


def _vocab_block(device: torch.device) -> int:
    return VOCAB_BLOCK.get(device.type, DEFAULT_VOCAB_BLOCK)


# -- the model: find the causal LM, run inside the outermost forward -----------------------------
def causal_lm(model):
    """The `PreTrainedModel` inside `model`: unwraps DDP / DeepSpeed / FSDP (`.module`) and PEFT."""
    from transformers import PreTrainedModel

    inner = model
    for _ in range(8):
        if isinstance(inner, PreTrainedModel):
            return inner
        if hasattr(inner, "get_base_model"):  # peft.PeftModel
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "module", None), torch.nn.Module):  # DDP, DeepSpeedEngine, FSDP
            inner = inner.module
        elif isinstance(getattr(inner, "_orig_mod", None), torch.nn.Module):  # torch.compile
            inner = inner._orig_mod
        else:
            break
    raise TypeError(f"{type(model).__name__} wraps no transformers PreTrainedModel; prefalign needs a causal LM")


@contextlib.contextmanager
def _forward_replaced(module: torch.nn.Module, forward):
    """Temporarily make `module(...)` call `forward` (an instance attribute shadows the class method)."""
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had_own:
            module.forward = previous
        else:
            del module.forward


def _decoder_and_head(model):
    """The transformer body (returns hidden states) and the output projection of a causal LM; a vision-language
    model's body is its whole base model (vision tower, projector, language model), which takes the image inputs
    and computes its own rotary positions (Qwen2-VL's 3-D ones) from them."""
    decoder = model.model if is_vision_language(model.config) else model.get_decoder()
    head = model.get_output_embeddings()
    if decoder is None or head is None:
        raise TypeError(f"{type(model).__name__} exposes no decoder / output embeddings")
    return decoder, head


def _logit_transform(config):
    """(softcap, scale) applied to the head's output by the model (Gemma 2, Cohere), or (None, None)."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    if softcap:
        return float(softcap), None
    if scale and scale != 1:
        return None, float(scale)
    return None, None


def _transform(logits: torch.Tensor, softcap, scale) -> torch.Tensor:
    if softcap is not None:
        return torch.tanh(logits / softcap) * softcap
    if scale is not None:
        return logits * scale
    return logits


# -- kernel 1: fused, tiled projection + log-softmax ---------------------------------------------
def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick here (the weight's dtype without autocast)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _target_logits(h: torch.Tensor, w: torch.Tensor, b, t: torch.Tensor) -> torch.Tensor:
    """y_t = h · w_t (+ b_t) per row, fp32: (rows, 1, H) @ (rows, H, 1), in the tiles' dtype."""
    y = torch.bmm(h.unsqueeze(1), w[t].unsqueeze(2)).reshape(-1).float()
    return y + b[t] if b is not None else y


class _FusedResponseLogps(torch.autograd.Function):
    """hidden (N, H), weight (V, H), bias (V,) | None, targets (N,) -> token log-probs (N,) fp32,
    logit sums over the vocabulary (N,) and, with `want_sqnorm`, log Σ_v π(v)² (N,).

    Per chunk of `chunk_size` rows, the logits are computed in tiles of `_vocab_block` columns with
    an online log-sum-exp; the target logits come from a row-wise dot product, so no tile is
    searched for them (and nothing waits on the GPU). Backward recomputes each tile once:
    d(z_t - lse)/dz = onehot(t) - softmax(z), the softmax part tile by tile, the one-hot part as
    a gather / index_add of N rows. Only the token log-probs are differentiable: the logit sums
    feed metrics and the square norm WPO's weights, which are detached (losses.wpo_weights).

    `input_grad_only` (a frozen head, as under LoRA, whose input needs a gradient; no soft-capping):
    the gradient of z_t - lse with respect to h is w_t - Σ_v softmax(z)_v w_v, which does not depend on
    the upstream gradient, so the forward accumulates Σ_v softmax(z)_v w_v with the same online
    rescaling as the log-sum-exp (one more matmul per tile) and saves that (N, H) direction; the
    backward is then one scaled copy of it, with no second pass over the vocabulary (2 matmuls per
    tile in all instead of 3).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap, scale, want_sqnorm, input_grad_only=False):
        n, vocab = hidden.shape[0], weight.shape[0]
        assert not (input_grad_only and softcap is not None), "the direction ignores dz/dy of a soft cap"
        direction = hidden.new_empty(n, hidden.shape[1], dtype=torch.float32) if input_grad_only else None
        dtype = _compute_dtype(hidden, weight)
        out = hidden.new_empty(n, dtype=torch.float32)
        lse_all = torch.empty_like(out)
        sqnorm = torch.empty_like(out) if want_sqnorm else out.new_empty(0)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.float() if bias is not None else None
            # Σ_v z_v is linear in h unless soft-capped: h · Σ_v w_v (+ Σ_v b_v), no pass over the tiles
            linear_sums = softcap is None
            if linear_sums:
                sums = hidden.float() @ weight.sum(0, dtype=torch.float32) + (b.sum() if b is not None else 0.0)
                if scale is not None:
                    sums *= scale
            else:
                sums = torch.zeros_like(out)
            block = _vocab_block(hidden.device)
            for r0 in range(0, n, chunk_size):
                h = hidden[r0:r0 + chunk_size].to(dtype)
                rows = h.shape[0]
                m = out.new_full((rows,), -math.inf)
                s = out.new_zeros(rows)
                m2, s2 = out.new_full((rows,), -math.inf), out.new_zeros(rows)
                expected = out.new_empty(rows, hidden.shape[1]) if input_grad_only else None
                for v0 in range(0, vocab, block):
                    z = (h @ w[v0:v0 + block].t()).float()
                    if b is not None:
                        z += b[v0:v0 + block]
                    z = _transform(z, softcap, scale)
                    if not linear_sums:
                        sums[r0:r0 + rows] += z.sum(-1)
                    if want_sqnorm:  # online log-sum-exp of 2z
                        new_m2 = torch.maximum(m2, 2 * z.amax(-1))
                        s2 = s2 * torch.exp(m2 - new_m2) + torch.exp(2 * z - new_m2[:, None]).sum(-1)
                        m2 = new_m2
                    new_m = torch.maximum(m, z.amax(-1))  # online log-sum-exp of z, in place on the tile
                    rescale = torch.exp(m - new_m)
                    p = z.sub_(new_m[:, None]).exp_()
                    s = s * rescale + p.sum(-1)
                    m = new_m
                    if input_grad_only:  # Σ_v exp(z_v - m) w_v, rescaled like s
                        _accumulate_mm(expected if v0 == 0 else expected.mul_(rescale[:, None]), p.to(dtype),
                                       w[v0:v0 + block], first=v0 == 0)
                lse = m + torch.log(s)
                t = targets[r0:r0 + rows]
                target = _transform(_target_logits(h, w, b, t), softcap, scale)
                lse_all[r0:r0 + rows] = lse
                out[r0:r0 + rows] = target - lse
                if input_grad_only:
                    d = direction[r0:r0 + rows]
                    torch.sub(w[t].float(), expected.div_(s[:, None]), out=d)
                    if scale is not None:
                        d *= scale
                if want_sqnorm:
                    sqnorm[r0:r0 + rows] = m2 + torch.log(s2) - 2 * lse
        if input_grad_only:
            ctx.save_for_backward(direction)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, lse_all)
        ctx.config = (chunk_size, softcap, scale, dtype, input_grad_only)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(sums, sqnorm)
        return out, sums, sqnorm

    @staticmethod
    def backward(ctx, grad_out, _grad_sums, _grad_sqnorm):
        chunk_size, softcap, scale, dtype, input_grad_only = ctx.config
        if input_grad_only:
            (direction,) = ctx.saved_tensors
            grad_h = direction * grad_out.float()[:, None]
            return grad_h.to(ctx.hidden_dtype), None, None, None, None, None, None, None, None
        hidden, weight, bias, targets, lse_all = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        vocab = weight.shape[0]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        # the first row chunk writes grad_w's blocks, later ones add to them: no zero-fill of a (V, H) tensor
        # (unless there are no rows, and so no first chunk)
        alloc = torch.empty if hidden.shape[0] else torch.zeros
        grad_w = alloc(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.float() if bias is not None else None
            block = _vocab_block(hidden.device)
            for r0 in range(0, hidden.shape[0], chunk_size):
                h = hidden[r0:r0 + chunk_size].to(dtype)
                t = targets[r0:r0 + chunk_size]
                g = grad_out[r0:r0 + chunk_size].float()
                lse = lse_all[r0:r0 + chunk_size]
                for v0 in range(0, vocab, block):  # the softmax part: -g softmax(z) dz/dy
                    w_block = w[v0:v0 + block]
                    z = (h @ w_block.t()).float()
                    if b is not None:
                        z += b[v0:v0 + block]
                    dz = None
                    if softcap is not None:  # z = c tanh(y / c): dz/dy = 1 - (z / c)^2
                        z = torch.tanh(z / softcap) * softcap
                        dz = 1 - (z / softcap) ** 2
                    elif scale is not None:
                        z *= scale
                    grad = z.sub_(lse[:, None]).exp_().mul_(-g[:, None])
                    if dz is not None:
                        grad *= dz
                    elif scale is not None:
                        grad *= scale
                    if need_b:
                        grad_b[v0:v0 + block] += grad.sum(0)
                    grad = grad.to(dtype)
                    if need_h:
                        _accumulate_mm(grad_h[r0:r0 + chunk_size], grad, w_block)
                    if need_w:
                        _accumulate_mm(grad_w[v0:v0 + block], grad.t(), h, first=r0 == 0)
                # the one-hot part: +g dz/dy at the target, one row of W per position
                g_t = g
                if softcap is not None:
                    z_t = _transform(_target_logits(h, w, b, t), softcap, scale)
                    g_t = g * (1 - (z_t / softcap) ** 2)
                elif scale is not None:
                    g_t = g * scale
                if need_h:
                    grad_h[r0:r0 + chunk_size] += g_t[:, None] * w[t].float()
                if need_w:
                    grad_w.index_add_(0, t, g_t[:, None] * h.float())
                if need_b:
                    grad_b.index_add_(0, t, g_t)
        return (
            grad_h.to(hidden.dtype) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None, None, None, None, None, None,
        )


def _accumulate_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool = False) -> None:
    """out (fp32) += a @ b (or out = a @ b when `first`), without a temporary where the dtypes allow."""
    if a.dtype == out.dtype:
        if first:
            torch.mm(a, b, out=out)
        else:
            out.addmm_(a, b)
    elif first:
        out.copy_(a @ b)
    else:
        out.add_((a @ b).float())


def _fusable_head(head) -> bool:
    """Whether the fused kernel may read `head.weight` directly instead of calling the module.

    Only a plain `nn.Linear` without hooks, whose weight is an ordinary dense tensor: a LoRA-wrapped
    head, a DeepSpeed ZeRO-3 partitioned weight (`ds_id`) or an FSDP2 DTensor needs its module call.
    """
    if type(head) is not torch.nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return False
    weight = head.weight
    return type(weight.data) is torch.Tensor and not hasattr(weight, "ds_id")


# -- kernel 2: per-chunk module calls, checkpointed ----------------------------------------------
def _chunk_logps(head, softcap, scale, hidden: torch.Tensor, targets: torch.Tensor, want_sqnorm: bool):
    """For hidden (N, H) and targets (N,): token log-probs (N,), logit sums (N,), optional sq-norm (N,)."""
    logits = _transform(head(hidden).float(), softcap, scale)
    logsumexp = torch.logsumexp(logits, dim=-1)
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logsumexp
    logit_sums = logits.detach().sum(-1)
    if want_sqnorm:  # log Σ_v π(v)², for WPO's weights
        sqnorm = torch.logsumexp(2 * (logits - logsumexp.unsqueeze(-1)), dim=-1)
        return token_logps, logit_sums, sqnorm
    return token_logps, logit_sums


def _head_logps(head, softcap, scale, selected, targets, chunk_size, want_sqnorm):
    """(token_logps, logit_sums, sqnorm | None) for the N selected positions, by either kernel."""
    if _fusable_head(head):
        frozen = not head.weight.requires_grad and (head.bias is None or not head.bias.requires_grad)
        input_grad_only = frozen and softcap is None and torch.is_grad_enabled() and selected.requires_grad
        token_logps, sums, sqnorm = _FusedResponseLogps.apply(
            selected, head.weight, head.bias, targets, chunk_size, softcap, scale, want_sqnorm, input_grad_only)
        return token_logps, sums, (sqnorm if want_sqnorm else None)
    outputs = []
    for start in range(0, selected.shape[0], chunk_size):
        args = (head, softcap, scale, selected[start:start + chunk_size], targets[start:start + chunk_size],
                want_sqnorm)
        if torch.is_grad_enabled() and selected.requires_grad:
            outputs.append(checkpoint(_chunk_logps, *args, use_reentrant=False))
        else:
            outputs.append(_chunk_logps(*args))
    if not outputs:
        empty = selected.new_zeros(0, dtype=torch.float)
        return empty, empty, (empty if want_sqnorm else None)
    columns = list(zip(*outputs))
    return torch.cat(columns[0]), torch.cat(columns[1]), (torch.cat(columns[2]) if want_sqnorm else None)


@functools.lru_cache(maxsize=None)
def _takes_encoded_images(decoder_class: type) -> bool:
    """Whether a vision-language base model class encodes images itself and takes them encoded
    (`mm_encoder_outputs`); read once per class."""
    return hasattr(decoder_class, "get_image_features") and \
        "mm_encoder_outputs" in inspect.signature(decoder_class.forward).parameters


_MEDIA = (("image", "pixel_values", "image_grid_thw", "get_image_features"),
          ("video", "pixel_values_videos", "video_grid_thw", "get_video_features"))
"""Each kind of media: its name in `mm_encoder_outputs` (and its batch's `<name>_ids`), its pixel and grid
inputs, the model's encoder method."""


def has_media(batch: dict) -> bool:
    """True for a batch with image or video pixels (a vision-language model's)."""
    return any(kind[1] in batch for kind in _MEDIA)


def media_ids(batch: dict) -> dict[str, torch.Tensor] | None:
    """The collator's `image_ids` / `video_ids` of a batch by kind (data/collate.image_inputs), None without."""
    ids = {name: batch[f"{name}_ids"] for name, *_ in _MEDIA if f"{name}_ids" in batch}
    return ids or None


def _images_encoded_once(decoder, inputs: dict, ids_by_kind: dict, reuse: dict | None = None) -> None:
    """A batch's image (video) tokens hold its images (videos) in row-major order, image k of the pairs' images
    at every place j with `ids_by_kind["image"][j]` = k (data/collate.image_inputs): the concatenated layout's
    rejected rows repeat the chosen rows' media, a packed block's two sequences each hold their pair's. Run the
    vision tower and projector on each image and video once (at its first place) and hand the model its
    features at every place (`mm_encoder_outputs`, transformers' own input for encoder outputs computed
    beforehand), so the tower runs once per pair. The features, and their gradients (summed over the uses), are
    the same as when the tower encodes every copy; and the decoder's keywords (a packed batch's spans) never
    reach the tower's attention. A model whose forward takes no such input is left as it is.
    `reuse` (scoring.score_batch): a dict the first model to encode the batch's media fills and the next one
    reads, for a reference whose tower and projector are the policy's, frozen."""
    present = [kind for kind in _MEDIA if kind[1] in inputs and kind[0] in ids_by_kind]
    if not present or not _takes_encoded_images(type(decoder)) or \
            any(not hasattr(decoder, kind[3]) for kind in present):
        return
    outputs = {}
    for name, pixels_key, grid_key, method in present:
        pixels = inputs.pop(pixels_key)
        if reuse is not None and name in reuse:
            outputs[name] = reuse[name]
            continue
        outputs[name] = _encoded_once(getattr(decoder, method), pixels, inputs.get(grid_key),
                                      ids_by_kind[name].tolist())
        if reuse is not None:
            reuse[name] = outputs[name]
    inputs["mm_encoder_outputs"] = outputs


def _encoded_once(encode, pixels, grid, ids: list[int]):
    """One kind of media, placed as `ids` says, encoded once each and its features handed to every place."""
    slot: dict[int, int] = {}  # image -> its place among the encoded ones
    first: list[int] = []  # the place each encoded image is taken from
    for j, k in enumerate(ids):
        if k not in slot:
            slot[k] = len(first)
            first.append(j)
    if grid is not None:  # Qwen: the patches of all placed images in one (P, D) tensor, an image's size its grid
        ends = grid.prod(-1).cumsum(0).tolist()
        own = torch.cat([pixels[(ends[j - 1] if j else 0):ends[j]] for j in first])
        encoded = encode(own, grid[first], return_dict=True)
    else:  # LLaVA, Gemma 3: one (C, H, W) image per row of pixel_values
        encoded = encode(pixel_values=pixels[first], return_dict=True)
    pooled = encoded.pooler_output  # per image: a list (Qwen, LLaVA) or one (n, tokens, D) tensor (Gemma 3)
    places = [slot[k] for k in ids]
    encoded.pooler_output = pooled[torch.tensor(places, device=pooled.device)] if torch.is_tensor(pooled) \
        else [pooled[j] for j in places]
    if getattr(encoded, "deepstack_features", None) is not None:  # Qwen3-VL: per layer, per image
        encoded.deepstack_features = [[layer[slot[k]] for k in ids] for layer in encoded.deepstack_features]
    return encoded


def _response_logps_forward(lm, scored_labels, chunk_size, want_sqnorm, decoder_kwargs, ids_by_kind=None,
                            reuse=None, **kwargs):
    """The body of `response_token_logps`, run as the causal LM's forward (see the module docstring).

    `kwargs` are what the wrappers pass on (input_ids, attention_mask, position_ids, and Nones
    such as labels=None from PEFT); the decoder gets the non-None ones, and `decoder_kwargs`.
    `ids_by_kind`: which image (video) each placed one is (`_images_encoded_once`, with `reuse`); None: the
    model encodes every placed image itself.
    """
    skip = ("labels", "return_dict", "use_cache", "output_attentions", "output_hidden_states")
    inputs = {k: v for k, v in kwargs.items() if v is not None and k not in skip}
    decoder, head = _decoder_and_head(lm)
    if ids_by_kind is not None:
        _images_encoded_once(decoder, inputs, ids_by_kind, reuse)
    routed = bool(getattr(lm.config, "output_router_logits", False))
    decoded = decoder(**inputs, **decoder_kwargs, use_cache=False, **({"output_router_logits": True} if routed else {}))
    hidden = decoded.last_hidden_state
    shifted = scored_labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    selected = hidden[:, :-1][mask]  # (N, H): only the positions that predict a response token
    targets = shifted[mask]
    softcap, scale = _logit_transform(lm.config)
    token_logps, logit_sums, sqnorm = _head_logps(head, softcap, scale, selected, targets, chunk_size, want_sqnorm)
    vocab = head.weight.shape[0] if hasattr(head, "weight") else lm.config.get_text_config().vocab_size
    result = {"mask": mask, "token_logps": token_logps, "logit_means": logit_sums / vocab}
    if want_sqnorm:
        result["sqnorm"] = sqnorm
    if routed:
        result["router_aux_loss"] = _router_aux_loss(lm, decoded.router_logits, inputs.get("attention_mask"))
    return result


def _router_aux_loss(lm, router_logits, attention_mask) -> torch.Tensor:
    """router_aux_loss_coef x the model's own load-balancing loss (its module's `load_balancing_loss_func`,
    as its causal LM's forward computes it); padding excluded where the mask is a plain (R, T) one."""
    import sys

    loss_fn = sys.modules[type(lm).__module__].load_balancing_loss_func
    mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    aux = loss_fn(router_logits, lm.num_experts, lm.num_experts_per_tok, mask)
    return lm.router_aux_loss_coef * aux


def response_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                         *, chunk_size: int = 1024, want_sqnorm: bool = False, position_ids=None,
                         decoder_kwargs: dict | None = None, vision_inputs: dict | None = None,
                         media_ids: dict | None = None, image_features: dict | None = None):
    """Log-probs of the labelled tokens of each row.

    Args: input_ids, labels: (R, T); labels are -100 where not scored. attention_mask: (R, T), or a
    prepared (R, 1, T, T) mask (prefix sharing); position_ids: (R, T) or None; `decoder_kwargs`
    go to the decoder's forward (the spans of a packed batch); `vision_inputs` (contracts.VISION_INPUTS:
    pixel_values, image_grid_thw, ...) go through the wrapped model's forward to a vision-language model;
    `media_ids` ({"image": (n,), "video": (m,)}, `media_ids(batch)`): for each image (video) in the batch's
    row-major order, which of the pairs' images (videos) it is (the collator's; the vision tower then runs
    once per image; None: the model encodes every placed image);
    `image_features`: a dict to fill with (or read) those encoded images (see `pair_logps`).
    Returns a dict with `mask` (R, T-1) bool (True where position t predicts a scored token
    t+1), `token_logps` (N,) for the N scored tokens in row-major order, `logit_means` (N,)
    (mean over the vocabulary, detached) and optionally `sqnorm` (N,).
    `model` may be wrapped (PEFT, DDP, DeepSpeed, FSDP): the computation runs inside its forward.
    """
    lm = causal_lm(model)

    def forward(*args, **kwargs):
        if args:
            raise TypeError("prefalign calls the model with keyword arguments only")
        return _response_logps_forward(lm, labels, chunk_size, want_sqnorm, decoder_kwargs or {}, media_ids,
                                       image_features, **kwargs)

    with _forward_replaced(lm, forward):
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     **(vision_inputs or {}))


# -- per-pair sums --------------------------------------------------------------------------------
def _segments(mask: torch.Tensor, batch: dict[str, torch.Tensor], layout: BatchLayout) -> tuple[torch.Tensor, int]:
    """For each scored token (row-major over `mask`), its sequence in [0, 2B): b chosen, B + b rejected."""
    rows, cols = mask.nonzero(as_tuple=True)
    if layout is BatchLayout.PACKED:  # each token carries its pair's place in the batch
        b = int(batch["pair_ids"].max()) + 1
        rejected = batch["segment_ids"][:, 1:][rows, cols] == SEGMENT_REJECTED
        return batch["pair_ids"][:, 1:][rows, cols] + b * rejected.long(), b
    if layout is BatchLayout.CONCATENATED:  # rows [0, B) chosen, [B, 2B) rejected
        return rows, mask.shape[0] // 2
    b = mask.shape[0]
    rejected = batch["segment_ids"][:, 1:][rows, cols] == SEGMENT_REJECTED  # the segment of the predicted token
    return rows + b * rejected.long(), b


def _left_aligned(values: torch.Tensor, seq: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (N,) values of sequences `seq` (N,) (each sequence's tokens in order, sequences in any
    order) -> (S, L) left-aligned and zero-padded, with its (S, L) bool mask."""
    width = int(counts.max()) if counts.numel() else 0
    order = torch.argsort(seq, stable=True)
    seq, values = seq[order], values[order]
    starts = counts.cumsum(0) - counts
    cols = torch.arange(values.shape[0], device=values.device) - starts[seq]
    out = values.new_zeros(counts.shape[0], width).index_put((seq, cols), values)
    valid = torch.arange(width, device=values.device).unsqueeze(0) < counts.unsqueeze(1)
    return out, valid


def distinct_images(batch: dict) -> int:
    """How many images (and videos) a batch's pairs hold, each counted once however often the batch places it (the
    concatenated layout's rejected rows, a packed block's two sequences): `image_ids` name each placed image's
    index among them (data/collate.image_inputs); a batch without them places each image once."""
    ids = media_ids(batch)
    if ids is not None:
        return sum(len(set(placed.tolist())) for placed in ids.values())
    media = [batch[key] for key in ("image_grid_thw", "video_grid_thw") if key in batch]
    if not media and "pixel_values" in batch:
        media = [batch["pixel_values"]]
    return sum(len(part) for part in media)


def pair_logps(model, batch: dict[str, torch.Tensor], *, chunk_size: int = 1024,
               token_level: bool = False, want_sqnorm: bool = False, vision_once: bool = True,
               image_features: dict | None = None) -> PairLogps:
    """Policy (or reference) log-probs of a batch from `PairCollator`, `PrefixSharedCollator` or `PackedCollator`.

    Concatenated batches: rows [0, B) are chosen and [B, 2B) rejected. Prefix-shared batches
    (`batch["layout"]` is BatchLayout.PREFIX_SHARED): one row per pair, the (R, 1, T, T) attention
    mask is built here for the model's attention implementation (modeling/prefix.py). Packed
    batches: the pairs' tokens carry `pair_ids`, attention follows the batch's spans
    (modeling/packed_attention.py). With `token_level`, `extras` holds the per-token
    `chosen_token_logps` / `rejected_token_logps` (B, L) and their masks (for LD-DPO), and with
    `want_sqnorm` also `chosen_token_sqnorm` / `rejected_token_sqnorm` (for WPO). A batch with images runs the
    vision tower once per pair (`vision_once`; False: on every placed copy, the concatenated and prefix-shared
    layouts only), with the 3-D rotary positions of modeling/prefix.py in the prefix-shared and packed layouts;
    `image_features`: an empty dict this call fills with the batch's encoded images, or one an earlier call
    filled, whose features this call uses instead of running the tower (a frozen tower shared with the policy).
    """
    layout = batch_layout(batch)
    attention_mask, decoder_kwargs, position_ids = batch["attention_mask"], {}, batch.get("position_ids")
    if layout is BatchLayout.PACKED:
        from prefalign.modeling.packed_attention import packed_model_inputs

        lm = causal_lm(model)
        attention_mask, decoder_kwargs = packed_model_inputs(lm, batch)
        if "image_grid_thw" in batch:  # a Qwen vision-language model's 3-D rotary positions, per sequence
            from prefalign.modeling.prefix import packed_rope_positions

            position_ids = packed_rope_positions(_decoder_and_head(lm)[0], batch)
    elif layout is BatchLayout.PREFIX_SHARED:
        from prefalign.modeling.prefix import shared_prefix_attention_mask

        lm = causal_lm(model)
        attention_mask = shared_prefix_attention_mask(
            batch["segment_ids"], getattr(lm.config, "_attn_implementation", None), lm.dtype)
        if "image_grid_thw" in batch or "video_grid_thw" in batch:  # a Qwen vision-language model's 3-D rotary positions
            from prefalign.modeling.prefix import shared_prefix_rope_positions

            position_ids = shared_prefix_rope_positions(_decoder_and_head(lm)[0], batch)
    out = response_token_logps(model, batch["input_ids"], attention_mask, batch["labels"],
                               chunk_size=chunk_size, want_sqnorm=want_sqnorm,
                               position_ids=position_ids, decoder_kwargs=decoder_kwargs,
                               vision_inputs={k: batch[k] for k in VISION_INPUTS if k in batch},
                               media_ids=media_ids(batch) if vision_once or layout is BatchLayout.PACKED
                               else None,  # the model's own encoding would hand a packed batch's spans to its tower
                               image_features=image_features)
    mask = out["mask"]
    seq, b = _segments(mask, batch, layout)
    counts = torch.bincount(seq, minlength=2 * b)
    sums = torch.zeros(2 * b, dtype=out["token_logps"].dtype, device=mask.device).index_add(0, seq, out["token_logps"])
    logit_means = torch.zeros(2 * b, dtype=torch.float32, device=mask.device).index_add(
        0, seq, out["logit_means"].float()) / counts.clamp(min=1)
    counts = counts.float()
    extras = {}
    if token_level or want_sqnorm:
        names = [("token_logps", out["token_logps"])] + ([("token_sqnorm", out["sqnorm"])] if want_sqnorm else [])
        for name, values in names:
            dense, valid = _left_aligned(values, seq, counts.long())
            extras[f"chosen_{name}"], extras[f"rejected_{name}"] = dense[:b], dense[b:]
            extras["chosen_mask"], extras["rejected_mask"] = valid[:b], valid[b:]
    return PairLogps(
        chosen=sums[:b], rejected=sums[b:], chosen_tokens=counts[:b], rejected_tokens=counts[b:],
        chosen_mean_logit=logit_means[:b].detach(), rejected_mean_logit=logit_means[b:].detach(),
        extras=extras, router_aux_loss=out.get("router_aux_loss"),
    )
