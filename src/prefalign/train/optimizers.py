"""The optimizers of LLaMA-Factory's keys that a PyPI package provides: GaLore (galore-torch), built with
LLaMA-Factory 0.9.5's parameter groups (train/trainer_utils.py)."""

from __future__ import annotations

import torch

from prefalign.errors import PrefalignError

def galore_targets(model, names: list[str]) -> list[str]:
    """`galore_target`: the names given, or for `all` every linear module's name but the output head's."""
    if names != ["all"]:
        return list(names)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.split(".")[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})


def galore_parameter_groups(model, ft, weight_decay: float, decay_names: list[str]) -> list[dict]:
    """LLaMA-Factory's three groups: trainable non-GaLore parameters without and with weight decay, then the
    2-D weights of the targeted linear modules with weight decay and GaLore's projection settings."""
    targets = galore_targets(model, list(ft.galore_target))
    projected = [param for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and any(t in name for t in targets)
                 for param in module.parameters() if param.requires_grad and param.dim() > 1]
    if not projected:
        raise PrefalignError(f"galore_target: {','.join(ft.galore_target)} matches no trainable linear weight; name "
                             "linear modules of the model (e.g. q_proj,v_proj) or use all")
    ids = {id(p) for p in projected}
    rest = [(name, p) for name, p in model.named_parameters() if p.requires_grad and id(p) not in ids]
    return [
        {"params": [p for name, p in rest if name not in decay_names], "weight_decay": 0.0},
        {"params": [p for name, p in rest if name in decay_names], "weight_decay": weight_decay},
        {"params": projected, "weight_decay": weight_decay, "rank": ft.galore_rank,
         "update_proj_gap": ft.galore_update_interval, "scale": ft.galore_scale, "proj_type": ft.galore_proj_type},
    ]


def galore_optimizer(model, ft, args, decay_names: list[str], optimizer_kwargs: dict) -> torch.optim.Optimizer:
    """galore-torch's GaLoreAdamW over `galore_parameter_groups`, with the Trainer's AdamW settings
    (config/scale.py checked that `optim` is an AdamW)."""
    try:
        from galore_torch import GaLoreAdamW
    except ImportError:
        raise PrefalignError('use_galore needs the galore-torch package: pip install "prefalign[galore]"') from None
    kwargs = {k: v for k, v in optimizer_kwargs.items() if k in ("lr", "betas", "eps")}
    return GaLoreAdamW(galore_parameter_groups(model, ft, args.weight_decay, decay_names), **kwargs)
