"""The data that flows between prefalign's modules (see docs/architecture.md).

    records --data/formats--> PreferencePair --data/encode--> EncodedPair --data/collate--> batch
    batch --modeling/logprobs--> PairLogps (policy, reference) --losses--> LossOutput
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

# A chat message: {"role": "system" | "user" | "assistant" | "tool", "content": str}, and for an
# assistant's tool call "tool_calls": [{"type": "function", "function": {"name", "arguments"}}]
# (a tool message may carry "name" / "tool_call_id").
Message = dict[str, Any]


@dataclass(frozen=True)
class RecordSource:
    """Where a record came from, for error messages: `file`, 0-based `index`, and 1-based `line` for JSONL."""

    file: str
    index: int
    line: int | None = None
    dataset: str | None = None

    def __str__(self) -> str:
        where = f"{self.file} record {self.index}"
        if self.line is not None:
            where += f" (line {self.line})"
        return where


@dataclass
class PreferencePair:
    """One preference: a prompt conversation and two assistant replies to it.

    `prompt` holds the conversation before the reply: an optional leading system message, then
    alternating user/assistant turns, ending with a user turn. `chosen` and `rejected` are the
    preferred and dispreferred assistant replies (plain text); a reply that calls tools has its calls
    in `chosen_calls` / `rejected_calls` (an assistant message's `tool_calls`: [{"type": "function",
    "function": {"name", "arguments"}}], its text, often empty, in chosen / rejected; None: no calls).
    `tools`: the tool definitions as a JSON list, each as the record writes it (bare or
    `{"type": "function", "function": {...}}`); `template_kwargs`: the record's own chat-template
    arguments (its `chat_template_kwargs` column).

    An unpaired example (KTO: one reply with a thumbs-up or thumbs-down) is the same record with
    `desirable` set (True or False; None for a preference pair): `chosen` is its reply, and
    `rejected` the reply of another example that serves as its KL completion (data/feedback.py).
    So a KTO example travels through rendering, encoding, batching, log-probs and the reference
    cache exactly as a pair does, the mismatched pair taking the rejected side.

    `images` / `videos`: the raw file bytes of each image / video of the prompt, in the order of
    their placeholders; the placeholders stay in the message text as LLaMA-Factory's `<image>` /
    `<video>` (data/media.py reads them and checks the counts; `open_image` decodes one).
    Empty for a text-only pair.
    """

    prompt: list[Message]
    chosen: str
    rejected: str
    source: RecordSource
    tools: str | None = None
    template_kwargs: dict | None = None
    desirable: bool | None = None
    images: tuple[bytes, ...] = ()
    videos: tuple[bytes, ...] = ()
    chosen_calls: list[dict] | None = None
    rejected_calls: list[dict] | None = None

    def reply_message(self, field: str) -> Message:
        """The `chosen` or `rejected` reply as an assistant message (with its tool calls, if any)."""
        calls = getattr(self, f"{field}_calls")
        return {"role": "assistant", "content": getattr(self, field), **({"tool_calls": calls} if calls else {})}


# An encoded pair is a plain dict (it lives in a `datasets.Dataset`) with these keys:
#   "prompt_ids":   list[int]  the rendered prompt, including the assistant header
#   "chosen_ids":   list[int]  the chosen reply, ending with the end-of-turn token
#   "rejected_ids": list[int]  the rejected reply, ending with the end-of-turn token
#   "index":        int        position of the pair in the loaded data (for eval output, caches)
#   "desirable":    bool       KTO examples only: the label (chosen_ids is the reply, rejected_ids the
#                              KL completion, another example's reply, after the same prompt)
#   "images":       list[bytes] pairs with images only: each image's file bytes, in placeholder order (the
#                              prompt_ids hold each image's tokens; the collator runs the image processor)
#   "videos":       list[bytes] likewise, each video's file bytes (the collator decodes and samples them)

VISION_INPUTS = ("pixel_values", "image_grid_thw", "mm_token_type_ids", "token_type_ids", "image_sizes",
                 "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
"""The batch keys a vision-language model's forward takes besides the ids (data/collate.py adds them)."""


