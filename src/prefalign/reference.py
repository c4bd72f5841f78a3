"""The reference model's log-probabilities, behind one interface.

Strategies (chosen by `build_reference` from the config):
  none              reference-free losses (ORPO, SimPO): nothing is loaded or run
  adapter-disabled  LoRA: the policy with its adapter switched off; no second copy of the weights
  sft-adapter       LoRA on top of an SFT adapter: the frozen copy of that adapter (base + SFT)
  frozen-copy       full / freeze tuning: a frozen copy of the initial policy
  separate-model    `ref_model` (+ `ref_model_adapters`)
  precomputed       `precompute_ref_log_probs`: any of the above, run once over the data before
                    training and cached on disk (reference_cache.py); training looks the values up
                    by pair `index`, and the reference model is freed.
The reference never receives gradients: every strategy runs under `torch.no_grad()`, in eval mode
(no dropout), and owns no trainable parameter. Under DeepSpeed ZeRO-3 a frozen model (frozen copy,
separate model) is loaded partitioned and wrapped in its own inference engine (modeling/zero.py).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging

import torch

from prefalign.contracts import PairLogps
from prefalign.modeling.load import (
    REFERENCE_ADAPTER,
    _split_paths,
    load_causal_lm,
    merge_adapters,
)
from prefalign.modeling.logprobs import pair_logps
from prefalign.modeling.zero import loaded_whole, partition_for_inference, zero3_enabled

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _eval_mode(model):
    """Dropout off for the reference forward; the policy's train/eval mode is restored after."""
    was_training = model.training
    model.train(False)
    try:
        yield
    finally:
        model.train(was_training)


