"""Every LLaMA-Factory config key, each with one answer: the loader asks this table, the README prints it.

The keys are those of LLaMA-Factory 0.9.5's argument dataclasses (`src/llamafactory/hparams/`, as
`scripts/lf_defaults.py` extracts them into `tests/fixtures/llamafactory/lf_defaults.json`), plus the
older LF / transformers 4 spellings LF configs still carry. A key at LF's default turns nothing on:
LF runs such a config as if the key were absent, and so does prefalign.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable

LF_RELEASE = "0.9.5"


class Answer(enum.Enum):
    IMPLEMENTED = "implemented"
    NO_EFFECT = "accepted, no effect here"
    NOT_IN_PREFALIGN = "LLaMA-Factory feature not in prefalign"
    OTHER_STAGE = "another LLaMA-Factory stage"


@dataclass(frozen=True)
class LFKey:
    """One LF key: its LF default, prefalign's answer, and the words that go with it.

    `note`: implemented: how (or ""); no effect: why; not in prefalign: the feature; another stage: the stage.
    `rename`: implemented under a prefalign / transformers key: (that key, value -> its value).
    `unset_at_default`: LF's default means what prefalign's default means, so the key is dropped at it
    (`packing: null`, `enable_thinking: true`, `neat_packing: false`).
    """

    default: Any
    answer: Answer
    note: str = ""
    rename: tuple[str, Callable[[Any], Any]] | None = None
    unset_at_default: bool = False


def _impl(default, note: str = "", rename=None, unset_at_default: bool = False) -> LFKey:
    return LFKey(default, Answer.IMPLEMENTED, note, rename, unset_at_default or rename is not None)


def _no_effect(default, reason: str) -> LFKey:
    return LFKey(default, Answer.NO_EFFECT, reason)


def _not_here(default, feature: str) -> LFKey:
    return LFKey(default, Answer.NOT_IN_PREFALIGN, feature)


def _stage(default, stage: str) -> LFKey:
    return LFKey(default, Answer.OTHER_STAGE, stage)


_MULTIMODAL = "multimodal models (images, video, audio)"
_VIDEO = ("as LF, for Qwen2-VL / Qwen2.5-VL / Qwen3-VL videos; needs PyAV and a torchvision that loads with the installed "
          "torch (else a video record is a named record error)")
_VLLM = "chat generates with transformers' generate, not vLLM"
_SGLANG = "chat generates with transformers' generate, not SGLang"
_PPO = "ppo"
_RM = "ppo (its reward model)"
_SFT = "sft"

# Section -> {key: answer}, in the order of LF's dataclasses (a key LF defines twice is listed once).
SECTIONS: dict[str, dict[str, LFKey]] = {
    "ModelArguments (base)": {
        "model_name_or_path": _impl(None),
        "adapter_name_or_path": _impl(None),
        "adapter_folder": _not_here(None, "loading adapters from an adapter folder (adapter_folder)"),
        "cache_dir": _impl(None),
        "use_fast_tokenizer": _impl(True),
        "resize_vocab": _impl(False, "data/vocab.py: resized as LF (multiple of 64), policy and reference alike"),
        "split_special_tokens": _impl(False),
        "add_tokens": _impl(None),
        "add_special_tokens": _impl(None),
        "new_special_tokens_config": _impl(None),
        "init_special_tokens": _impl("noise_init", "LF's three methods; the noise from a generator seeded by `seed`"),
        "model_revision": _impl("main"),
        "low_cpu_mem_usage": _no_effect(True, "transformers 5 always loads lazily"),
        "rope_scaling": _impl(None, "factor from model_max_length (cutoff_len), at inference 2 without one, as LF's "
                                     "model_utils/rope.py"),
        "flash_attn": _impl("auto"),
        "shift_attn": _not_here(False, "shift short attention (LongLoRA)"),
        "mixture_of_depths": _not_here(None, "mixture of depths"),
        "use_unsloth": _no_effect(False, "unsloth is not used; prefalign's own response-only log-probs apply"),
        "use_unsloth_gc": _no_effect(False, "unsloth is not used"),
        "enable_liger_kernel": _no_effect(False, "prefalign computes log-probs in its own chunked kernel"),
        "moe_aux_loss_coef": _impl(None, "coef x transformers' router loss, added to the preference loss (LF's DPO "
                                          "trainer sets the config but drops the term)"),
        "disable_gradient_checkpointing": _impl(
            False, "as transformers' `gradient_checkpointing: false`; at LF's default (false) the key is "
            "dropped and `gradient_checkpointing` decides", rename=("gradient_checkpointing", lambda v: not v)),
        "use_reentrant_gc": _not_here(True, "use_reentrant_gc (write gradient_checkpointing_kwargs: "
                                            "{use_reentrant: false} instead)"),
        "upcast_layernorm": _no_effect(False, "layer norms run in the model's dtype"),
        "upcast_lmhead_output": _no_effect(False, "prefalign always accumulates log-probs in fp32"),
        "train_from_scratch": _not_here(False, "training from random weights"),
        "infer_backend": _no_effect("huggingface", "chat uses transformers' generate"),
        "offload_folder": _no_effect("offload", "prefalign never offloads weights to disk"),
        "use_kv_cache": _no_effect(True, "the KV cache is off during training and on for chat"),
        "use_v1_kernels": _no_effect(False, "prefalign's own log-prob kernels apply"),
        "infer_dtype": _no_effect("auto", "chat uses the model's own dtype"),
        "hf_hub_token": _not_here(None, "hub tokens in the config (set HF_TOKEN in the environment instead)"),
        "ms_hub_token": _not_here(None, "the ModelScope hub"),
        "om_hub_token": _not_here(None, "the Modelers hub"),
        "print_param_status": _no_effect(False, "trainable parameter counts are always printed"),
        "trust_remote_code": _impl(False),
    },
    "QuantizationArguments": {
        "quantization_method": _impl("bnb"),
        "quantization_bit": _impl(None),
        "quantization_type": _impl("nf4"),
        "double_quantization": _impl(True),
        "quantization_device_map": _not_here(None, "quantization_device_map (prefalign places quantized weights itself)"),
    },
    "ProcessorArguments": {
        "image_max_pixels": _impl(768 * 768),
        "image_min_pixels": _impl(32 * 32),
        "image_do_pan_and_scan": _not_here(False, "Gemma 3's pan-and-scan crops"),
        "crop_to_patches": _not_here(False, "InternVL's image crops"),
        "video_max_pixels": _impl(256 * 256, _VIDEO),
        "video_min_pixels": _impl(16 * 16, _VIDEO),
        "video_fps": _impl(2.0, _VIDEO),
        "video_maxlen": _impl(128, _VIDEO),
        "use_audio_in_video": _not_here(False, "audio inputs"),
        "audio_sampling_rate": _not_here(16000, "audio inputs"),
    },
    "ExportArguments": {
        "export_dir": _impl(None),
        "export_size": _impl(5),
        "export_device": _no_effect("cpu", "export merges on the CPU"),
        "export_quantization_bit": _not_here(None, "quantized export (GPTQ)"),
        "export_quantization_dataset": _not_here(None, "quantized export (GPTQ)"),
        "export_quantization_nsamples": _not_here(128, "quantized export (GPTQ)"),
        "export_quantization_maxlen": _not_here(1024, "quantized export (GPTQ)"),
        "export_legacy_format": _impl(False),
        "export_hub_model_id": _not_here(None, "pushing the export to the hub"),
    },
    "VllmArguments": {
        "vllm_maxlen": _no_effect(4096, _VLLM), "vllm_gpu_util": _no_effect(0.7, _VLLM),
        "vllm_enforce_eager": _no_effect(False, _VLLM), "vllm_max_lora_rank": _no_effect(32, _VLLM),
        "vllm_config": _no_effect(None, _VLLM),
    },
    "SGLangArguments": {
        "sglang_maxlen": _no_effect(4096, _SGLANG), "sglang_mem_fraction": _no_effect(0.7, _SGLANG),
        "sglang_tp_size": _no_effect(-1, _SGLANG), "sglang_config": _no_effect(None, _SGLANG),
        "sglang_lora_backend": _no_effect("triton", _SGLANG),
    },
    "KTransformersArguments": {
        key: _not_here(default, "KTransformers") for key, default in {
            "use_kt": False, "kt_weight_path": None, "kt_expert_checkpoint_path": None, "kt_use_lora_experts": None,
            "kt_lora_expert_num": None, "kt_lora_expert_intermediate_size": None,
        }.items()
    },
    "DataArguments": {
        "template": _impl(None),
        "dataset": _impl(None),
        "eval_dataset": _impl(None),
        "dataset_dir": _impl("data"),
        "media_dir": _impl(None, "unset: dataset_dir; a path not found there is used as given (LF's converter)"),
        "cutoff_len": _impl(2048),
        "train_on_prompt": _stage(False, _SFT),
        # LF's pairwise processor encodes every record as one turn (history in the prompt, never
        # trained), and LF refuses `mask_history: true` outside sft; so does prefalign
        "mask_history": _stage(False, _SFT),
        "streaming": _impl(False, "the encoded pairs as datasets' IterableDataset; needs max_steps"),
        "buffer_size": _impl(16384, "the shuffle buffer of streaming"),
        "mix_strategy": _impl("concat"),
        "interleave_probs": _impl(None),
        "overwrite_cache": _impl(False),
        "preprocessing_batch_size": _impl(1000),
        "preprocessing_num_workers": _impl(None),
        "max_samples": _impl(None),
        "eval_num_beams": _stage(None, _SFT),
        "ignore_pad_token_for_loss": _stage(True, _SFT),
        "val_size": _impl(0.0),
        "eval_on_each_dataset": _impl(False, "one eval set per eval_dataset, metrics `eval_<dataset>_*`"),
        "packing": _impl(None, "null (LF's default): prefalign packs where the model allows (the same log-probs)",
                         unset_at_default=True),
        "neat_packing": _impl(False, "as `packing: true`: prefalign's packing never attends across sequences",
                              rename=("packing", bool)),
        "tool_format": _impl(None, "a built-in template's tool definitions and calls as LF writes them"),
        "default_system": _impl(None, "the system message of records without one (LF: `system or default_system`) "
                                      "and of `prefalign chat`"),
        "enable_thinking": _impl(True, "LF's default (true) is the template's own default", unset_at_default=True),
        "preserve_thinking": _not_here(False, "keeping the thinking of earlier turns"),
        "tokenized_path": _no_effect(None, "prefalign caches encoded data itself, keyed by data, tokenizer, "
                                           "template and cutoff"),
        "data_shared_file_system": _no_effect(False, "each node's main process encodes into its own cache"),
    },
    "FreezeArguments": {
        "freeze_trainable_layers": _impl(2),
        "freeze_trainable_modules": _impl("all"),
        "freeze_extra_modules": _impl(None),
    },
    "LoraArguments": {
        "additional_target": _impl(None),
        "lora_alpha": _impl(None),
        "lora_dropout": _impl(0.0),
        "lora_rank": _impl(8),
        "lora_target": _impl("all"),
        "loraplus_lr_ratio": _impl(None, "LoRA+: B matrices at learning_rate x ratio (peft's LoRA+ optimizer)"),
        "loraplus_lr_embedding": _impl(1e-6, "LoRA+: learning rate of LoRA embedding layers"),
        "use_rslora": _impl(False),
        "use_dora": _impl(False),
        "pissa_init": _impl(False, "peft's init_lora_weights: pissa / pissa_niter_N; the reference: the residual "
                                   "+ a frozen copy of the initial adapter (LF: reference-free losses only)"),
        "pissa_iter": _impl(16),
        "pissa_convert": _impl(False, "output_dir/pissa_converted, as LF's PissaConvertCallback"),
        "create_new_adapter": _impl(False),
    },
    "OFTArguments": {
        "module_dropout": _impl(0.0, "OFT: peft's OFTConfig.module_dropout"),
        "oft_rank": _impl(0, "OFT: number of blocks (0: from oft_block_size)"),
        "oft_block_size": _impl(32, "OFT: block size (0: from oft_rank)"),
        "oft_target": _impl("all", "OFT: module names to adapt, or `all`"),
    },
    "RLHFArguments": {
        "pref_beta": _impl(0.1),
        "pref_ftx": _impl(0.0),
        "pref_bco_weight": _impl(0.0),
        "pref_loss": _impl("sigmoid"),
        "dpo_label_smoothing": _impl(0.0),
        "kto_chosen_weight": _impl(1.0),
        "kto_rejected_weight": _impl(1.0),
        "simpo_gamma": _impl(0.5),
        "ppo_buffer_size": _stage(1, _PPO),
        "ppo_epochs": _stage(4, _PPO),
        "ppo_score_norm": _stage(False, _PPO),
        "ppo_target": _stage(6.0, _PPO),
        "ppo_whiten_rewards": _stage(False, _PPO),
        "ref_model": _impl(None),
        "ref_model_adapters": _impl(None),
        "ref_model_quantization_bit": _impl(None),
        "reward_model": _stage(None, _RM),
        "reward_model_adapters": _stage(None, _RM),
        "reward_model_quantization_bit": _stage(None, _RM),
        "reward_model_type": _stage("lora", _RM),
        "ld_alpha": _impl(None),
    },
    "GaloreArguments": {
        "use_galore": _impl(False, "galore-torch's GaLoreAdamW with LF's parameter groups (extra: galore)"),
        **{key: _impl(default) for key, default in {
            "galore_target": "all", "galore_rank": 16, "galore_update_interval": 200, "galore_scale": 2.0,
            "galore_proj_type": "std"}.items()},
        "galore_layerwise": _impl(False, "one GaLoreAdamW per parameter stepped from its gradient hook, transformers' "
                                          "LayerWiseDummyOptimizer; no accumulation, one process, no resume"),
    },
    "ApolloArguments": {
        "use_apollo": _impl(False, "apollo-torch's APOLLOAdamW with LF's parameter groups, GaLore's (extra: apollo)"),
        **{key: _impl(default) for key, default in {
            "apollo_target": "all", "apollo_rank": 16, "apollo_update_interval": 200, "apollo_scale": 32.0,
            "apollo_proj": "random", "apollo_proj_type": "std", "apollo_scale_type": "channel",
            "apollo_scale_front": False}.items()},
        "apollo_layerwise": _impl(False, "one APOLLOAdamW per parameter stepped from its gradient hook, as galore_layerwise"),
    },
    "BAdamArgument": {
        "use_badam": _impl(False, "badam's BlockOptimizer (layer) / BlockOptimizerRatio (ratio) with LF's groups, "
                                  "clip_grad_norm_ and callback; full tuning, one process, not under DeepSpeed yet (LF: layer "
                                  "mode under ZeRO-3) (extra: badam)"),
        **{key: _impl(default) for key, default in {
            "badam_mode": "layer", "badam_start_block": None, "badam_switch_mode": "ascending",
            "badam_switch_interval": 50, "badam_update_ratio": 0.05, "badam_mask_mode": "adjacent",
            "badam_verbose": 0}.items()},
    },
    "SwanLabArguments": {
        "use_swanlab": _impl(False, "transformers' SwanLabCallback (`pip install prefalign[swanlab]`)"),
        "swanlab_project": _impl("llamafactory"),
        "swanlab_workspace": _impl(None),
        "swanlab_run_name": _impl(None, "as transformers' `run_name`", rename=("run_name", str)),
        "swanlab_mode": _impl("cloud"),
        "swanlab_api_key": _impl(None),
        "swanlab_logdir": _impl(None),
        "swanlab_lark_webhook_url": _not_here(None, "SwanLab's Lark notifications"),
        "swanlab_lark_secret": _not_here(None, "SwanLab's Lark notifications"),
    },
    "FinetuningArguments": {
        "pure_bf16": _impl(False, "bf16 weights, gradients and optimizer state; no fp32 copies (adapters: peft's fp32)"),
        "stage": _impl("sft", "prefalign runs `stage: dpo` and `stage: kto`; any other stage is refused"),
        "finetuning_type": _impl("lora", "lora, oft, full, freeze"),
        "use_llama_pro": _not_here(False, "LLaMA Pro"),
        "use_adam_mini": _impl(False, "adam-mini's Adam_mini with the model's hidden size and heads (extra: adam_mini); "
                                      "not with DeepSpeed"),
        "use_mca": _not_here(False, "Megatron Core training (MCA)"),
        "use_hyper_parallel": _not_here(False, "the HyperParallel backend"),
        "hyper_parallel_args": _not_here(None, "the HyperParallel backend"),
        "use_muon": _impl(False, "torch.optim.Muon (AdamW-matched RMS, as LF's) on LF's 2-D weights, torch's AdamW on "
                                 "the rest; not with DeepSpeed"),
        "use_dft_loss": _stage(False, _SFT),
        "use_asft_loss": _stage(False, _SFT),
        "asft_alpha": _stage(0.1, _SFT),
        "use_eaft_loss": _stage(False, _SFT),
        "eaft_alpha": _stage(1.0, _SFT),
        "freeze_vision_tower": _impl(True),
        "freeze_multi_modal_projector": _impl(True),
        "freeze_language_model": _impl(False),
        "compute_accuracy": _stage(False, _SFT),
        "disable_shuffling": _impl(False, "as transformers' `train_sampling_strategy: sequential`",
                                   rename=("train_sampling_strategy", lambda v: "sequential" if v else "random")),
        "early_stopping_steps": _impl(None, "transformers' EarlyStoppingCallback with this patience"),
        "plot_loss": _impl(False),
        "include_effective_tokens_per_second": _no_effect(False, "pairs/s and tokens/s are always logged"),
    },
    "TrainingArguments (LF's own fields; the rest are transformers')": {
        **{key: _not_here(default, "Ray") for key, default in {
            "ray_num_workers": 1, "ray_init_kwargs": None, "master_addr": None, "master_port": None}.items()},
        **{key: _not_here(default, "the torch profiler") for key, default in {
            "enable_torch_profiler": False, "profiler_output_dir": None, "profiler_wait_steps": 1,
            "profiler_warmup_steps": 1, "profiler_active_steps": 1, "profiler_repeat": 1,
            "profiler_record_shapes": True, "profiler_profile_memory": True, "profiler_with_stack": True,
            "profile_modules": None}.items()},
        **{key: _not_here(default, "FP8 training") for key, default in {
            "fp8": False, "fp8_backend": "auto", "fp8_enable_fsdp_float8_all_gather": False}.items()},
        "overwrite_output_dir": _impl(False),
    },
    "GeneratingArguments (prefalign chat)": {
        "do_sample": _impl(True),
        "temperature": _impl(0.95),
        "top_p": _impl(0.7),
        "top_k": _impl(50),
        "num_beams": _not_here(1, "beam search in chat"),
        "max_length": _no_effect(1024, "max_new_tokens bounds each reply"),
        "max_new_tokens": _impl(1024),
        "repetition_penalty": _impl(1.0),
        "length_penalty": _not_here(1.0, "beam search in chat"),
        "skip_special_tokens": _no_effect(True, "chat always prints replies without special tokens"),
    },
    "Older LLaMA-Factory and transformers 4 keys": {
        "warmup_ratio": _impl(0.0, "as transformers 5's `warmup_steps` (a float < 1 is a ratio)",
                              rename=("warmup_steps", float)),
        "evaluation_strategy": _impl(None, "as `eval_strategy`", rename=("eval_strategy", str)),
        "group_by_length": _impl(False, "as `train_sampling_strategy: group_by_length`",
                                 rename=("train_sampling_strategy", lambda v: "group_by_length" if v else "random")),
        "ddp_timeout": _no_effect(1800, "a TrainingArguments field of transformers 4, dropped in 5"),
        "logging_dir": _no_effect(None, "set TENSORBOARD_LOGGING_DIR instead (transformers 5)"),
        "plot_loss_steps": _no_effect(None, "plots use every logged step"),
        "use_cache": _no_effect(True, "the KV cache is off during training and on for chat"),
        "new_special_tokens": _not_here(None, "adding special tokens"),
        "ray_run_name": _not_here(None, "Ray"),
        "ray_storage_path": _not_here("./saves", "Ray"),
    },
}

LF_KEYS: dict[str, LFKey] = {key: entry for section in SECTIONS.values() for key, entry in section.items()}


def at_lf_default(value: Any, default: Any) -> bool:
    """True when `value` (as YAML or an override gives it) is LF's `default`: 2 is 2.0, "false" is false."""
    if value is None or default is None:
        return value is None and default is None
    from prefalign.config.loader import coerce

    try:
        return coerce(value, type(default)) == default
    except (TypeError, ValueError):
        return False


