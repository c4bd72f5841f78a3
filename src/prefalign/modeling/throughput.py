"""How fast a run goes and how much of its work is padding: tokens/s, padding share, an MFU-style figure.

Per batch (any layout, contracts.BatchLayout) `batch_counts` counts:
  tokens     real token positions (what the data holds, each pair's sequences)
  positions  positions the model computes (rows x length: tokens + padding)
  attended   (query, key) pairs attention needs, over real queries only
  scored     positions whose logits are computed (the reply tokens)

The MFU-style figure is the model FLOPs the batch needs, per second, over the device's matmul
rate measured once at start-up (`matmul_rate`: a square matmul in the compute dtype; on this
project's CPUs about 170 GFLOP/s in fp32 with 2 threads). Model FLOPs of one forward:
  2 · (decoder parameters) · tokens + 4 · layers · (query width) · attended + 2 · hidden · vocab · scored
(the head runs on reply positions only, modeling/logprobs.py). A training step is the policy's
forward and backward (backward = 2 forwards when every weight trains, 1 when only inputs need
gradients: LoRA, freeze), plus one forward of a reference computed during training. Work
repeated by activation checkpointing is not counted, and padding is not useful work: padding
shows up as a lower figure. On a machine shared with other jobs the start-up rate is whatever the
load allowed at that moment, so the figure moves with the load (and can exceed 1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from prefalign.contracts import IGNORE_INDEX, SEGMENT_PAD, SEGMENT_REJECTED, SEGMENT_SHARED, BatchLayout, batch_layout

COUNTS = ("tokens", "positions", "attended", "scored")
_rates: dict[tuple[str, torch.dtype], float] = {}


def _causal(lengths: torch.Tensor) -> torch.Tensor:
    lengths = lengths.double()
    return (lengths * (lengths + 1) / 2).sum()


def batch_counts(batch: dict) -> dict[str, float]:
    """The four counts of the module docstring for one batch."""
    labels = batch["labels"]
    counts = {"positions": float(labels.numel()), "scored": float((labels[:, 1:] != IGNORE_INDEX).sum())}
    layout = batch_layout(batch)
    if layout is BatchLayout.PACKED:
        spans = batch["spans"].double()
        q, p = spans[:, 2] - spans[:, 1], spans[:, 4] - spans[:, 3]
        counts["tokens"] = float((batch["pair_ids"] >= 0).sum())
        counts["attended"] = float(_causal(q) + (q * p).sum())
    elif layout is BatchLayout.PREFIX_SHARED:  # the rejected reply attends to the prompt and itself
        segments = batch["segment_ids"]
        shared = (segments == SEGMENT_SHARED).sum(1).double()
        rejected_start = ((segments != SEGMENT_PAD) & (segments != SEGMENT_REJECTED)).sum(1)
        rejected = (segments == SEGMENT_REJECTED).sum(1).double()
        counts["tokens"] = float((segments != SEGMENT_PAD).sum())
        counts["attended"] = float(_causal(rejected_start) + _causal(rejected) + (rejected * shared).sum())
    else:
        lengths = batch["attention_mask"].sum(1)
        counts["tokens"] = float(lengths.sum())
        counts["attended"] = float(_causal(lengths))
    return counts


@dataclass
class ModelShape:
    """What the FLOP count reads of a causal LM."""

    decoder_params: int  # without the input embedding (a lookup, no FLOPs)
    layers: int
    query_width: int  # heads x head dim
    hidden: int
    vocab: int

    @classmethod
    def of(cls, model) -> "ModelShape":
        from prefalign.modeling.logprobs import causal_lm

        lm = causal_lm(model)
        config = lm.config.get_text_config()
        embedding = lm.get_input_embeddings().weight
        decoder = lm.get_decoder()
        params = sum(p.numel() for p in decoder.parameters() if p is not embedding)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(params, config.num_hidden_layers, heads * head_dim, config.hidden_size, config.vocab_size)

    def forward_flops(self, counts: dict[str, float]) -> float:
        return (2.0 * self.decoder_params * counts["tokens"] + 4.0 * self.layers * self.query_width * counts["attended"]
                + 2.0 * self.hidden * self.vocab * counts["scored"])


def forward_passes(*, backward: bool, trains_weights: bool, live_reference: bool) -> float:
    """Forwards' worth of FLOPs per batch (module docstring): the policy's forward, its backward when
    training (2 forwards when every weight trains, 1 when only inputs need gradients), and a forward
    of a reference computed now rather than precomputed."""
    policy = 1.0 + ((2.0 if trains_weights else 1.0) if backward else 0.0)
    return policy + (1.0 if live_reference else 0.0)


def matmul_rate(device, dtype: torch.dtype = torch.float32, size: int | None = None) -> float:
    """FLOP/s of a square matmul on `device` in `dtype` (1024 on a CPU: 10-50 ms; 8192 on a GPU): best
    of 2, measured once per process."""
    device = torch.device(device)
    size = size or (1024 if device.type == "cpu" else 8192)
    key = (str(device), dtype)
    if key not in _rates:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        best = float("inf")
        for _ in range(3):  # the first is a warm-up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        _rates[key] = 2.0 * size ** 3 / best
    return _rates[key]


class ThroughputMeter:
    """Counts since the last report, and the time since the first batch of them.

    `passes`: forwards' worth of FLOPs per batch (module docstring), e.g. 3 + 1 for full tuning
    against a live reference. `report` returns tokens/s, padding fraction and the MFU-style figure,
    from counts already summed over `processes` (each with its own device of rate `peak`).
    """

    def __init__(self, shape: ModelShape, passes: float, peak: float):
        self.shape, self.passes, self.peak = shape, passes, peak
        self.counts = dict.fromkeys(COUNTS, 0.0)
        self.start: float | None = None

    def add(self, batch: dict) -> None:
        if self.start is None:
            self.start = time.perf_counter()
        for key, value in batch_counts(batch).items():
            self.counts[key] += value

    def totals(self) -> torch.Tensor:
        return torch.tensor([self.counts[k] for k in COUNTS], dtype=torch.float64)

    def report(self, totals: torch.Tensor | None = None, processes: int = 1) -> dict[str, float]:
        """The three figures, then a fresh interval; {} when no batch was counted."""
        if self.start is None:
            return {}
        counts = dict(zip(COUNTS, (totals if totals is not None else self.totals()).tolist()))
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.counts, self.start = dict.fromkeys(COUNTS, 0.0), None
        flops = self.passes * self.shape.forward_flops(counts)
        return {
            "throughput/tokens_per_second": counts["tokens"] / elapsed,
            "throughput/padding_fraction": 1.0 - counts["tokens"] / max(counts["positions"], 1.0),
            "throughput/mfu": flops / elapsed / (self.peak * processes),
        }
