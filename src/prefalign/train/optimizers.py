"""The optimizers of LLaMA-Factory's keys, each built as LLaMA-Factory 0.9.5 builds it (train/trainer_utils.py):
GaLore (galore-torch) and APOLLO (apollo-torch) on the same three parameter groups, Muon (torch.optim.Muon)
with AdamW for what Muon does not take, Adam-mini (adam-mini) and BAdam (badam's BlockOptimizer /
BlockOptimizerRatio). The packages are imported when used."""

from __future__ import annotations

import torch

from prefalign.errors import PrefalignError

# GaLore / APOLLO: the optimizer group key -> the FinetuningArguments field after the method's prefix
_PROJECTION = {
    "galore": {"rank": "rank", "update_proj_gap": "update_interval", "scale": "scale", "proj_type": "proj_type"},
    "apollo": {"rank": "rank", "proj": "proj", "proj_type": "proj_type", "update_proj_gap": "update_interval",
               "scale": "scale", "scale_type": "scale_type", "scale_front": "scale_front"},
}


def galore_targets(model, names: list[str]) -> list[str]:
    """`galore_target` / `apollo_target`: the names given, or for `all` every linear module's name but the
    output head's."""
    if names != ["all"]:
        return list(names)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.split(".")[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})


def projected_parameter_groups(model, ft, method: str, weight_decay: float, decay_names: list[str]) -> list[dict]:
    """LLaMA-Factory's three groups for GaLore and APOLLO (`method`: galore or apollo): trainable parameters
    outside the projection without and with weight decay, then the 2-D weights of the targeted linear modules
    with weight decay and the method's projection settings (its `<method>_*` keys)."""
    target_key = f"{method}_target"
    targets = galore_targets(model, list(getattr(ft, target_key)))
    projected = [param for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and any(t in name for t in targets)
                 for param in module.parameters() if param.requires_grad and param.dim() > 1]
    if not projected:
        raise PrefalignError(f"{target_key}: {','.join(getattr(ft, target_key))} matches no trainable linear weight; "
                             "name linear modules of the model (e.g. q_proj,v_proj) or use all")
    ids = {id(p) for p in projected}
    rest = [(name, p) for name, p in model.named_parameters() if p.requires_grad and id(p) not in ids]
    settings = {key: getattr(ft, f"{method}_{field}") for key, field in _PROJECTION[method].items()}
    return [
        {"params": [p for name, p in rest if name not in decay_names], "weight_decay": 0.0},
        {"params": [p for name, p in rest if name in decay_names], "weight_decay": weight_decay},
        {"params": projected, "weight_decay": weight_decay, **settings},
    ]


class MuonWithAdamW(torch.optim.Optimizer):
    """LLaMA-Factory's Muon: torch.optim.Muon (Newton-Schulz orthogonalised Nesterov momentum, the step scaled by
    0.2·sqrt(max(rows, cols)) so its RMS matches AdamW's) for the 2-D weights but embeddings and the output head,
    torch's AdamW for the rest; one optimizer to the Trainer (its groups are the two optimizers' groups, its state
    theirs), so the scheduler and checkpoints see every group."""

    def __init__(self, muon_params, adamw_params, *, lr: float, weight_decay: float, betas, eps: float):
        self.parts = [torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"),
                      torch.optim.AdamW(adamw_params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)]
        super().__init__([g for part in self.parts for g in part.param_groups], {})
        self._share()

    def _share(self):
        """Point the parts at this optimizer's groups and state (after construction and after a load)."""
        first = len(self.parts[0].param_groups)
        self.parts[0].param_groups, self.parts[1].param_groups = self.param_groups[:first], self.param_groups[first:]
        for part in self.parts:
            part.state = self.state

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss


def muon_parameters(model) -> tuple[list, list]:
    """LLaMA-Factory's split: (Muon's: trainable 2-D parameters not named embed or lm_head, AdamW's: the rest)."""
    muon, adamw = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (muon if param.ndim == 2 and "embed" not in name and "lm_head" not in name else adamw).append(param)
    return muon, adamw