def shown(value: Any) -> str:
    """A default as YAML writes it: null, true, false, 16."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def problem(key: str, value: Any) -> str | None:
    """The one-line refusal of an LF key set to `value`, or None when prefalign accepts it."""
    entry = LF_KEYS[key]
    if at_lf_default(value, entry.default):
        return None
    fix = f"remove the key (or set it to LLaMA-Factory's default, {shown(entry.default)})"
    if entry.answer is Answer.NOT_IN_PREFALIGN:
        return f"{key}: {entry.note} is a LLaMA-Factory feature prefalign does not support yet; {fix}"
    if entry.answer is Answer.OTHER_STAGE:
        return (f"{key}: only LLaMA-Factory's {entry.note} stage reads it, and prefalign runs stage: dpo; {fix}")
    return None


def translate(values: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """Apply the table to a flat config: (the values prefalign's groups read, problems, no-effect notes).

    Each LF key is dropped at LF's default where that means prefalign's default, renamed where
    prefalign spells it otherwise, dropped with its reason when it has no effect here, and refused
    (one line naming the feature or the stage) when it asks for what prefalign does not do.
    """
    out: dict[str, Any] = {}
    problems: list[str] = []
    notes: list[str] = []
    for key, value in values.items():
        entry = LF_KEYS.get(key)
        if entry is not None and entry.unset_at_default and at_lf_default(value, entry.default):
            continue
        if entry is None or entry.answer is Answer.IMPLEMENTED and not entry.rename:
            out[key] = out.get(key, value)
        elif entry.answer is Answer.NO_EFFECT:
            notes.append(f"{key} is accepted and has no effect here ({entry.note})")
        elif entry.answer is not Answer.IMPLEMENTED:
            if (line := problem(key, value)) is not None:
                problems.append(line)
        else:
            new, convert = entry.rename
            converted = convert(value)
            if new in values and values[new] != converted:
                problems.append(f"{key} and {new} both given: {key} is LLaMA-Factory's spelling of {new}; keep one")
            elif new in out and out[new] != converted:
                problems.append(f"{key} sets {new} to {converted!r}, but another key set it to {out[new]!r}; keep one")
            else:
                out[new] = converted
    return out, problems, notes
