"""Quantized loading (QLoRA): the bitsandbytes settings of `quantization_bit` and friends."""

from __future__ import annotations

import torch


def quantization_config(bits: int, model_args, dtype: torch.dtype):
    """A `BitsAndBytesConfig` for `bits` (4 or 8), computing in `dtype`."""
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type=model_args.quantization_type,
        bnb_4bit_use_double_quant=model_args.double_quantization,
    )


def device_map() -> dict:
    """Quantized weights are created on their device at load: this process's GPU, or the CPU."""
    import os

    if torch.cuda.is_available():
        return {"": torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))}
    return {"": "cpu"}


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(getattr(model, "config", None),
                                                                  "quantization_config", None))
