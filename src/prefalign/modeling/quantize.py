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


def pin_cpu_kernels(model) -> None:
    """Make bitsandbytes' quantized layers compute the same way in training and in eval mode, on every CPU.

    On the CPU, bitsandbytes picks a layer's kernel by the layer's mode and by the CPU:
      - `Linear8bitLt`: in training it multiplies by the dequantized weights, in eval mode it also
        quantizes the activations to int8. The policy trains in training mode and the reference reads
        the same base in eval mode, so the two would score the same weights differently (a step-0 DPO
        loss 4e-5 off ln 2 on a tiny model) and `prefalign eval` would not score as training did. A
        pre-forward hook keeps each such layer on the dequantized kernel, the more exact one.
      - `Linear4bit`: on a CPU with AVX512-BF16, the first eval-mode forward without gradients (the
        reference's) repacks the weights in place for an AVX512 kernel and stores the block scales in
        bf16; saving a checkpoint unpacks them again. So the kernel, and the numbers, of every later
        training step depend on whether a save or a reference pass came last: a resumed run did not
        end on the uninterrupted run's weights (1.4e-3 apart), results differed between CPU kinds, and
        the repack refuses layers whose input size is not a multiple of its 64-wide block. Every
        `Linear4bit` is kept on bitsandbytes' portable kernel, which every CPU runs alike.
    On a GPU both modes take the same kernels, and the layers are left alone.
    """
    if not is_quantized(model):
        return
    try:
        from bitsandbytes.nn import Linear4bit, Linear8bitLt
    except ImportError:
        return
    for module in model.modules():
        weight = getattr(module, "weight", None)
        on_cpu = weight is not None and weight.device.type in ("cpu", "xpu")
        if isinstance(module, Linear8bitLt) and on_cpu:
            module.register_forward_pre_hook(_dequantized_kernel)
        elif isinstance(module, Linear4bit) and on_cpu:
            module.support_avx512bf16_for_cpu = False  # read by Linear4bit.forward only to choose the repack


def _dequantized_kernel(module, _args) -> None:
    module.training = True  # read by Linear8bitLt.forward only to pick its kernel; it has no dropout


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(getattr(model, "config", None),
                                                                  "quantization_config", None))
