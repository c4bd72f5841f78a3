"""Which batch layout a run uses: the fastest exact one the model takes, unless the config chooses.

`packing` and `prefix_sharing` default to null, "where the model allows": a run packs its pairs
(no padding computed) and shares each pair's prompt between its two replies (the prompt computed
once) whenever the loaded model's attention can run that layout, because both give the same
log-probs as the plain concatenated layout (tests/test_packing.py, tests/test_prefix_sharing.py)
in less time and memory. Where the model cannot, the layout falls back and one log line says why.
A value the config writes is kept as written, except a `true` the model's attention cannot run
(`unsupported`), refused here in one line: this is the one check of those model facts, and the
layouts' own code (modeling/packed_attention.py, modeling/prefix.py) only asserts it was made.

    packing   prefix_sharing   layout (data/collate.make_collator)
    true      true             one packed row per micro-batch, prompt once per pair
    true      false            one packed row per micro-batch, both replies with their prompt
    false     true             one row per pair: prompt, then chosen, then rejected (dense mask)
    false     false            the plain layout: rows prompt+chosen, then rows prompt+rejected
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prefalign.data.collate import make_collator
from prefalign.errors import ConfigError
from prefalign.modeling.packed_attention import FLASH_ATTENTION, PACKED_ATTENTION
from prefalign.modeling.vision import composite, is_vision_language

logger = logging.getLogger(__name__)

_MASKED = (None, "sdpa", "eager", PACKED_ATTENTION)  # the implementations that take prefalign's masks and spans


@dataclass(frozen=True)
class Layout:
    packing: bool
    prefix_sharing: bool
    notes: tuple[str, ...] = ()  # why an automatic choice is off, one phrase each

    def describe(self) -> str:
        on = [name for name, value in (("packing", self.packing), ("prefix sharing", self.prefix_sharing)) if value]
        text = " + ".join(on) if on else "plain (no packing, no prefix sharing)"
        return text + "".join(f"; {note}" for note in self.notes)


def unsupported(model_config, *, sharing_prompt: bool, cutoff_len: int) -> str | None:
    """Why `model_config`'s attention cannot run packed (or, with `sharing_prompt`, prefix-shared)
    batches of sequences up to `cutoff_len` tokens, in a phrase; None when it can. A setting of
    `true` is refused for this reason, not only left off by default."""
    if is_vision_language(model_config):
        parts = composite(model_config)
        if parts is None:
            return f"prefalign does not know where the image inputs of a {model_config.model_type} model go in a " \
                   "packed or prefix-shared row"
        if parts.plain_only:
            return parts.plain_only
    if getattr(model_config, "attn_logit_softcapping", None) is not None:
        return "the model soft-caps its attention scores"
    window = getattr(model_config, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(model_config, "layer_types", None) or ()) or (
        window and getattr(model_config, "use_sliding_window", True))
    if sliding and not (window and cutoff_len <= window):  # a sequence within the window never slides
        return f"the model's sliding-window attention ({window} tokens) is shorter than cutoff_len {cutoff_len}"
    implementation = getattr(model_config, "_attn_implementation", None)
    if implementation in FLASH_ATTENTION:
        return f"attn_implementation={implementation} cannot share a prompt between two replies" \
            if sharing_prompt else None
    if implementation not in _MASKED:
        return f"attn_implementation={implementation} takes no custom mask"
    return None


def choose_layout(finetuning, data, *models) -> Layout:
    """The layout a run with `finetuning` (its `packing` / `prefix_sharing`) and DataArguments `data`
    uses to score batches of sequences up to `data.cutoff_len` tokens with every one of `models` (the
    policy, and a separate reference model; None entries are skipped).

    A `true` that `unsupported` gives a reason against for one of them is a ConfigError. A null
    setting is on unless `unsupported` gives a reason, or a reason holds only for the default: a
    model's code is its own (`trust_remote_code`; prefalign cannot know that it hands the packed
    spans to its attention), or its router's auxiliary loss counts the tokens as laid out.
    """
    configs = [(_base(model).__class__.__module__, model.config) for model in models if model is not None]
    notes = []

    def auto(key: str, value, sharing_prompt: bool) -> bool:
        refused = next(filter(None, (unsupported(config, sharing_prompt=sharing_prompt, cutoff_len=data.cutoff_len)
                                     for _, config in configs)), None)
        if value and refused:
            raise ConfigError(f"{key}: true, but {refused}; set {key}: false (or null: the fastest layout the model allows)")
        if value is not None:
            return bool(value)
        if refused:
            notes.append(f"{key} off: {refused}")
            return False
        reason = next(filter(None, map(_not_by_default, configs)), None)
        if reason:
            notes.append(f"{key} off: {reason} (set {key}: true to use it anyway)")
        return reason is None

    packing = auto("packing", finetuning.packing, False)
    sharing = auto("prefix_sharing", finetuning.prefix_sharing, True)
    layout = Layout(packing, sharing, tuple(notes))
    logger.info("Batch layout: %s", layout.describe())
    return layout


def run_layout(finetuning, data, pad_token_id: int, *models, vision=None):
    """(Layout, collator) of a run: `choose_layout`'s layout and the collator that builds its batches,
    which training, precomputing the reference and eval share; `vision` (data/vision.VisionProcessor) for
    a vision-language template's image inputs."""
    layout = choose_layout(finetuning, data, *models)
    return layout, make_collator(pad_token_id, prefix_sharing=layout.prefix_sharing, packing=layout.packing,
                                 packing_length=finetuning.packing_length, vision=vision)


def _not_by_default(module_and_config) -> str | None:
    """Why a model that can run the fast layouts does not get them by default, in a phrase; None when it does."""
    module, config = module_and_config
    if not module.startswith("transformers."):
        return "the model runs its own code (trust_remote_code)"
    if getattr(config, "output_router_logits", False):  # moe_aux_loss_coef (modeling/model_config.py)
        return "the router's auxiliary loss counts the batch's tokens as they are laid out"
    return None


def _base(model):
    """The transformers model under a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
