"""The reference model's log-probabilities, behind one interface.

Strategies (chosen by `build_reference` from the config):
  none              reference-free losses (ORPO, SimPO): nothing is loaded or run
  adapter-disabled  LoRA: the policy with its adapter switched off; no second copy of the weights
  sft-adapter       LoRA on top of an SFT adapter: the frozen copy of that adapter (base + SFT)
  frozen-copy       full / freeze tuning: a frozen copy of the initial policy
  separate-model    `ref_model` (+ `ref_model_adapters`)
The reference never receives gradients: every strategy runs under `torch.no_grad()` and owns no
trainable parameter.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch

from prefalign.contracts import PairLogps
from prefalign.modeling.load import REFERENCE_ADAPTER, _split_paths, load_causal_lm, merge_adapters
from prefalign.modeling.logprobs import pair_logps

logger = logging.getLogger(__name__)


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

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor]) -> PairLogps | None:
        model = self._model()
        if model is None:
            return None
        with self._model_context():
            return pair_logps(model, batch, chunk_size=self.chunk_size, token_level=self.token_level)

    def to(self, device) -> "Reference":
        return self


class AdapterDisabledReference(Reference):
    """The LoRA policy with its adapter disabled: the base weights, shared with the policy."""

    name = "adapter-disabled"

    def __init__(self, policy, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy

    def _model(self):
        return self.policy

    def _model_context(self):
        return self.policy.disable_adapter()


class AdapterSwitchReference(Reference):
    """LoRA trained from an SFT adapter: the reference is the frozen copy of that adapter."""

    name = "sft-adapter"

    def __init__(self, policy, **kwargs):
        super().__init__(**kwargs)
        self.policy = policy

    def _model(self):
        return self.policy

    @contextlib.contextmanager
    def _model_context(self):
        tuner = self.policy.base_model
        previous = tuner.active_adapter
        tuner.set_adapter(REFERENCE_ADAPTER)
        try:
            yield
        finally:
            tuner.set_adapter(previous)  # also makes the trained adapter require grad again, the copy not


class FrozenModelReference(Reference):
    """A separate model in eval mode with no trainable parameter (a frozen copy, or `ref_model`)."""

    def __init__(self, model, name: str, **kwargs):
        super().__init__(**kwargs)
        self.model = model.eval().requires_grad_(False)
        self.name = name

    def _model(self):
        return self.model

    def to(self, device):
        self.model.to(device)
        return self


def build_reference(config, policy, *, needs_reference: bool, dtype: torch.dtype = torch.float32) -> Reference:
    """Pick the reference strategy for this run (see the module docstring)."""
    ft = config.finetuning
    kwargs = {"chunk_size": ft.logits_chunk_size, "token_level": ft.ld_alpha is not None}
    if not needs_reference:
        return Reference(**kwargs)
    if ft.ref_model:
        model = load_causal_lm(ft.ref_model, config.model, dtype)
        model = merge_adapters(model, _split_paths(ft.ref_model_adapters))
        return FrozenModelReference(model, "separate-model", **kwargs)
    if ft.finetuning_type == "lora":
        if REFERENCE_ADAPTER in getattr(policy, "peft_config", {}):
            return AdapterSwitchReference(policy, **kwargs)
        return AdapterDisabledReference(policy, **kwargs)
    return FrozenModelReference(copy.deepcopy(policy), "frozen-copy", **kwargs)
