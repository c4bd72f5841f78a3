"""The settings that make a model fit: DeepSpeed ZeRO, FSDP and quantized (QLoRA) loading.

`problems` holds every check that spans them, so an impossible combination is one config error
naming both keys before anything is loaded; `zero_stage` reads the ZeRO stage of a `deepspeed:`
value (a JSON file or a mapping).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

EXTRAS = {"deepspeed": "deepspeed", "bitsandbytes": "qlora"}  # package -> the prefalign extra installing it


def _missing(package: str) -> str | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        spec = None
    if spec is None:
        return f'needs the {package} package, which is not installed; pip install "prefalign[{EXTRAS[package]}]"'
    return None


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
    if train.get("deepspeed"):
        if (reason := _missing("deepspeed")):
            found.append(f"deepspeed: {reason}")
        try:
            stage = zero_stage(train["deepspeed"])
        except (ValueError, TypeError) as exc:
            return found + [f"deepspeed: {exc}"]
        if stage == 3:
            found += [f"deepspeed: ZeRO-3 partitions weights, which {key} (bitsandbytes) quantized weights cannot be; "
                      f"use ZeRO-2 (or ZeRO-0) with {key}, or remove {key}" for key in quantized]
        if train.get("fsdp"):
            found.append("deepspeed and fsdp both given: shard the model with one of them; remove the other")
    return found
