"""Load the tokenizer, the policy (LoRA or OFT adapter, full or freeze tuning) and any separate reference model."""

from __future__ import annotations

import logging

import torch

from prefalign.config.args import FinetuningArguments, ModelArguments, is_adapter
from prefalign.data.vocab import VocabChange, embedding_module_names, extend_tokenizer, resize_embeddings
from prefalign.distributed import full_shape
from prefalign.errors import ConfigError, PrefalignError
from prefalign.modeling import fused_mlp
from prefalign.modeling.model_config import apply_model_config
from prefalign.modeling.quantize import device_map, pin_cpu_kernels, quantization_config
from prefalign.modeling.vision import freeze_parts, is_vision_language, lora_targets, text_config

logger = logging.getLogger(__name__)

REFERENCE_ADAPTER = "reference"  # name of the frozen copy of an SFT adapter (see reference.py)


def load_tokenizer(model_args: ModelArguments, path: str | None = None):
    """The model's tokenizer, with a pad token (the EOS token when it has none) and right padding."""
    from transformers import AutoTokenizer

    path = path or model_args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=model_args.trust_remote_code, use_fast=model_args.use_fast_tokenizer,
            revision=model_args.model_revision, cache_dir=model_args.cache_dir,
            split_special_tokens=model_args.split_special_tokens,
        )
    except OSError as exc:
        raise PrefalignError(f"model_name_or_path: cannot load a tokenizer from {path!r}: {str(exc).splitlines()[0]}") from None
    except ValueError as exc:
        raise _remote_code_refusal(path, exc) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_run_tokenizer(config, path: str | None = None) -> tuple[object, VocabChange]:
    """A run's tokenizer with the tokens LLaMA-Factory adds (data/vocab.py), and that change, which every
    model the run loads is given (`vocab=`), so policy and reference have the same embeddings."""
    tokenizer = load_tokenizer(config.model, path)
    return tokenizer, extend_tokenizer(tokenizer, config.model, config.data, seed=config.training.seed)


def _remote_code_refusal(path: str, exc: ValueError) -> Exception:
    """transformers' refusal to run a model's own code, as one line; any other ValueError stays a bug."""
    if "trust_remote_code" not in str(exc):
        return exc
    return PrefalignError(f"{path!r} ships its own model code, which runs only with trust_remote_code: true; "
                          "set it if you trust that code, or use a model transformers supports natively")


def _attn_implementation(flash_attn: str) -> str | None:
    if flash_attn == "fa2":
        if not torch.cuda.is_available():
            raise ConfigError("flash_attn: fa2 needs a CUDA GPU; use flash_attn: auto on this machine")
        return "flash_attention_2"
    return {"auto": None, "disabled": "eager", "sdpa": "sdpa"}[flash_attn]


def compute_dtype(config) -> torch.dtype:
    """The dtype models load in: bf16 with `bf16` or `pure_bf16` (LLaMA-Factory's rule), fp16 with `fp16`, else fp32."""
    training_args = config.training
    if getattr(training_args, "bf16", False) or config.finetuning.pure_bf16:
        return torch.bfloat16
    if getattr(training_args, "fp16", False):
        return torch.float16
    return torch.float32