# -- batches ---------------------------------------------------------------------------------------
IGNORE_INDEX = -100
"""The label of a position that is not scored (prompt and padding tokens)."""

# Segment ids of the prefix-shared layout: the prompt, the chosen reply, the rejected reply, padding.
SEGMENT_SHARED, SEGMENT_CHOSEN, SEGMENT_REJECTED, SEGMENT_PAD = 0, 1, 2, 3


class BatchLayout(str, enum.Enum):
    """How a batch of B pairs is laid out; every batch says it in `batch["layout"]` (data/collate.py).

    CONCATENATED:  `input_ids`, `attention_mask`, `labels` (2B, T): rows [0, B) prompt+chosen,
                   rows [B, 2B) prompt+rejected.
    PREFIX_SHARED: `input_ids`, `attention_mask`, `labels`, `segment_ids`, `position_ids` (B, T):
                   one packed row per pair, the prompt computed once (segments SEGMENT_*).
    PACKED:        the same keys (R, T) plus `pair_ids` (R, T) and `spans` (K, 5): the pairs'
                   sequences end to end in R rows, attention confined to each sequence by the
                   spans, padding only at row ends (data/packing.py).
    All carry `index` (B,), each pair's position in its dataset; batches of KTO examples carry
    `desirable` (B,) bool as well (the chosen side is the reply, the rejected side the KL completion).
    """

    CONCATENATED = "concatenated"
    PREFIX_SHARED = "prefix_shared"
    PACKED = "packed"


def batch_layout(batch: dict) -> BatchLayout:
    """The layout a batch declares; a batch that declares none was not built by a prefalign collator."""
    try:
        return BatchLayout(batch["layout"])
    except KeyError:
        raise ValueError("a batch must say its layout in batch['layout'] (a BatchLayout); "
                         "build batches with data/collate.py's collators") from None


def batch_to(batch: dict, device) -> dict:
    """`batch` with every tensor moved to `device` (the layout and other plain values kept)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class PairLogps:
    """Per-sequence log-probabilities of the responses of a batch of B pairs.

    `chosen` / `rejected`: summed log-probs of the response tokens, shape (B,).
    `chosen_tokens` / `rejected_tokens`: number of response tokens, shape (B,), float.
    `chosen_mean_logit` / `rejected_mean_logit`: mean logit over response tokens and vocabulary,
    shape (B,), detached, for the `logits/*` metrics; None where not computed.
    `extras`: per-token values some modifiers need (see modeling/logprobs.pair_logps).
    `router_aux_loss`: scalar, the MoE router's load-balancing loss x router_aux_loss_coef, for a model whose
    config asks for router logits (a training policy with moe_aux_loss_coef); None otherwise.
    `desirable`: (B,) bool for a batch of KTO examples (then `chosen` is each example's reply and
    `rejected` its KL completion's log-prob); None for pairs. Set by scoring.score_batch.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    chosen_mean_logit: torch.Tensor | None = None
    rejected_mean_logit: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    desirable: torch.Tensor | None = None
    router_aux_loss: torch.Tensor | None = None

    @property
    def chosen_avg(self) -> torch.Tensor:
        """Length-averaged chosen log-prob, shape (B,)."""
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_avg(self) -> torch.Tensor:
        """Length-averaged rejected log-prob, shape (B,)."""
        return self.rejected / self.rejected_tokens.clamp(min=1)

    @property
    def chosen_nll(self) -> torch.Tensor:
        """Mean per-token negative log-likelihood of the chosen response, shape (B,)."""
        return -self.chosen_avg


@dataclass
class LossOutput:
    """What a loss returns, per pair: `losses`, `chosen_rewards`, `rejected_rewards`, each shape (B,).

    `metrics` holds extra per-pair values (shape (B,)) logged as their batch mean, e.g. `sft_loss`.
    A NaN value means "not defined for this pair" and is left out of the mean: the rewards of a KTO
    loss are NaN on the other label's examples, so `rewards/chosen` is the mean over desirable ones.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