class Reference:
    """Computes reference `PairLogps` for a batch (or returns None for reference-free losses)."""

    name = "none"

    def __init__(self, chunk_size: int = 1024, token_level: bool = False):
        self.chunk_size = chunk_size
        self.token_level = token_level

    def _model_context(self):
        return contextlib.nullcontext()

    def _model(self):
        return None

    @property
    def model(self):
        """The module whose forward gives the reference log-probs (None for reference-free losses)."""
        return self._model()

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor], split: str = "train") -> PairLogps | None:
        """Reference log-probs of `batch` (from either collator); `split` matters to precomputed ones only."""
        model = self._model()
        if model is None:
            return None
        with self._model_context():
            return pair_logps(model, batch, chunk_size=self.chunk_size, token_level=self.token_level)

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The tensors that make this reference what it is (for the precompute cache key)."""
        model = self._model()
        return list(model.named_parameters()) if model is not None else []

    def release(self) -> None:
        """Free what only the reference needs, once its log-probs are precomputed."""

    def to(self, device) -> "Reference":
        return self


class _PolicyReference(Reference):
    """A reference computed by the LoRA policy itself, with its adapters switched for the forward."""

    def __init__(self, policy, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy

    def _model(self):
        return self.policy

    def named_weights(self):
        # the frozen weights (the base, and an SFT adapter's frozen copy); the trained adapter is not the reference
        return [(n, p) for n, p in self.policy.named_parameters() if not p.requires_grad]


class AdapterDisabledReference(_PolicyReference):
    """The LoRA policy with its adapter disabled: the base weights, shared with the policy."""

    name = "adapter-disabled"

    @contextlib.contextmanager
    def _model_context(self):
        with self.policy.disable_adapter(), _eval_mode(self.policy):
            yield


class AdapterSwitchReference(_PolicyReference):
    """LoRA trained from an SFT adapter: the reference is the frozen copy of that adapter."""

    name = "sft-adapter"

    @contextlib.contextmanager
    def _model_context(self):
        tuner = self.policy.base_model
        previous = tuner.active_adapter
        tuner.set_adapter(REFERENCE_ADAPTER)
        try:
            with _eval_mode(self.policy):
                yield
        finally:
            tuner.set_adapter(previous)  # also makes the trained adapter require grad again, the copy not


class FrozenModelReference(Reference):
    """A separate model in eval mode with no trainable parameter (a frozen copy, or `ref_model`)."""

    def __init__(self, model, name: str, *, partitioned: bool = False, **kwargs):
        super().__init__(**kwargs)
        self._frozen = model.eval().requires_grad_(False)
        self.name = name
        self.partitioned = partitioned  # a ZeRO-3 inference engine: DeepSpeed places its weights

    def _model(self):
        if self._frozen is None:
            raise RuntimeError(f"the {self.name} reference was released after its log-probs were precomputed")
        return self._frozen

    def named_weights(self):
        if not self.partitioned:
            return super().named_weights()
        from prefalign.modeling.zero import gathered

        return [(n, gathered(p)) for n, p in self._model().named_parameters()]

    def release(self) -> None:
        self._frozen = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def to(self, device):
        if self._frozen is not None and not self.partitioned:
            self._frozen.to(device)
        return self


class InitialPolicyReference(Reference):
    """full / freeze with `precompute_ref_log_probs`: the policy itself, before its first update.

    The frozen copy would only be read once, before training, when it still equals the policy;
    so no copy is made (one model's memory less at the peak). Valid only until training starts:
    `release` (called right after the precompute) makes any later use an error.
    """

    name = "frozen-copy"

    def __init__(self, policy, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy

    def _model(self):
        if self.policy is None:
            raise RuntimeError("the initial-policy reference is only valid before training; it was released")
        return self.policy

    def _model_context(self):
        return _eval_mode(self.policy)

    def release(self) -> None:
        self.policy = None


def build_reference(config, policy, *, needs_reference: bool, dtype: torch.dtype = torch.float32,
                    for_precompute: bool = False) -> Reference:
    """Pick the reference strategy for this run (see the module docstring).

    `for_precompute`: the reference is read once, before training (reference_cache.py), so full /
    freeze tuning reads the initial policy instead of making a frozen copy.
    """
    ft = config.finetuning
    kwargs = {"chunk_size": ft.logits_chunk_size, "token_level": ft.ld_alpha is not None}
    if not needs_reference:
        return Reference(**kwargs)
    if ft.ref_model:
        return _frozen_model(ft.ref_model, _split_paths(ft.ref_model_adapters), config, dtype, "separate-model",
                             quantization_bit=ft.ref_model_quantization_bit, **kwargs)
    # Under ZeRO-3 the policy's weights are partitioned and, before training, have no engine to
    # gather them: a reference read before training, or a frozen copy, is the initial policy loaded
    # again (model + every adapter merged, whatever the strategy) in its own inference engine.
    reload = zero3_enabled() and (for_precompute or ft.finetuning_type != "lora")
    if ft.finetuning_type == "lora":
        strategy = AdapterSwitchReference if REFERENCE_ADAPTER in getattr(policy, "peft_config", {}) \
            else AdapterDisabledReference
        if not reload:
            return strategy(policy, **kwargs)
        name = strategy.name
    else:
        name = "frozen-copy"
    if reload:
        return _frozen_model(config.model.model_name_or_path, _split_paths(config.model.adapter_name_or_path),
                             config, dtype, name, **kwargs)
    if for_precompute:
        return InitialPolicyReference(policy, **kwargs)
    return FrozenModelReference(copy.deepcopy(policy), "frozen-copy", **kwargs)


def _frozen_model(path: str, adapters: list[str], config, dtype, name: str, *, quantization_bit=None,
                  **kwargs) -> FrozenModelReference:
    """`path` with `adapters` merged, frozen; under ZeRO-3, partitioned in an inference engine."""
    if not zero3_enabled():
        model = load_causal_lm(path, config.model, dtype, quantization_bit=quantization_bit)
        return FrozenModelReference(merge_adapters(model, adapters), name, **kwargs)
    with loaded_whole() if adapters else contextlib.nullcontext():  # merging needs whole weights
        model = merge_adapters(load_causal_lm(path, config.model, dtype), adapters)
    return FrozenModelReference(partition_for_inference(model), name, partitioned=True, **kwargs)