def load_causal_lm(path: str, model_args: ModelArguments, dtype: torch.dtype = torch.float32, *,
                   quantization_bit: int | None = None, vocab: VocabChange | None = None, trainable: bool = False):
    """A causal LM from a local directory or the hub, in `dtype` (with `quantization_bit`: quantized at load;
    `trainable`: the policy to train, see model_config.apply_model_config), its embeddings resized for `vocab`
    (before any adapter is loaded on it: a saved resized embedding fits)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    kwargs = {"trust_remote_code": model_args.trust_remote_code,
              "revision": model_args.model_revision, "cache_dir": model_args.cache_dir}
    config = _loaded(AutoConfig.from_pretrained, path, kwargs)
    apply_model_config(config, model_args, trainable=trainable)
    kwargs.update(config=config, dtype=dtype)
    if quantization_bit is not None:
        kwargs.update(quantization_config=quantization_config(quantization_bit, model_args, dtype),
                      device_map=device_map())
    attn = _attn_implementation(model_args.flash_attn)
    if attn:
        kwargs["attn_implementation"] = attn
    auto = AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM
    model = _loaded(auto.from_pretrained, path, kwargs)
    model.config.use_cache = False
    resize_embeddings(model, vocab)
    pin_cpu_kernels(model)  # quantized at load or saved quantized
    return model


def _loaded(from_pretrained, path: str, kwargs: dict):
    """`from_pretrained(path, **kwargs)`, a missing or unreadable model as one line."""
    try:
        return from_pretrained(path, **kwargs)
    except OSError as exc:
        raise PrefalignError(f"cannot load a model from {path!r}: {str(exc).splitlines()[0]}") from None
    except ValueError as exc:
        raise _remote_code_refusal(path, exc) from None


def merge_adapters(model, adapters: list[str]):
    """Merge each LoRA adapter into the weights, in order."""
    from peft import PeftModel

    for path in adapters:
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return model


def load_inference_policy(model_args: ModelArguments, dtype: torch.dtype = torch.float32,
                          vocab: VocabChange | None = None):
    """After training (eval, chat): `model_name_or_path` + `adapter_name_or_path`, all adapters but the last
    merged and the last kept switchable (so it can be disabled for the reference); eval mode, frozen."""
    from peft import PeftModel

    model = load_causal_lm(model_args.model_name_or_path, model_args, dtype,
                           quantization_bit=model_args.quantization_bit, vocab=vocab)
    adapters = list(model_args.adapter_name_or_path or [])
    model = merge_adapters(model, adapters[:-1])
    if adapters:
        model = PeftModel.from_pretrained(model, adapters[-1], is_trainable=False)
    return model.eval().requires_grad_(False)


def load_policy(model_args: ModelArguments, ft: FinetuningArguments, dtype: torch.dtype = torch.float32,
                vocab: VocabChange | None = None):
    """The model to train, with exactly the parameters `finetuning_type` trains requiring grad.

    LoRA with an existing adapter (e.g. from SFT): every adapter but the last is merged; the last
    becomes the trainable adapter, and a frozen copy of it is loaded as the adapter named
    `reference`, so the reference is base + SFT adapter, never the bare base. With
    `create_new_adapter` all adapters are merged and a fresh one is trained on top. With `vocab.resize`
    (and no `additional_target`), a new adapter trains and saves the embedding and head in full, as LF.
    """
    model = load_causal_lm(model_args.model_name_or_path, model_args, dtype,
                           quantization_bit=model_args.quantization_bit, vocab=vocab, trainable=True)
    adapters = list(model_args.adapter_name_or_path or [])
    if is_adapter(ft.finetuning_type):
        if model_args.quantization_bit is not None:  # QLoRA: frozen quantized base, norms and head in fp32
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        extra = embedding_module_names(model) if vocab is not None and vocab.resize and not ft.additional_target else []
        model = _attach_adapter(model, adapters, ft, extra)
    else:
        model = merge_adapters(model, adapters)
        if ft.finetuning_type == "freeze":
            _freeze(model, ft)
        freeze_parts(model, ft)  # a vision-language model's frozen tower, projector or language model
    # Trainable parameters in fp32, whatever the load dtype: optimizer updates stay exact. pure_bf16 keeps
    # them in bf16 (weights, gradients and optimizer state), as LLaMA-Factory does.
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32 and not ft.pure_bf16:
            param.data = param.data.float()
    fused_mlp.install(model)  # silu(gate) recomputed in the backward, not kept: bitwise the same, less memory
    trainable = sum(full_shape(p).numel() for p in model.parameters() if p.requires_grad)
    total = sum(full_shape(p).numel() for p in model.parameters())
    logger.info("trainable params: %d / %d (%.4f%%)", trainable, total, 100 * trainable / max(total, 1))
    return model


def _attach_adapter(model, adapters: list[str], ft: FinetuningArguments, modules_to_save: list[str] = ()):
    from peft import PeftModel, get_peft_model

    if adapters and not ft.create_new_adapter:
        model = merge_adapters(model, adapters[:-1])
        model = PeftModel.from_pretrained(model, adapters[-1], is_trainable=True)
        model.load_adapter(adapters[-1], adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        model.set_adapter("default")
        return model
    model = merge_adapters(model, adapters)
    key = "oft_target" if ft.finetuning_type == "oft" else "lora_target"
    try:
        return get_peft_model(model, peft_config(ft, modules_to_save, model))
    except ValueError as exc:
        raise ConfigError(f"{key}: {str(exc).splitlines()[0]}") from None


def freeze_adapter_copy(model) -> None:
    """Add a frozen copy of the policy's adapter `default`, as it is now, named REFERENCE_ADAPTER (the PiSSA
    reference: the initial adapter on the residual base is the starting model); `default` stays active."""
    import copy

    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if REFERENCE_ADAPTER in model.peft_config:
        return
    config = copy.deepcopy(model.peft_config["default"])
    config.init_lora_weights = True  # the weights are copied below; no second SVD
    model.add_adapter(REFERENCE_ADAPTER, config)
    set_peft_model_state_dict(model, get_peft_model_state_dict(model, adapter_name="default"),
                              adapter_name=REFERENCE_ADAPTER)
    model.set_adapter("default")  # the copy requires no grad, the trained adapter does
    for name, param in model.named_parameters():
        if f".{REFERENCE_ADAPTER}." in name:
            param.requires_grad_(False)


def peft_config(ft: FinetuningArguments, modules_to_save: list[str] = (), model=None):
    """The peft config of a new adapter of `ft.finetuning_type` (lora or oft), as LLaMA-Factory builds it;
    `modules_to_save`: trained in full when `additional_target` is unset (the resized embeddings); `model`: the
    model it goes on (a vision-language model's targets leave out its frozen parts, modeling/vision.py)."""
    from peft import LoraConfig, OFTConfig

    modules_to_save = list(ft.additional_target or modules_to_save or []) or None
    if ft.finetuning_type == "oft":
        return OFTConfig(task_type="CAUSAL_LM", r=ft.oft_rank, oft_block_size=ft.oft_block_size,
                         target_modules=_targets(ft, ft.oft_target, model), module_dropout=ft.module_dropout,
                         modules_to_save=modules_to_save)
    return LoraConfig(
        task_type="CAUSAL_LM", r=ft.lora_rank, lora_alpha=ft.lora_alpha or 2 * ft.lora_rank,
        lora_dropout=ft.lora_dropout, target_modules=_targets(ft, ft.lora_target, model), use_rslora=ft.use_rslora,
        use_dora=ft.use_dora, modules_to_save=modules_to_save, init_lora_weights=_lora_init(ft),
    )


def _lora_init(ft: FinetuningArguments) -> bool | str:
    """peft's `init_lora_weights`: PiSSA as LLaMA-Factory asks for it (pissa_iter -1: exact SVD), else peft's default."""
    if not ft.pissa_init:
        return True
    return "pissa" if ft.pissa_iter == -1 else f"pissa_niter_{ft.pissa_iter}"


PISSA_INIT, PISSA_CONVERTED = "pissa_init", "pissa_converted"  # LLaMA-Factory's folder names in output_dir


def save_pissa_adapter(model, folder, *, initial=None) -> None:
    """Save a PiSSA adapter as a plain LoRA config (init_lora_weights: true, so loading it never runs the SVD
    again); with `initial` (the saved initial adapter), converted to a LoRA of the original base (peft)."""
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    conversion = {} if initial is None else {"path_initial_model_for_weight_conversion": str(initial)}
    try:
        model.save_pretrained(str(folder), selected_adapters=["default"], **conversion)
    finally:
        config.init_lora_weights = init


def _targets(ft: FinetuningArguments, names: list[str], model=None):
    if model is not None:
        return lora_targets(model, ft, names)
    return "all-linear" if names == ["all"] else list(names)


def _freeze(model, ft: FinetuningArguments) -> None:
    """Freeze tuning: train the last (or, negative, first) N decoder layers and the extra modules."""
    num_layers = getattr(text_config(model.config), "num_hidden_layers", None)
    if not num_layers:
        raise ConfigError("finetuning_type: freeze needs a model config with num_hidden_layers")
    n = ft.freeze_trainable_layers
    if n == 0 or abs(n) > num_layers:
        raise ConfigError(f"freeze_trainable_layers: {n} must be between -{num_layers} and {num_layers}, not 0")
    layer_ids = range(num_layers - n, num_layers) if n > 0 else range(-n)
    modules = list(ft.freeze_trainable_modules)
    extra = list(ft.freeze_extra_modules or [])
    prefixes = [f".layers.{i}." for i in layer_ids]
    matched = False
    for name, param in model.named_parameters():
        in_layer = any(p in f".{name}" for p in prefixes)
        module_ok = modules == ["all"] or any(f".{m}." in name for m in modules)
        param.requires_grad = (in_layer and module_ok) or any(f"{m}." in name for m in extra)
        matched |= param.requires_grad
    if not matched:
        raise ConfigError(
            f"freeze_trainable_modules: {','.join(ft.freeze_trainable_modules)!r} matches no parameter in the trainable layers"
        )
