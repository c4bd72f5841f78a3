"""The reference model's log-probabilities, behind one interface.

Strategies (chosen by `plan_reference`, a pure function of the settings and the phase, and built by
`build_reference`; the model card, eval and chat read the same plan):
  none              reference-free losses (ORPO, SimPO): nothing is loaded or run
  adapter-disabled  LoRA: the policy with its adapter switched off; no second copy of the weights
  sft-adapter       LoRA on top of an SFT adapter: the frozen copy of that adapter (base + SFT); PiSSA:
                    the frozen copy of the initial PiSSA adapter on the residual base (= the starting model)
  frozen-copy       full / freeze tuning: a frozen copy of the initial policy
  separate-model    `ref_model` (+ `ref_model_adapters`)
  precomputed       `precompute_ref_log_probs`: any of the above, run once over the data before
                    training and cached on disk (reference_cache.py); training looks the values up
                    by pair `index`, and the reference model is freed. On by default where it is
                    exact and saves work or memory (`plan_precompute`).
The reference never receives gradients: every strategy runs under `torch.no_grad()`, in eval mode
(no dropout), and owns no trainable parameter. Under DeepSpeed ZeRO-3 a frozen model (frozen copy,
separate model, or any reference read before training) is loaded partitioned and wrapped in its own
inference engine (modeling/zero.py).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import math

from dataclasses import dataclass

import torch

from prefalign.config.args import is_adapter
from prefalign.contracts import PairLogps
from prefalign.errors import ConfigError
from prefalign.modeling.load import REFERENCE_ADAPTER, freeze_adapter_copy, load_causal_lm, merge_adapters
from prefalign.modeling.logprobs import pair_logps
from prefalign.modeling.zero import gathered, loaded_whole, partition_for_inference, zero3_enabled

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
    same_image_features = False  # a policy with a frozen tower and projector encodes images as this reference does

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
    def logps(self, batch: dict[str, torch.Tensor], split: str = "train", image_features: dict | None = None
              ) -> PairLogps | None:
        """Reference log-probs of `batch` (from either collator); `split` matters to precomputed ones only;
        `image_features`: the policy's encoded images of the batch to use (modeling/logprobs.pair_logps)."""
        model = self._model()
        if model is None:
            return None
        with self._model_context():
            return pair_logps(model, batch, chunk_size=self.chunk_size, token_level=self.token_level,
                              image_features=image_features)

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
    same_image_features = True  # the base's tower and projector (an adapter on them means they train)

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
        self.same_image_features = name == "frozen-copy"  # the policy's initial weights
        self.partitioned = partitioned  # in a ZeRO-3 inference engine: DeepSpeed places its weights

    def _model(self):
        if self._frozen is None:
            raise RuntimeError(f"the {self.name} reference was released after its log-probs were precomputed")
        return self._frozen

    def named_weights(self):
        if not self.partitioned:
            return super().named_weights()
        return [(n, gathered(p)) for n, p in self._model().named_parameters()]  # whole, not this rank's slice

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


# -- the plan: which reference a run uses -----------------------------------------------------------
PHASES = ("train", "eval", "chat")


@dataclass(frozen=True)
class ReferencePlan:
    """What the reference is, in words, and what `build_reference` builds for it.

    `strategy`: none | separate-model | adapter-disabled | sft-adapter | frozen-copy (the `name` of the
    Reference built). `model` and `adapters` name the separate reference model and the adapters merged
    into it (separate-model only).
    """

    strategy: str
    description: str
    model: str | None = None
    adapters: tuple[str, ...] = ()
    quantization_bit: int | None = None  # separate-model: loaded quantized (ref_model_quantization_bit)
    copy_new_adapter: bool = False  # sft-adapter: the frozen copy is made of the policy's new adapter (PiSSA)


