"""The changes LLaMA-Factory makes to a model's config before loading it: RoPE scaling and the MoE router loss.

Each rule is a pure function of the loaded config and the arguments, so it is tested without a model;
`load.load_causal_lm` applies them to every model it loads (policy, reference, eval, chat, export).
"""

from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)

def scaled_rope(config, rope_scaling: str | None, model_max_length: int | None) -> dict | None:
    """The config changes RoPE scaling makes, as LLaMA-Factory 0.9.5 computes them (model_utils/rope.py),
    or None when nothing changes.

    The factor is ceil(model_max_length / the model's trained length), the trained length being
    `original_max_position_embeddings` of an existing scaling, else `max_position_embeddings`;
    `max_position_embeddings` grows by the factor. A model_max_length the model already reaches needs
    no scaling (a warning says so, as LF); none given (chat / eval without one, as LF's inference) scales by 2.
    dynamic / yarn / llama3 also record the trained length
    (llama3: with LF's frequency factors 1 and 4). Returns {"rope_parameters": ..., "max_position_embeddings": ...}
    with the model's own rope_theta kept (transformers 5 holds both in `rope_parameters`).
    """
    if rope_scaling is None:
        return None
    current = getattr(config, "rope_parameters", None)
    if not isinstance(current, dict) or "rope_theta" not in current:
        logger.warning("rope_scaling: %s has no single set of RoPE parameters; rope_scaling is ignored",
                       type(config).__name__)
        return None
    old_max = current.get("original_max_position_embeddings") or getattr(config, "max_position_embeddings", None)
    if not old_max:
        logger.warning("rope_scaling: the model config has no max_position_embeddings; rope_scaling is ignored")
        return None
    if model_max_length is not None and model_max_length <= old_max:
        logger.warning("rope_scaling: model_max_length %s is within the model's %d positions; RoPE is not scaled",
                       model_max_length, old_max)
        return None
    # at inference without a model_max_length (config/loader.py), LF scales by 2
    factor = 2.0 if model_max_length is None else float(math.ceil(model_max_length / old_max))
    params = {"rope_type": rope_scaling, "factor": factor, "rope_theta": current["rope_theta"]}
    if rope_scaling in ("dynamic", "yarn", "llama3"):
        params["original_max_position_embeddings"] = old_max
    if rope_scaling == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0)
    logger.info("rope_scaling: %s, factor %g: max positions %d -> %d", rope_scaling, factor, old_max, int(old_max * factor))
    return {"rope_parameters": params, "max_position_embeddings": int(old_max * factor)}


# LLaMA-Factory 0.9.5's list (model_utils/moe.py) of the models whose causal LM adds
# router_aux_loss_coef x its load-balancing loss (dbrx, jetmoe: other coefficient names, not here).
ROUTER_LOSS_MODELS = ("ernie4_5_moe", "granitemoe", "jamba", "llama4", "mixtral", "olmoe", "phimoe", "qwen2_moe",
                      "qwen3_moe")


def router_loss(config, moe_aux_loss_coef: float | None, trainable: bool) -> dict | None:
    """The config changes of `moe_aux_loss_coef` on a model being trained (None: no change): router logits out,
    and the coefficient of their load-balancing loss. A model that is not one of ROUTER_LOSS_MODELS: a warning."""
    if not moe_aux_loss_coef or not trainable:
        return None
    model_type = getattr(config, "model_type", None)
    if model_type not in ROUTER_LOSS_MODELS:
        logger.warning("moe_aux_loss_coef: %s is not a mixture-of-experts model with a router loss (%s); "
                       "moe_aux_loss_coef has no effect", model_type, ", ".join(ROUTER_LOSS_MODELS))
        return None
    return {"output_router_logits": True, "router_aux_loss_coef": float(moe_aux_loss_coef)}


def apply_model_config(config, model_args, *, trainable: bool = False) -> None:
    """Apply the rules above to `config` (a transformers `PretrainedConfig`, changed in place); `trainable`:
    the model is the policy being trained (the router loss applies to it alone)."""
    changes = {**(scaled_rope(config, model_args.rope_scaling, model_args.model_max_length) or {}),
               **(router_loss(config, model_args.moe_aux_loss_coef, trainable) or {})}
    for key, value in changes.items():
        setattr(config, key, value)
