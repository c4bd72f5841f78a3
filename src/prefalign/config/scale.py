"""The settings that make a model fit: DeepSpeed ZeRO, FSDP and quantized (QLoRA) loading.

`problems` holds every check that spans them, so an impossible combination is one config error
naming both keys before anything is loaded; `zero_stage` reads the ZeRO stage of a `deepspeed:`
value (a JSON file or a mapping).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

EXTRAS = {"deepspeed": "deepspeed", "bitsandbytes": "qlora", "galore_torch": "galore", "apollo_torch": "apollo",
          "adam_mini": "adam_mini", "badam": "badam"}  # package -> the prefalign extra installing it
# the optional packages an optimizer package imports when it is imported (galore_torch and apollo_torch import
# their 8-bit AdamW, which imports bitsandbytes)
_IMPORTS = {"galore_torch": {"bitsandbytes"}, "apollo_torch": {"bitsandbytes"}}


def _missing(package: str) -> str | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        spec = None
    if spec is None:
        return f'needs the {package} package, which is not installed; pip install "prefalign[{EXTRAS[package]}]"'
    return None


def engines_used(values: dict) -> set[str]:
    """The optional packages (EXTRAS) a config's raw `values` may need; when unsure, the package counts as used.

    bitsandbytes: quantized loading (`quantization_bit`, `ref_model_quantization_bit`), an 8-bit or
    paged optimizer, or a model or `ref_model` that is not a local folder free of a quantization_config
    (a hub id or a pre-quantized checkpoint). deepspeed: a `deepspeed:` value, or accelerate told to use it.
    An optimizer's package (galore_torch, apollo_torch, adam_mini, badam): its key (`use_galore`, ...) given; with
    it the packages it imports (`_IMPORTS`).
    """
    import os

    used = {package for key, (_, package, *_) in _OPTIMIZERS.items() if package and values.get(key)}
    used |= {dependency for package in used for dependency in _IMPORTS.get(package, ())}
    if values.get("deepspeed") or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        used.add("deepspeed")
    optim = str(values.get("optim") or "")
    models = [values.get(k) for k in ("model_name_or_path", "ref_model") if values.get(k)]
    if (values.get("quantization_bit") or values.get("ref_model_quantization_bit") or "bnb" in optim
            or "8bit" in optim or "paged" in optim
            or not all(_unquantized(m, built_here=values.get("build_demo_model")) for m in models)):
        used.add("bitsandbytes")
    return used


def _unquantized(name, *, built_here) -> bool:
    """True for a local model folder whose config.json declares no quantization (or the demo model, to be built)."""
    config = Path(str(name)) / "config.json"
    if not config.is_file():
        return bool(built_here)  # else a hub id (or a typo, reported later): it may be pre-quantized
    try:
        return "quantization_config" not in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def hide_unused_engines(values: dict) -> list[str]:
    """Make the optional packages a config does not use look absent to the libraries that import them eagerly.

    peft imports bitsandbytes whenever it is installed (`peft.helpers`), and accelerate imports
    deepspeed while unwrapping any model; each import prints its own lines (bitsandbytes' kernel
    search on AVX512-BF16 CPUs, DeepSpeed's "Setting accelerator to CPU") and costs seconds. All of
    them (transformers, accelerate, peft) decide availability through the import system
    (`importlib.util.find_spec`, or `import` in a try), so a `None` in `sys.modules`, the import
    system's own "not importable" mark, hides a package from all three alike without patching them.
    It is only set before any of them is imported (some cache the answer), so one process keeps one
    answer; the CLI calls it once per process, with the command's config. Returns the names hidden.
    """
    import sys

    if any(name in sys.modules for name in ("transformers", "peft", "accelerate", *EXTRAS)):
        return []
    hidden = sorted(set(EXTRAS) - engines_used(values))
    for name in hidden:
        sys.modules[name] = None
    return hidden


def deepspeed_settings(value) -> dict:
    """The DeepSpeed config of a `deepspeed:` value: a mapping, or the path of a JSON file. Raises ValueError."""
    if isinstance(value, dict):
        return value
    path = Path(str(value))
    if not path.is_file():
        raise ValueError(f"{path} does not exist; give the path of a DeepSpeed JSON config (see examples/deepspeed)")
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} holds {type(settings).__name__}, not a mapping of DeepSpeed settings")
    return settings


def zero_stage(value) -> int:
    """The ZeRO stage (0-3) of a `deepspeed:` value (0 when it names none)."""
    return int((deepspeed_settings(value).get("zero_optimization") or {}).get("stage", 0))


def resolved_deepspeed(value) -> dict:
    """The `deepspeed:` value as the Trainer gets it: under ZeRO-3 the saved model is consolidated.

    Unless the config says otherwise, ZeRO-3 gathers the partitioned weights when the model is
    saved (`stage3_gather_16bit_weights_on_model_save`), so the output dir loads with
    `from_pretrained` like any other run's.
    """
    settings = json.loads(json.dumps(deepspeed_settings(value)))  # a copy
    zero = settings.get("zero_optimization") or {}
    if int(zero.get("stage", 0)) == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    return settings


def problems(model, ft, train: dict) -> list[str]:
    """Checks across quantization, DeepSpeed and FSDP settings and the packages they need; each
    names the keys and the fix (the values' own ranges are the argument groups' `problems()`)."""
    found = []
    quantized = [key for key, bits in (("quantization_bit", model.quantization_bit),
                                       ("ref_model_quantization_bit", ft.ref_model_quantization_bit))
                 if bits is not None]
    if quantized and (reason := _missing("bitsandbytes")):
        found.append(f"{quantized[0]}: {reason}")
    if model.quantization_bit is not None and ft.finetuning_type != "lora":
        why = ("prefalign trains adapters on quantized weights with LoRA only (QLoRA; LLaMA-Factory's quantized "
               "OFT is not here yet)" if ft.finetuning_type == "oft" else "quantized weights cannot be trained")
        found.append(f"quantization_bit with finetuning_type: {ft.finetuning_type}: {why}; use finetuning_type: "
                     "lora (QLoRA) or remove quantization_bit")
    if ft.pissa_init and quantized[:1] == ["quantization_bit"]:
        found.append("pissa_init with quantization_bit: PiSSA rewrites the base weights, which quantized weights "
                     "cannot be (LLaMA-Factory refuses the pair too); remove one of them")
    if ft.pissa_init and model.adapter_name_or_path and not ft.create_new_adapter:
        found.append("pissa_init with adapter_name_or_path: PiSSA initialises a new adapter, but training continues "
                     "the given one; set create_new_adapter: true (PiSSA on the merged adapter) or remove pissa_init")
    found += _optimizer_problems(ft, train)
    if ft.pure_bf16 and train.get("fp16"):
        found.append("pure_bf16 and fp16 both given: pure_bf16 trains in bf16; remove fp16")
    if train.get("deepspeed"):
        if (reason := _missing("deepspeed")):
            found.append(f"deepspeed: {reason}")
        try:
            stage = zero_stage(train["deepspeed"])
        except (ValueError, TypeError) as exc:
            return found + [f"deepspeed: {exc}"]
        if stage == 3 and ft.pissa_init:
            found.append("pissa_init with deepspeed ZeRO-3: the SVD needs whole weights (LLaMA-Factory refuses the "
                         "pair too); use ZeRO-2, or initialise PiSSA before training")
        if stage == 3 and ft.pure_bf16:
            found.append("pure_bf16 with deepspeed ZeRO-3: not supported (LLaMA-Factory refuses "
                         "the pair too); use ZeRO-2, or bf16: true instead of pure_bf16")
        if stage == 3:
            found += [f"deepspeed: ZeRO-3 partitions weights, which {key} (bitsandbytes) quantized weights cannot be; "
                      f"use ZeRO-2 (or ZeRO-0) with {key}, or remove {key}" for key in quantized]
        if train.get("fsdp"):
            found.append("deepspeed and fsdp both given: shard the model with one of them; remove the other")
    return found


# the LLaMA-Factory optimizer key -> (its name, the package it needs or None, its AdamW class where `optim` must be
# AdamW, what LLaMA-Factory 0.9.5 does with it under DeepSpeed)
_OPTIMIZERS = {"use_galore": ("GaLore", "galore_torch", "GaLoreAdamW", "refuses it too"),
               "use_apollo": ("APOLLO", "apollo_torch", "APOLLOAdamW", "refuses it too"),
               "use_muon": ("Muon", None, None, "hands its Muon to DeepSpeed as the client optimizer"),
               "use_adam_mini": ("Adam-mini", "adam_mini", None, "runs it with model_sharding under ZeRO-3"),
               "use_badam": ("BAdam", "badam", None, "runs layer-mode BAdam under ZeRO-3, the badam package "
                                                     "rebuilding DeepSpeed's partitions at each block switch")}


def _optimizer_problems(ft, train: dict) -> list[str]:
    """The optimizer keys against the training arguments: GaLore / APOLLO are AdamWs (`optim` an AdamW), and none
    of them runs under DeepSpeed here, which hands an optimizer flat shards instead of whole named weights (each
    message says what LLaMA-Factory does instead)."""
    from prefalign.config.args import GALORE_OPTIMS

    found = []
    for key, (name, package, cls, in_lf) in _OPTIMIZERS.items():
        if not getattr(ft, key):
            continue
        optim = str(train.get("optim", GALORE_OPTIMS[1]))
        if cls and optim not in GALORE_OPTIMS:
            found.append(f"{key} with optim: {optim}: prefalign's {name} is {cls}; set optim: adamw_torch")
        if train.get("deepspeed"):
            found.append(f"{key} with deepspeed: prefalign does not run {name} under DeepSpeed yet, whose flat shards "
                         f"are not the whole named weights {name} steps (LLaMA-Factory {in_lf}); remove deepspeed "
                         f"or {key}")
        if package and (reason := _missing(package)):
            found.append(f"{key}: {reason}")
    for method in ("galore", "apollo"):
        layerwise = f"{method}_layerwise"
        if getattr(ft, f"use_{method}") and getattr(ft, layerwise) and int(train.get("gradient_accumulation_steps", 1)) > 1:
            found.append(f"{layerwise} with gradient_accumulation_steps: {train['gradient_accumulation_steps']}: each "
                         "parameter steps as soon as its gradient is ready (LLaMA-Factory refuses accumulation too); "
                         f"set gradient_accumulation_steps: 1 or remove {layerwise}")
    return found
