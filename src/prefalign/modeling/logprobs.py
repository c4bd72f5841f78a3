"""Per-sequence log-probabilities of the response tokens, without logits for the prompt.

The decoder runs over the whole batch, but the vocabulary projection and log-softmax run only on
the positions that predict a response token, in chunks, accumulating in fp32; each chunk is
recomputed in the backward pass instead of keeping its logits. For a large vocabulary the
prompt's logits are most of a naive implementation's memory, and DPO never reads them.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from prefalign.contracts import PairLogps
from prefalign.data.collate import IGNORE_INDEX


def _decoder_and_head(model):
    """The transformer body (returns hidden states) and the output projection of a causal LM."""
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    if decoder is None or head is None:
        raise TypeError(f"{type(model).__name__} exposes no decoder / output embeddings")
    return decoder, head


def _logit_transform(config):
    """Model-specific post-processing of the head's output (soft-capping, scaling), or None."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    if softcap:
        return lambda logits: torch.tanh(logits / softcap) * softcap
    if scale and scale != 1:
        return lambda logits: logits * scale
    return None


def _chunk_logps(head, transform, hidden: torch.Tensor, targets: torch.Tensor, want_sqnorm: bool):
    """For hidden (N, H) and targets (N,): token log-probs (N,), logit sums (N,), optional sq-norm (N,)."""
    logits = head(hidden).float()
    if transform is not None:
        logits = transform(logits)
    logsumexp = torch.logsumexp(logits, dim=-1)
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logsumexp
    logit_sums = logits.detach().sum(-1)
    if want_sqnorm:  # log Σ_v π(v)², for WPO's weights
        sqnorm = torch.logsumexp(2 * (logits - logsumexp.unsqueeze(-1)), dim=-1)
        return token_logps, logit_sums, sqnorm
    return token_logps, logit_sums


def response_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                         *, chunk_size: int = 1024, want_sqnorm: bool = False, position_ids=None):
    """Log-probs of the labelled tokens of each row.

    Args: input_ids, attention_mask, labels: (R, T); labels are -100 where not scored.
    Returns a dict with `mask` (R, T-1) bool (True where position t predicts a scored token
    t+1), `token_logps` (N,) for the N scored tokens in row-major order, `logit_means` (N,)
    (mean over the vocabulary, detached) and optionally `sqnorm` (N,).
    """
    decoder, head = _decoder_and_head(model)
    kwargs = {"position_ids": position_ids} if position_ids is not None else {}
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).last_hidden_state
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    selected = hidden[:, :-1][mask]  # (N, H): only the positions that predict a response token
    targets = shifted[mask]
    transform = _logit_transform(model.config)
    vocab = head.weight.shape[0] if hasattr(head, "weight") else None
    outputs = []
    for start in range(0, selected.shape[0], chunk_size):
        args = (head, transform, selected[start:start + chunk_size], targets[start:start + chunk_size], want_sqnorm)
        if torch.is_grad_enabled() and selected.requires_grad:
            outputs.append(checkpoint(_chunk_logps, *args, use_reentrant=False))
        else:
            outputs.append(_chunk_logps(*args))
    columns = list(zip(*outputs)) if outputs else [[selected.new_zeros(0, dtype=torch.float)]] * (3 if want_sqnorm else 2)
    result = {"mask": mask, "token_logps": torch.cat(columns[0])}
    logit_sums = torch.cat(columns[1])
    result["logit_means"] = logit_sums / vocab if vocab else logit_sums
    if want_sqnorm:
        result["sqnorm"] = torch.cat(columns[2])
    return result


def _per_row(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum per row of the flat (N,) `values` scattered by `mask` (R, T)."""
    rows = mask.nonzero(as_tuple=True)[0]
    return torch.zeros(mask.shape[0], dtype=values.dtype, device=values.device).index_add(0, rows, values)


def _left_aligned(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (N,) values -> (R, L) left-aligned per row, zero-padded, with its (R, L) bool mask."""
    counts = mask.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    rows, _ = mask.nonzero(as_tuple=True)
    cols = mask.long().cumsum(1)[mask] - 1
    out = values.new_zeros(mask.shape[0], width)
    out = out.index_put((rows, cols), values)
    valid = torch.arange(width, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return out, valid


def pair_logps(model, batch: dict[str, torch.Tensor], *, chunk_size: int = 1024,
               token_level: bool = False, want_sqnorm: bool = False) -> PairLogps:
    """Policy (or reference) log-probs of a concatenated batch from `PairCollator`.

    Rows [0, B) are chosen and [B, 2B) rejected. With `token_level`, `extras` holds the per-token
    `chosen_token_logps` / `rejected_token_logps` (B, L) and their masks (for LD-DPO), and with
    `want_sqnorm` also `chosen_token_sqnorm` / `rejected_token_sqnorm` (for WPO).
    """
    out = response_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                               chunk_size=chunk_size, want_sqnorm=want_sqnorm,
                               position_ids=batch.get("position_ids"))
    mask = out["mask"]
    sums = _per_row(out["token_logps"], mask)
    counts = mask.sum(1).float()
    logit_means = _per_row(out["logit_means"], mask) / counts.clamp(min=1)
    b = mask.shape[0] // 2
    extras = {}
    if token_level or want_sqnorm:
        names = [("token_logps", out["token_logps"])] + ([("token_sqnorm", out["sqnorm"])] if want_sqnorm else [])
        for name, values in names:
            dense, valid = _left_aligned(values, mask)
            extras[f"chosen_{name}"], extras[f"rejected_{name}"] = dense[:b], dense[b:]
            extras["chosen_mask"], extras["rejected_mask"] = valid[:b], valid[b:]
    return PairLogps(
        chosen=sums[:b], rejected=sums[b:], chosen_tokens=counts[:b], rejected_tokens=counts[b:],
        chosen_mean_logit=logit_means[:b].detach(), rejected_mean_logit=logit_means[b:].detach(),
        extras=extras,
    )