def plan_reference(*, needs_reference: bool, phase: str, finetuning_type: str = "lora",
                   adapters: list[str] | None = None, create_new_adapter: bool = False,
                   ref_model: str | None = None, ref_model_adapters: list[str] | None = None,
                   ref_model_quantization_bit: int | None = None, pissa_init: bool = False) -> ReferencePlan:
    """The reference of a run in `phase` (train, eval or chat): a pure function of the settings.

    Training reads `adapters` (adapter_name_or_path) as the starting point. After training (eval,
    chat) the last adapter is the *result*, so the reference is the policy with it switched off; with
    no adapter and no `ref_model` there is nothing to compare with, a ConfigError. PiSSA (`pissa_init`)
    moves each adapted weight's principal part into the new adapter, so the policy with its adapter off is
    the residual, not the starting model: the reference keeps a frozen copy of the initial adapter.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, not {phase!r}")
    adapters = list(adapters or [])
    if not needs_reference:
        return ReferencePlan("none", "none (a reference-free loss)")
    if ref_model:
        merged = list(ref_model_adapters or [])
        words = f"`{ref_model}`" + (f" with {_listed(merged)} merged" if merged else "") + " (ref_model), frozen"
        if ref_model_quantization_bit:
            words += f", its weights in {ref_model_quantization_bit} bits"
        return ReferencePlan("separate-model", words, ref_model, tuple(merged), ref_model_quantization_bit)
    if phase != "train":
        if not adapters:
            command = "eval" if phase == "eval" else "chat --compare-reference"
            raise ConfigError(
                f"{command}: the policy is model_name_or_path with no adapter, so there is no reference to compare "
                "it with; set ref_model: to the model training started from (run_config.yaml's "
                "model_name_or_path), or adapter_name_or_path: to the trained LoRA adapter")
        earlier = f" with {_listed(adapters[:-1])} merged" if adapters[:-1] else ""
        return ReferencePlan("adapter-disabled",
                             f"the base model{earlier} (the policy with its adapter `{adapters[-1]}` disabled)")
    if is_adapter(finetuning_type):
        if pissa_init:
            merged = f" (the base model with {_listed(adapters)} merged)" if adapters else ""
            return ReferencePlan("sft-adapter", f"the starting model{merged}: its PiSSA residual with a frozen copy "
                                                "of the initial PiSSA adapter (the policy trains the other copy)",
                                 copy_new_adapter=True)
        if adapters and not create_new_adapter:
            earlier = f", {_listed(adapters[:-1])} merged," if adapters[:-1] else ""
            return ReferencePlan("sft-adapter", f"the base model{earlier} with the starting adapter `{adapters[-1]}` "
                                                "(a frozen copy of it; the policy trains the other copy)")
        if adapters:
            return ReferencePlan("adapter-disabled", f"the base model with the starting adapter(s) {_listed(adapters)} "
                                                     "merged (the policy with its new adapter disabled)")
        return ReferencePlan("adapter-disabled", "the base model (the policy with its adapter disabled)")
    merged = f" (the base model with {_listed(adapters)} merged)" if adapters else ""
    return ReferencePlan("frozen-copy", f"a frozen copy of the starting model{merged}")


def reference_reads(args, train_pairs: int, eval_pairs: int) -> tuple[int, int]:
    """How many pair reference values a run with TrainingArguments `args` computes live: (training, eval).

    Training reads `max_steps` x batch x accumulation x processes pairs, or every pair once per
    epoch; each evaluation reads the eval pairs once (every `eval_steps` steps, or every epoch).
    """
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
    steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * math.ceil(
        train_pairs / per_step))
    train_reads = steps * per_step if args.max_steps > 0 else math.ceil(args.num_train_epochs * train_pairs)
    strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    evals = 0
    if strategy == "steps" and args.eval_steps:
        every = args.eval_steps if args.eval_steps >= 1 else math.ceil(args.eval_steps * steps)
        evals = steps // max(1, int(every))
    elif strategy == "epoch":
        evals = math.ceil(steps * per_step / max(1, train_pairs))
    return train_reads, evals * eval_pairs


@dataclass(frozen=True)
class PrecomputePlan:
    """Whether a run precomputes its reference log-probs (`on`), and why, in a phrase (`reason`)."""

    on: bool
    reason: str

    def describe(self) -> str:
        return ("on: " if self.on else "off: ") + self.reason


_FREED = ("frozen-copy", "separate-model")  # the strategies whose model leaves memory once precomputed


def plan_precompute(setting: bool | None, strategy: str, *, streaming: bool, train_pairs: int | None,
                    eval_pairs: int = 0, reads: tuple[int, int] = (0, 0)) -> PrecomputePlan:
    """Whether a run with `precompute_ref_log_probs: setting` and reference `strategy` (ReferencePlan)
    precomputes: a value the config writes is kept; null (the default) is on where the precompute
    is exact (the reference is fixed, so its values do not depend on when they are computed) and
    pays: it computes no more reference forwards than training would (`reads`: the live reads,
    from `reference_reads`) and either fewer (more than one epoch) or it frees a whole model
    (a full-tuning frozen copy is never made; a `ref_model` is dropped before training).

    `train_pairs` None: no training data (an eval-only build); `eval_pairs`: the eval split's size.
    """
    if strategy == "none":
        return PrecomputePlan(False, "the loss uses no reference")
    if setting is not None:
        return PrecomputePlan(bool(setting), f"precompute_ref_log_probs: {str(bool(setting)).lower()} in the config")
    choose = " (set precompute_ref_log_probs: true or false to choose)"
    if train_pairs is None:
        return PrecomputePlan(False, "no training data: nothing is read more than once" + choose)
    if streaming:
        return PrecomputePlan(False, "the pairs are streamed (streaming: true): a pass over all of them before "
                                     "training is what streaming avoids" + choose)
    precomputed, live = train_pairs + eval_pairs, sum(reads)
    if live < precomputed:
        return PrecomputePlan(False, f"training reads {live} reference values, fewer than the {precomputed} pairs a "
                                     "precompute scores (max_steps ends within the first epoch)" + choose)
    why = []
    if live > precomputed:
        why.append(f"training would compute each pair's reference {live / precomputed:.2g} times")
    if strategy in _FREED:
        why.append(f"the {strategy} reference is not held during training")
    if not why:
        return PrecomputePlan(False, "one epoch reads each pair's reference once and the reference shares the "
                                     "policy's weights: nothing to save" + choose)
    return PrecomputePlan(True, "; ".join(why))


def _listed(paths: list[str]) -> str:
    return ", ".join(f"`{p}`" for p in paths)


def build_reference(plan: ReferencePlan, policy, model_args, *, dtype: torch.dtype = torch.float32,
                    chunk_size: int = 1024, token_level: bool = False, for_precompute: bool = False,
                    vocab=None) -> Reference:
    """The `Reference` that `plan` describes (see the module docstring); `model_args` loads a separate model.

    `for_precompute`: the reference is read once, before training (reference_cache.py), so a frozen
    copy reads the initial policy instead of copying it. `vocab` (data/vocab.VocabChange): a separately
    loaded model is resized as the policy was, so it sees the same embeddings.
    """
    kwargs = {"chunk_size": chunk_size, "token_level": token_level}
    if plan.strategy == "none":
        return Reference(**kwargs)
    if plan.strategy == "separate-model":
        return _frozen_model(plan.model, list(plan.adapters), model_args, dtype, "separate-model",
                             quantization_bit=plan.quantization_bit, vocab=vocab, **kwargs)
    if zero3_enabled() and (for_precompute or plan.strategy == "frozen-copy"):
        # The policy's weights are partitioned and, before training, have no engine to gather them:
        # the initial policy (model + every starting adapter merged, whatever the strategy) is loaded
        # again, in its own inference engine.
        return _frozen_model(model_args.model_name_or_path, list(model_args.adapter_name_or_path or []),
                             model_args, dtype, plan.strategy, vocab=vocab, **kwargs)
    if plan.strategy == "sft-adapter":
        if plan.copy_new_adapter:
            freeze_adapter_copy(policy)
        if REFERENCE_ADAPTER not in getattr(policy, "peft_config", {}):
            raise RuntimeError("the sft-adapter reference needs the policy's frozen copy of the starting adapter")
        return AdapterSwitchReference(policy, **kwargs)
    if plan.strategy == "adapter-disabled":
        return AdapterDisabledReference(policy, **kwargs)
    if for_precompute:
        return InitialPolicyReference(policy, **kwargs)
    return FrozenModelReference(copy.deepcopy(policy), "frozen-copy", **kwargs)


def _frozen_model(path: str, adapters: list[str], model_args, dtype, name: str, *, quantization_bit=None,
                  vocab=None, **kwargs) -> FrozenModelReference:
    """`path` with `adapters` merged, frozen; under ZeRO-3, partitioned in an inference engine."""
    if not zero3_enabled():
        model = load_causal_lm(path, model_args, dtype, quantization_bit=quantization_bit, vocab=vocab)
        return FrozenModelReference(merge_adapters(model, adapters), name, **kwargs)
    with loaded_whole() if adapters else contextlib.nullcontext():  # merging needs whole weights
        model = merge_adapters(load_causal_lm(path, model_args, dtype, vocab=vocab), adapters)
    return FrozenModelReference(partition_for_inference(model), name, partitioned=True, **kwargs)
