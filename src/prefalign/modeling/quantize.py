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


def pin_8bit_kernels(model) -> None:
    """Make bitsandbytes' 8-bit layers compute the same way in training and in eval mode.

    On the CPU, `Linear8bitLt` picks its matmul by `module.training`: in training it multiplies by
    the dequantized weights, in eval mode it also quantizes the activations to int8. The policy
    trains in training mode and the reference reads the same base in eval mode (no dropout), so the
    two would score the same weights differently (a step-0 DPO loss 4e-5 off ln 2 on a tiny model)
    and `prefalign eval` would not score as training did. A pre-forward hook keeps each such layer
    on the dequantized kernel, which is also the more exact one. On a GPU both modes take the same
    int8 kernel, and those layers are left alone.
    """
    if not is_quantized(model):
        return
    try:
        from bitsandbytes.nn import Linear8bitLt
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear8bitLt) and module.weight.device.type in ("cpu", "xpu"):
            module.register_forward_pre_hook(_dequantized_kernel)


def _dequantized_kernel(module, _args) -> None:
    module.training = True  # read by Linear8bitLt.forward only to pick its kernel; it has no dropout


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(getattr(model, "config", None),
                                                                  "quantization_config", None))
