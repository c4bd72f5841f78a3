"""DeepSpeed ZeRO-3 and the frozen models beside the policy (a frozen-copy or separate reference).

Under ZeRO-3 transformers loads every model partitioned (`deepspeed.zero.Init`): each process holds
a slice of each weight, and only a DeepSpeed engine's hooks gather the slices around a forward. The
Trainer wraps the policy in its engine; a frozen reference gets its own engine here, built from the
run's DeepSpeed config without optimizer or scheduler (`inference_config`), so it is partitioned
for inference and never seen by an optimizer. A `copy.deepcopy` of a partitioned policy would copy
empty slices (the "'weight' must be 2-D" failure), so a frozen copy is loaded again instead.

Adapters are merged into a frozen model before it is partitioned (merging reads whole weights), so
such a model is loaded whole (`loaded_whole`) and partitioned by its engine.
"""

from __future__ import annotations

import contextlib
import copy


def zero3_enabled() -> bool:
    """True while a ZeRO-3 DeepSpeed config is active (set by the training arguments)."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()


@contextlib.contextmanager
def loaded_whole():
    """Models loaded inside are not partitioned at load (ZeRO-3 is switched off for the duration)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


def inference_config(train_config: dict, hidden_size: int | None) -> dict:
    """The run's DeepSpeed config for a frozen model: same ZeRO stage and offload, no optimizer.

    Values transformers fills from the model at `deepspeed.initialize` time ("auto" bucket sizes)
    are filled here the same way, from `hidden_size`.
    """
    config = copy.deepcopy(train_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    autos = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
             "stage3_param_persistence_threshold": lambda h: 10 * h}
    for key, fill in autos.items():
        if zero.get(key) == "auto":
            if hidden_size:
                zero[key] = fill(hidden_size)
            else:
                zero.pop(key)
    return config


def partition_for_inference(model):
    """Wrap a frozen model loaded under ZeRO-3 in a DeepSpeed inference engine; return the module.

    The engine's hooks stay on the module: calling it gathers each layer's weights for its forward
    and frees them after, so the frozen model costs 1/world_size of its memory between forwards.
    """
    import deepspeed
    from transformers.integrations.deepspeed import deepspeed_config

    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    engine, *_ = deepspeed.initialize(model=model, config=inference_config(deepspeed_config(), hidden))
    engine.module.eval()
    return engine.module


# glibc's M_MMAP_THRESHOLD (malloc.h); blocks at least this large are mapped, and unmapped when freed
_M_MMAP_THRESHOLD, _GATHER_BLOCK = -3, 256 << 10


def return_gathered_memory_on_cpu() -> bool:
    """Under ZeRO-3 on the CPU, make the host memory of released gathers go back to the system.

    Every forward and backward gathers each layer's weights into new host memory and frees it after
    use (and each backward, the gradients' partitions). glibc serves blocks below its mmap threshold
    from its heap, where freed blocks stay in the process, and raises that threshold (up to 32 MiB)
    each time a mapped block is freed: after the first release, every gather comes from the heap.
    Measured on a 220M model, 2 processes (benchmarks/RESULTS.md), that kept ~1.5 GB per process
    resident, about as much as ZeRO-3 saves. A fixed threshold of 256 KiB (setting it also stops
    glibc raising it) maps those blocks and unmaps them when released, for ~10-15 % more step time
    on that path. Left as it is on a GPU (gathers go to CUDA memory), off glibc, and when the user
    set `MALLOC_MMAP_THRESHOLD_`. Returns whether it set the threshold.
    """
    import ctypes
    import os
    import platform

    import torch

    if not zero3_enabled() or torch.cuda.is_available() or "MALLOC_MMAP_THRESHOLD_" in os.environ \
            or platform.libc_ver()[0] != "glibc":
        return False
    return ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _GATHER_BLOCK) == 1


def gathered(param):
    """A whole copy of a partitioned parameter (for fingerprinting the reference's weights)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().clone()