def custom_optimizer(model, ft, args, decay_names: list[str], optimizer_kwargs: dict) -> torch.optim.Optimizer | None:
    """The optimizer a LLaMA-Factory optimizer key asks for, or None for the Trainer's own (config/scale.py
    checked the package, `optim` and DeepSpeed). `optimizer_kwargs`: the Trainer's for its `optim` (lr, betas, eps)."""
    adamw = {k: v for k, v in optimizer_kwargs.items() if k in ("lr", "betas", "eps")}
    for method, package, cls in (("galore", "galore_torch", "GaLoreAdamW"), ("apollo", "apollo_torch", "APOLLOAdamW")):
        if getattr(ft, f"use_{method}"):
            optimizer_cls = getattr(_package(package, f"use_{method}"), cls)
            groups = projected_parameter_groups(model, ft, method, args.weight_decay, decay_names)
            if getattr(ft, f"{method}_layerwise"):
                return layerwise_optimizer(optimizer_cls, groups, adamw, f"{method}_layerwise")
            return optimizer_cls(groups, **adamw)
    if ft.use_muon:
        muon, rest = muon_parameters(model)
        return MuonWithAdamW(muon, rest, lr=args.learning_rate, weight_decay=args.weight_decay,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if ft.use_badam:
        return badam_optimizer(model, ft, args, decay_names, optimizer_kwargs)
    if ft.use_adam_mini:
        from transformers.integrations import is_deepspeed_zero3_enabled

        config = model.config
        return _package("adam_mini", "use_adam_mini").Adam_mini(
            named_parameters=model.named_parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon, weight_decay=args.weight_decay,
            model_sharding=bool(args.fsdp) or is_deepspeed_zero3_enabled(), dim=getattr(config, "hidden_size", None),
            n_heads=getattr(config, "num_attention_heads", None), n_kv_heads=getattr(config, "num_key_value_heads", None),
            verbose=False)
    return None


def layerwise_optimizer(optimizer_cls, groups: list[dict], kwargs: dict, key: str) -> torch.optim.Optimizer:
    """LLaMA-Factory's layer-wise GaLore / APOLLO: one `optimizer_cls` per parameter (its group's settings), stepped
    and zeroed from the parameter's post-accumulate-grad hook, so only one parameter's gradient lives at a time;
    the Trainer gets transformers' LayerWiseDummyOptimizer, from which its get_scheduler builds one scheduler per
    parameter, stepped from the same hook. Hence no gradient accumulation and no clipping (the Trainer sees the
    gradients already zeroed; config/scale.py refuses accumulation), and one process (the hooks step before any
    all-reduce)."""
    from transformers.trainer_pt_utils import LayerWiseDummyOptimizer

    from prefalign.distributed import world_size

    if world_size() > 1:
        raise PrefalignError(f"{key} with {world_size()} processes: the per-parameter steps run before the gradients "
                             f"are averaged across processes (LLaMA-Factory refuses it too); use one process or remove {key}")
    per_param = {param: optimizer_cls([{**group, "params": [param]}], **kwargs)
                 for group in groups for param in group["params"]}

    def step(param):
        if param.grad is not None:
            per_param[param].step()
            per_param[param].zero_grad()

    for param in per_param:
        param.register_post_accumulate_grad_hook(step)
    return LayerWiseDummyOptimizer(optimizer_dict=per_param, lr=kwargs.get("lr", 1e-3))


def badam_optimizer(model, ft, args, decay_names: list[str], optimizer_kwargs: dict) -> torch.optim.Optimizer:
    """LLaMA-Factory's BAdam: the trainable parameters in two groups (no decay, decay). Layer mode wraps the
    Trainer's optimizer on them in BlockOptimizer, which trains one decoder layer at a time (the blocks inferred
    from the parameter names, embeddings and head never trained) and moves on every `badam_switch_interval`
    steps; ratio mode is BlockOptimizerRatio's sparse AdamW on `badam_update_ratio` of every weight's entries.
    One process only: LF spreads layer-mode BAdam over processes only under DeepSpeed ZeRO-3, and prefalign does not
    run BAdam under DeepSpeed yet (config/scale.py refuses the pair)."""
    from prefalign.distributed import world_size

    if world_size() > 1:
        raise PrefalignError(f"use_badam with {world_size()} processes: prefalign runs BAdam in one process only "
                             "(LLaMA-Factory spreads layer-mode BAdam only under DeepSpeed ZeRO-3, which prefalign "
                             "does not run BAdam under yet); train in one process or remove use_badam")
    badam = _package("badam", "use_badam")
    named = list(model.named_parameters())
    trainable = [(name, p) for name, p in named if p.requires_grad]
    groups = [{"params": [p for name, p in trainable if name not in decay_names], "weight_decay": 0.0},
              {"params": [p for name, p in trainable if name in decay_names], "weight_decay": args.weight_decay}]
    if ft.badam_mode == "ratio":
        adamw = {k: v for k, v in optimizer_kwargs.items() if k in ("lr", "betas", "eps")}
        # it freezes the embeddings and the head (LF's include_embedding=False); a tied head has no parameter of
        # its own to freeze, which BlockOptimizerRatio would fail on: include_lm_head then leaves nothing out
        tied = not any("lm_head" in name for name, _ in named)
        return badam.BlockOptimizerRatio(param_groups=groups, named_parameters_list=named,
                                         update_ratio=ft.badam_update_ratio, mask_mode=ft.badam_mask_mode,
                                         verbose=ft.badam_verbose, include_embedding=False, include_lm_head=tied,
                                         **adamw)
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return badam.BlockOptimizer(base_optimizer=optimizer_cls(groups, **kwargs), named_parameters_list=named,
                                block_prefix_list=None, switch_block_every=ft.badam_switch_interval,
                                start_block=ft.badam_start_block, switch_mode=ft.badam_switch_mode,
                                verbose=ft.badam_verbose)


def _package(name: str, key: str):
    """The optimizer's package, imported now (config/scale.py checked it is installed; this is for direct callers)."""
    import importlib

    from prefalign.config.scale import EXTRAS

    try:
        return importlib.import_module(name)
    except ImportError:
        raise PrefalignError(f'{key} needs the {name} package: pip install "prefalign[{EXTRAS[name]}]"') from None
