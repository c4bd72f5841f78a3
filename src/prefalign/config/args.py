"""Typed argument groups. Field names are the keys a LLaMA-Factory DPO config already uses.

Each field's `help` is its documentation (the README's config reference is generated from it).
Training keys are transformers' `Seq2SeqTrainingArguments`, used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefalign.errors import did_you_mean

ATTENTION = ("auto", "disabled", "sdpa", "fa2")
FINETUNING_TYPES = ("lora", "oft", "full", "freeze")
ADAPTER_TYPES = ("lora", "oft")  # peft adapters: the base stays frozen, the reference is the adapter switched off
ON_BAD_RECORD = ("error", "skip")
GALORE_OPTIMS = ("adamw_torch", "adamw_torch_fused")  # the `optim` values GaLoreAdamW stands in for
GALORE_PROJECTIONS = ("std", "reverse_std", "right", "left", "full")
OPTIMIZER_KEYS = ("use_galore", "use_apollo", "use_muon", "use_adam_mini", "use_badam")  # each replaces the Trainer's optimizer
ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")  # LLaMA-Factory's choices, each a transformers rope type
MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")
STAGE_LOSSES = {"dpo": ["sigmoid"], "kto": ["kto"]}
"""The stages prefalign runs, each with its default `pref_loss`: dpo trains on preference pairs, kto
on unpaired examples (one reply with a thumbs-up or down; paired data is split in two)."""


def is_adapter(finetuning_type: str) -> bool:
    """True when `finetuning_type` trains a peft adapter (LoRA, OFT) on a frozen base."""
    return finetuning_type in ADAPTER_TYPES


def _one_of(key: str, value, allowed) -> list[str]:
    """[] if `value` is allowed, else the problem line naming `key`, the choices and the closest one."""
    if value in allowed:
        return []
    hint = did_you_mean(value, allowed)
    return [f"{key}: {value!r} is not one of {', '.join(allowed)}" + (f"; {hint}" if hint else "")]


def _help(text: str, default=None, **kwargs):
    if isinstance(default, list):  # a list default: each instance gets its own copy
        return field(default_factory=lambda: list(default), metadata={"help": text}, **kwargs)
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = _help("Path or hub id of the SFT model to align (required).")
    adapter_name_or_path: list[str] | None = _help(
        "A LoRA adapter (or several: a YAML list or comma-separated) trained on the base, e.g. by SFT. With "
        "`finetuning_type: lora` it becomes the starting point and the reference; with full/freeze "
        "tuning it is merged into the weights first."
    )
    trust_remote_code: bool = _help("Allow model code from the model's own repository.", False)
    cache_dir: str | None = _help("Where downloaded models are cached.")
    model_revision: str = _help("Model revision (branch, tag or commit) to load.", "main")
    use_fast_tokenizer: bool = _help("Use the fast (Rust) tokenizer.", True)
    split_special_tokens: bool = _help(
        "Tokenize special tokens' text as ordinary text (transformers' `split_special_tokens`), as LLaMA-Factory.",
        False)
    resize_vocab: bool = _help(
        "Resize the model's embeddings (and an untied head) when the tokenizer outgrew them, to a multiple of 64, "
        "the new rows initialised by `init_special_tokens`; with LoRA/OFT the embedding and head are then trained "
        "and saved in full (unless `additional_target` is set). As LLaMA-Factory; turned on by `add_tokens` / "
        "`add_special_tokens` when they add a token (a template's added stop word needs it set).", False)
    add_tokens: list[str] | None = _help("Ordinary tokens to add to the tokenizer (a list or comma-separated).")
    add_special_tokens: list[str] | None = _help(
        "Special tokens to add to the tokenizer (a list or comma-separated).")
    new_special_tokens_config: str | None = _help(
        "A YAML file of `token: description`: its tokens are the special tokens to add (instead of "
        "`add_special_tokens`), the descriptions initialise them with `init_special_tokens: desc_init`.")
    init_special_tokens: str = _help(
        "How new embedding rows start: `noise_init` (mean of the old rows + N(0, 1/sqrt(hidden)) noise, seeded by "
        "`seed`), `desc_init` (mean embedding of the token's description in `new_special_tokens_config`), "
        "`desc_init_w_noise` (that + the noise).", "noise_init")
    flash_attn: str = _help(
        "Attention kernel: `auto` (sdpa where available), `disabled` (eager), `sdpa`, `fa2` "
        "(flash-attention 2, needs a CUDA GPU and the flash-attn package).",
        "auto",
    )
    rope_scaling: str | None = _help(
        "RoPE scaling for inputs longer than the model was trained on: `linear`, `dynamic`, `yarn` or `llama3` "
        "(transformers' rope types), factor ceil(model_max_length / the model's max positions), as LLaMA-Factory "
        "sets it. A model_max_length within the model's positions scales nothing (a warning says so). At "
        "inference (chat, eval; export without cutoff_len) with no model_max_length: factor 2, as LLaMA-Factory."
    )
    model_max_length: int | None = _help(
        "The longest sequence `rope_scaling` must reach (unset: `cutoff_len` in training, as LLaMA-Factory derives "
        "it; unset at inference). A resume setting."
    )
    moe_aux_loss_coef: float | None = _help(
        "Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...): add this x the router's "
        "load-balancing loss (transformers' own, the model's `router_aux_loss_coef`) to the preference loss of the "
        "policy, as LLaMA-Factory configures it. Unset or 0: no router loss."
    )
    quantization_bit: int | None = _help(
        "QLoRA: load the base model's weights in 4 or 8 bits (bitsandbytes; `pip install "
        "\"prefalign[qlora]\"`). Needs `finetuning_type: lora`; the reference is the quantized base "
        "with the adapter off."
    )
    quantization_method: str = _help("How weights are quantized: `bnb` (bitsandbytes) only.", "bnb")
    quantization_type: str = _help("4-bit data type: `nf4` (NormalFloat) or `fp4`.", "nf4")
    double_quantization: bool = _help("4-bit: also quantize the quantization constants (saves ~0.4 bit/weight).", True)
    # vision-language models (LLaMA-Factory's ProcessorArguments)
    image_max_pixels: int = _help(
        "Vision-language models: an image larger than this many pixels is scaled down (aspect kept) before "
        "the image processor, as LLaMA-Factory does.", 768 * 768)
    image_min_pixels: int = _help("Vision-language models: an image smaller than this many pixels is scaled up.",
                                  32 * 32)
    video_max_pixels: int = _help("Vision-language models: the most pixels of a video frame (each sampled frame is "
                                  "resized to at most this, aspect kept, before the video processor; Qwen2-VL, "
                                  "Qwen2.5-VL and Qwen3-VL videos, which need PyAV and torchvision).", 256 * 256)
    video_min_pixels: int = _help("Vision-language models: the fewest pixels of a video frame.", 16 * 16)
    video_fps: float = _help("Vision-language models: frames sampled per second of video (LLaMA-Factory's rule: "
                             "min(frames, video_maxlen, duration x video_fps), evenly spaced).", 2.0)
    video_maxlen: int = _help("Vision-language models: the most frames sampled from a video.", 128)
    build_demo_model: bool = _help(
        "prefalign only: build the tiny demo model at `model_name_or_path` when it is missing "
        "(used by examples/quickstart.yaml, so it runs offline).",
        False,
    )

    def problems(self) -> list[str]:
        problems = []
        if not self.model_name_or_path:
            problems.append("model_name_or_path is required: the path or hub id of the SFT model to align")
        if self.quantization_bit is not None:
            problems += _quantization_problems("quantization_bit", self.quantization_bit)
            problems += _one_of("quantization_method", self.quantization_method, ("bnb",))
            problems += _one_of("quantization_type", self.quantization_type, ("nf4", "fp4"))
        if self.quantization_bit is not None and self.resize_vocab:
            problems.append("resize_vocab: the embedding layers of a quantized model cannot be resized; remove "
                            "quantization_bit or resize_vocab")
        problems += _one_of("init_special_tokens", self.init_special_tokens,
                            ("noise_init", "desc_init", "desc_init_w_noise"))
        if self.rope_scaling is not None:
            problems += _one_of("rope_scaling", self.rope_scaling, ROPE_TYPES)
        if self.moe_aux_loss_coef is not None and self.moe_aux_loss_coef < 0:
            problems.append(f"moe_aux_loss_coef: {self.moe_aux_loss_coef} must not be negative, e.g. 0.001")
        if self.model_max_length is not None and self.model_max_length < 1:
            problems.append(f"model_max_length: {self.model_max_length} must be at least 1")
        return problems + _one_of("flash_attn", self.flash_attn, ATTENTION)


def _quantization_problems(key: str, bits: int) -> list[str]:
    return [] if bits in (4, 8) else [f"{key}: {bits} is not supported; use 4 or 8"]


@dataclass
class DataArguments:
    dataset: list[str] | None = _help(
        "Training data: a list (YAML list or comma-separated) of names from `dataset_dir/dataset_info.json`, local files or "
        "directories, or hub dataset names."
    )
    dataset_dir: str = _help("The folder holding `dataset_info.json` and the data files.", "data")
    media_dir: str | None = _help(
        "The folder that relative image and video paths of the data are in (unset: `dataset_dir`); a path "
        "not found there is used as given, as LLaMA-Factory does."
    )
    eval_dataset: list[str] | None = _help("Held-out data, same forms as `dataset`.")
    streaming: bool = _help(
        "Train on the encoded pairs as a stream (datasets' IterableDataset), in order through a shuffle buffer "
        "of `buffer_size` pairs seeded by `seed`, as LLaMA-Factory streams; needs max_steps. The pairs are "
        "encoded once into the on-disk cache first, so `precompute_ref_log_probs` still works.", False
    )
    buffer_size: int = _help("Pairs in the shuffle buffer of `streaming` (1: the data's own order).", 16384)
    default_system: str | None = _help(
        "The system message of every conversation that has none (or an empty one): training and eval records "
        "(as LLaMA-Factory's templates put it there) and `prefalign chat`."
    )
    eval_on_each_dataset: bool = _help(
        "Evaluate each `eval_dataset` on its own, in training and in `prefalign eval`: metrics named "
        "`eval_<dataset>_<metric>` (transformers' dict of eval datasets, as LLaMA-Factory passes it).", False
    )
    template: str | None = _help(
        "Chat template: unset uses the tokenizer's own; any LLaMA-Factory template name (llama3, qwen, "
        "qwen3_nothink, gemma, mistral, ...) encodes with LLaMA-Factory's slots for it, token for token as "
        "LLaMA-Factory's DPO stage does (see the README's template table)."
    )
    enable_thinking: bool | None = _help(
        "Thinking on or off: LLaMA-Factory's enable_thinking for its reasoning templates (qwen3, ...; unset: "
        "true, as in LLaMA-Factory), else passed to the tokenizer's own chat template (unset: its default)."
    )
    tool_format: str | None = _help(
        "LLaMA-Factory's tool_format: how a built-in template writes tool definitions (in the system turn) and "
        "assistant tool calls, e.g. qwen, llama3, glm4, mistral, default (unset: the template's own)."
    )
    chat_template_kwargs: dict[str, Any] | None = _help(
        "Extra arguments for the chat template, e.g. `{reasoning_effort: low}`, for training, eval and chat; "
        "a record's own `chat_template_kwargs` column goes on top."
    )
    on_unsupported_system: str = _help(
        "A system turn the chat template cannot render (it raises, e.g. Gemma 2's): `fold` joins it into the "
        "first user turn (\"system\\n\\nuser\", counted in the data summary); `error` refuses the record.",
        "fold",
    )
    on_prompt_not_prefix: str = _help(
        "A template whose rendered prompt is not a prefix of prompt + reply (e.g. Mistral-Nemo's, system text in "
        "the last user turn): `error` refuses the record; `append` keeps the prompt as rendered with the "
        "generation prompt and appends the reply as the template writes it, up to its end-of-turn token.",
        "error",
    )
    cutoff_len: int = _help(
        "Maximum tokens of prompt + response. With `template: NAME` a longer pair is cut as LLaMA-Factory "
        "cuts it (its infer_seqlen: the prompt keeps its start, the responses their head); with the "
        "tokenizer's own template the prompt loses its head first, then the responses their tails, and "
        "the prompt/response boundary is always kept.",
        2048,
    )
    max_samples: int | None = _help("Use at most this many records of each dataset (for quick runs).")
    val_size: float = _help(
        "Held out from the training data for evaluation: a fraction in (0, 1) or a count >= 1.", 0.0
    )
    mix_strategy: str = _help(
        "How several datasets are mixed: `concat`, `interleave_under` or `interleave_over`.", "concat"
    )
    interleave_probs: list[float] | None = _help("Sampling probabilities for interleaving, one per dataset (a list).")
    on_bad_record: str = _help(
        "`error` stops at the first invalid record, naming file, record and field; `skip` skips it, "
        "counts it and writes it to `rejected_records.jsonl` in the output dir.",
        "error",
    )
    preprocessing_num_workers: int | None = _help("Processes for tokenization (`datasets.map`).")
    preprocessing_batch_size: int = _help("Records per tokenization batch.", 1000)
    overwrite_cache: bool = _help("Re-tokenize even when an encoded cache exists.", False)

    def problems(self) -> list[str]:
        problems = []
        names = self.dataset or []
        if any(not name for name in names):
            problems.append(f"dataset: expected comma-separated dataset names, got {names!r}")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            problems.append(f"dataset: {', '.join(repeated)} listed more than once")
        if self.cutoff_len < 8:
            problems.append(f"cutoff_len: {self.cutoff_len} leaves no room for a prompt and a response; use at least 8")
        if self.buffer_size < 1:
            problems.append(f"buffer_size: {self.buffer_size} must be at least 1 (1 keeps the data's order)")
        if self.val_size < 0:
            problems.append(f"val_size: {self.val_size} is negative; give a fraction in (0, 1) or a count")
        if self.val_size > 0 and self.eval_dataset:
            problems.append("val_size and eval_dataset both given: hold out part of dataset OR evaluate on "
                            "eval_dataset; remove one")
        if self.max_samples is not None and (isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int)
                                             or self.max_samples < 1):
            problems.append(f"max_samples: {self.max_samples!r} must be a positive integer (at least 1)")
        problems += _one_of("on_bad_record", self.on_bad_record, ON_BAD_RECORD)
        problems += _one_of("mix_strategy", self.mix_strategy, MIX_STRATEGIES)
        probs = self.interleave_probs
        if probs is not None:
            if self.mix_strategy == "concat":
                problems.append("interleave_probs is set but mix_strategy is concat; set mix_strategy: "
                                "interleave_under (or interleave_over), or remove interleave_probs")
            elif names and len(probs) != len(names):
                problems.append(f"interleave_probs has {len(probs)} values for {len(names)} datasets: "
                                "give one probability per dataset")
            elif not all(p >= 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
                problems.append(f"interleave_probs {probs} must be non-negative and sum to 1")
        return problems + self._template_problems()

    def _template_problems(self) -> list[str]:
        """The chat-template settings: the name, its arguments, the rules for templates that refuse a record."""
        from prefalign.data.templates import (  # the template registry: pure definitions
            LF_TEMPLATE_ARGUMENTS,
            NOT_PREFIX,
            RESERVED_TEMPLATE_KWARGS,
            UNSUPPORTED_SYSTEM,
            resolve_template,
        )
        from prefalign.errors import ConfigError

        problems = _one_of("on_unsupported_system", self.on_unsupported_system, UNSUPPORTED_SYSTEM)
        if self.tool_format is not None:
            from prefalign.data.lf_tools import TOOL_FORMATS

            problems += _one_of("tool_format", self.tool_format, tuple(TOOL_FORMATS))
        problems += _one_of("on_prompt_not_prefix", self.on_prompt_not_prefix, NOT_PREFIX)
        kwargs = self.chat_template_kwargs or {}
        if not isinstance(kwargs, dict):
            problems.append(f"chat_template_kwargs: expected a mapping of argument: value, got {kwargs!r}")
            kwargs = {}
        reserved = sorted(set(kwargs) & set(RESERVED_TEMPLATE_KWARGS))
        if reserved:
            problems.append(f"chat_template_kwargs: {', '.join(reserved)} are set by prefalign itself; remove them")
        if self.enable_thinking is not None and kwargs.get("enable_thinking", self.enable_thinking) != self.enable_thinking:
            problems.append("enable_thinking and chat_template_kwargs.enable_thinking disagree; keep one")
        try:
            builtin = resolve_template(self.template).builtin
        except ConfigError as exc:
            return problems + [f"template: {exc}"]
        extra = sorted(set(kwargs) - set(LF_TEMPLATE_ARGUMENTS))
        if builtin is None and self.tool_format is not None:
            problems.append("tool_format: applies to a built-in (LLaMA-Factory) template, but template is unset (the "
                            "tokenizer's own chat template writes tools its own way); set template: or remove tool_format")
        if builtin is not None and extra:
            problems.append(f"chat_template_kwargs: {', '.join(extra)} are arguments of a tokenizer's own chat "
                            f"template, but template: {self.template} encodes with LLaMA-Factory's slots, which read "
                            "only enable_thinking; remove them, or leave template unset")
        return problems


SWANLAB_MODES = ("cloud", "online", "local", "offline", "disabled")  # cloud: LF's (and swanlab < 0.10's) online


@dataclass
class FinetuningArguments:
    stage: str = _help("Training stage: `dpo` (preference pairs, the DPO family of losses) or `kto` (unpaired "
                       "examples with a desirable/undesirable label; paired data is split in two).", "dpo")
    finetuning_type: str = _help(
        "`lora`, `oft` (orthogonal fine-tuning, peft's OFT), `full` or `freeze`. LoRA and OFT are adapters: "
        "the reference is the policy with its adapter switched off.",
        "lora",
    )
    # freeze tuning
    freeze_trainable_layers: int = _help(
        "Freeze tuning: train the last N layers (negative: the first N).", 2
    )
    freeze_trainable_modules: list[str] = _help(
        "Freeze tuning: module names inside the trainable layers (a list), or `all`.", ["all"]
    )
    freeze_extra_modules: list[str] | None = _help(
        "Freeze tuning: extra modules outside the layers to train, e.g. `embed_tokens,lm_head`."
    )
    # vision-language models (modeling/vision.py: which modules are the tower, the projector, the language model)
    freeze_vision_tower: bool = _help(
        "Vision-language models: keep the vision tower frozen (full and freeze tuning train none of it; LoRA "
        "targets none of its layers).", True)
    freeze_multi_modal_projector: bool = _help(
        "Vision-language models: keep the projector from image features to the language model frozen.", True)
    freeze_language_model: bool = _help(
        "Vision-language models: keep the language model (and its output head) frozen.", False)
    # LoRA
    lora_rank: int = _help("LoRA rank.", 8)
    lora_alpha: int | None = _help("LoRA scaling alpha (default: 2 x lora_rank).")
    lora_dropout: float = _help("LoRA dropout.", 0.0)
    lora_target: list[str] = _help(
        "Module names to adapt (a list), or `all` for every linear layer but the output head.",
        ["all"],
    )
    additional_target: list[str] | None = _help("Modules trained fully beside LoRA or OFT, e.g. `embed_tokens`.")
    use_rslora: bool = _help("Rank-stabilised LoRA scaling.", False)
    use_dora: bool = _help("Weight-decomposed LoRA (DoRA).", False)
    loraplus_lr_ratio: float | None = _help(
        "LoRA+: the learning rate of the B matrices is `learning_rate` x this ratio (A matrices keep "
        "`learning_rate`; peft's LoRA+ optimizer). LoRA only; LoRA+'s paper suggests 16."
    )
    loraplus_lr_embedding: float = _help("LoRA+: the learning rate of LoRA embedding layers' B matrices.", 1e-6)
    pissa_init: bool = _help(
        "PiSSA: a new LoRA adapter starts from the principal singular vectors of each adapted weight (peft's "
        "`init_lora_weights: pissa`), the base keeping the residual. The base with the adapter off is then not the "
        "starting model, so the reference is the residual with a frozen copy of the initial adapter (the starting "
        "model, no second model loaded); LLaMA-Factory allows PiSSA only without a reference.",
        False,
    )
    pissa_iter: int = _help("PiSSA: fast-SVD iterations (peft's `pissa_niter_N`); -1: exact SVD.", 16)
    pissa_convert: bool = _help(
        "PiSSA: also save the trained adapter converted to a plain LoRA of the original base (rank 2 x lora_rank) "
        "in `output_dir/pissa_converted`, from the initial adapter saved in `output_dir/pissa_init`, as "
        "LLaMA-Factory does: name it in adapter_name_or_path to eval, chat or export on the original base.",
        False,
    )
    # OFT
    oft_rank: int = _help(
        "OFT: the number of orthogonal blocks per adapted layer (0: derived from `oft_block_size`). Give one "
        "of oft_rank and oft_block_size, the other 0.",
        0,
    )
    oft_block_size: int = _help("OFT: the size of each orthogonal block (0: derived from `oft_rank`).", 32)
    oft_target: list[str] = _help(
        "OFT: module names to adapt (a list), or `all` for every linear layer but the output head.", ["all"]
    )
    module_dropout: float = _help("OFT: the probability of dropping a whole block's rotation in training.", 0.0)
    create_new_adapter: bool = _help(
        "With an SFT adapter in `adapter_name_or_path`: train a new adapter on top of the merged SFT "
        "adapter instead of a trainable copy of it.",
        False,
    )
    pure_bf16: bool = _help(
        "Train in bf16 without mixed precision, as LLaMA-Factory: the model loads in bf16 and full / freeze "
        "tuning's trainable weights, their gradients and the optimizer state stay bf16 (no fp32 copies, no "
        "autocast). LoRA / OFT adapter weights stay fp32 (peft's default, as in LLaMA-Factory) on the bf16 base. "
        "Not with `fp16` or DeepSpeed ZeRO-3.",
        False,
    )
    # GaLore (LLaMA-Factory's keys)
    use_galore: bool = _help(
        "GaLore: AdamW on low-rank projections of the gradients of the targeted linear weights (galore-torch's "
        "GaLoreAdamW, with LLaMA-Factory's parameter groups; `pip install \"prefalign[galore]\"`). Full or freeze "
        "tuning, `optim: adamw_torch` (or transformers' default fused AdamW), no DeepSpeed.",
        False,
    )
    galore_target: list[str] = _help("GaLore: linear module names whose weights are projected (a list), or `all`.",
                                     ["all"])
    galore_rank: int = _help("GaLore: the rank of the gradient projection.", 16)
    galore_update_interval: int = _help("GaLore: optimizer steps between recomputations of the projection.", 200)
    galore_scale: float = _help("GaLore: the scale of the projected update.", 2.0)
    galore_proj_type: str = _help("GaLore: `std`, `reverse_std`, `right`, `left` or `full` (galore-torch's projector).",
                                  "std")
    galore_layerwise: bool = _help(
        "GaLore: one optimizer per parameter, stepped as soon as its gradient is ready (saves the memory of all "
        "gradients at once). No gradient accumulation, one process, no resume; gradient clipping has no effect.",
        False)
    # APOLLO (LLaMA-Factory's keys)
    use_apollo: bool = _help(
        "APOLLO: AdamW with the second moments of low-rank projected gradients scaling the targeted linear weights' "
        "updates (apollo-torch's APOLLOAdamW, with LLaMA-Factory's parameter groups, those of GaLore; `pip install "
        "\"prefalign[apollo]\"`). Full or freeze tuning, `optim: adamw_torch`, no DeepSpeed.",
        False,
    )
    apollo_target: list[str] = _help("APOLLO: linear module names whose weights are projected (a list), or `all`.",
                                     ["all"])
    apollo_rank: int = _help("APOLLO: the rank of the gradient projection.", 16)
    apollo_update_interval: int = _help("APOLLO: optimizer steps between recomputations of the projection.", 200)
    apollo_scale: float = _help("APOLLO: the scale of the update.", 32.0)
    apollo_proj: str = _help("APOLLO: `random` (a seeded random projection) or `svd`.", "random")
    apollo_proj_type: str = _help("APOLLO: `std`, `right` or `left`.", "std")
    apollo_scale_type: str = _help("APOLLO: `channel` (one scale per channel) or `tensor`.", "channel")
    apollo_scale_front: bool = _help("APOLLO: scale the gradient before the norm-growth limiter.", False)
    apollo_layerwise: bool = _help(
        "APOLLO: one optimizer per parameter, stepped as soon as its gradient is ready, as `galore_layerwise`.", False)
    # the other optimizers of LLaMA-Factory's keys
    use_muon: bool = _help(
        "Muon (torch.optim.Muon, its update scaled as AdamW's RMS, as LLaMA-Factory's Muon) for the 2-D weights but "
        "the embeddings and the output head; AdamW (torch's) for the rest; both with `learning_rate`, `weight_decay` "
        "on every parameter, as LLaMA-Factory. No DeepSpeed.",
        False,
    )
    use_adam_mini: bool = _help(
        "Adam-mini (the adam-mini package: one second moment per block of parameters; `pip install "
        "\"prefalign[adam_mini]\"`), with the model's hidden size and head counts, as LLaMA-Factory.",
        False,
    )
    # BAdam (LLaMA-Factory's keys)
    use_badam: bool = _help(
        "BAdam: block coordinate descent, AdamW on one block of the model at a time (the badam package, "
        "`pip install \"prefalign[badam]\"`; built as LLaMA-Factory builds it). Full tuning, one process, no DeepSpeed.",
        False,
    )
    badam_mode: str = _help("BAdam: `layer` (one decoder layer at a time, BlockOptimizer) or `ratio` (a share of "
                            "every weight's entries, BlockOptimizerRatio).", "layer")
    badam_start_block: int | None = _help("BAdam layer mode: the index of the first block trained (default: the "
                                          "switch mode's first).")
    badam_switch_mode: str = _help("BAdam layer mode: the order of blocks, `ascending`, `descending`, `random` or "
                                   "`fixed`.", "ascending")
    badam_switch_interval: int = _help("BAdam layer mode: optimizer steps before the next block (-1: never switch).",
                                       50)
    badam_update_ratio: float = _help("BAdam ratio mode: the share of each weight's entries updated.", 0.05)
    badam_mask_mode: str = _help("BAdam ratio mode: `adjacent` (a run of entries) or `scatter` (random entries).",
                                 "adjacent")
    badam_verbose: int = _help("BAdam: 0 quiet, 1 print the trainable block at each switch, 2 also its parameters.",
                               0)
    # preference loss
    pref_beta: float = _help("β, the strength of the KL constraint towards the reference.", 0.1)
    pref_loss: list[str] | None = _help(
        "Loss name, or a list (YAML list or comma-separated) combined with `pref_loss_weights` (see the loss table). "
        "Default: `sigmoid` with stage: dpo, `kto` with stage: kto (`apo_zero_unpaired` is the other unpaired loss).",
    )
    pref_loss_weights: list[float] | None = _help("Weights, one per `pref_loss` entry (a list).")
    pref_ftx: float = _help("Weight of an SFT (NLL) term on the chosen responses (RPO).", 0.0)
    pref_bco_weight: float = _help("Weight of the BCO pair loss mixed into the loss.", 0.0)
    dpo_label_smoothing: float = _help("ε of conservative / robust DPO, in [0, 0.5).", 0.0)
    simpo_gamma: float = _help("SimPO target reward margin γ.", 0.5)
    discopop_tau: float = _help("DiscoPOP temperature τ.", 0.05)
    ld_alpha: float | None = _help("LD-DPO α: weight of response tokens beyond the shorter response.")
    use_weighting: bool = _help("WPO: weight each pair by its responses' probability under the policy.", False)
    f_divergence_type: str = _help(
        "f-DPO divergence: reverse_kl, forward_kl, js_divergence or alpha_divergence.", "reverse_kl"
    )
    f_alpha_divergence_coef: float = _help("α of the alpha divergence.", 1.0)
    kto_chosen_weight: float = _help("stage: kto: λ_D, the weight of the desirable examples' losses.", 1.0)
    kto_rejected_weight: float = _help("stage: kto: λ_U, the weight of the undesirable examples' losses.", 1.0)
    # reference
    ref_model: str | None = _help("A separate reference model (default: see reference strategies).")
    ref_model_adapters: list[str] | None = _help("Adapter(s) merged into `ref_model` (a list).")
    ref_model_quantization_bit: int | None = _help(
        "Load `ref_model` with its weights in 4 or 8 bits (bitsandbytes), like `quantization_bit`."
    )
    precompute_ref_log_probs: bool | None = _help(
        "Compute the reference log-probs once before training, cache them on disk and free the "
        "reference model. Default (null): on where it saves work or memory: more than one epoch reads "
        "the reference, or full tuning's frozen copy (or `ref_model`) then need not be held; off for "
        "streamed pairs and runs that end within the first epoch (the log says which and why).",
        None,
    )
    # speed
    prefix_sharing: bool | None = _help(
        "Run the prompt once per pair: chosen and rejected continue one shared prompt. Default (null): "
        "on where the model's attention allows it (the log says when it does not); false for the plain layout.",
        None,
    )
    packing: bool | None = _help(
        "Padding-free batches: the pairs of a micro-batch laid end to end in one row (or rows of "
        "`packing_length`), positions restarting per sequence and attention confined to each "
        "sequence, so no padding is computed. Combines with `prefix_sharing` (each pair: prompt "
        "once, then both replies). Default (null): on where the model's attention allows it (the log "
        "says when it does not); false for padded rows. `neat_packing` is read as the same.",
        None,
    )
    packing_length: int = _help(
        "With `packing`: at most this many tokens per row; 0 puts the whole micro-batch in one row. "
        "A pair longer than this gets a row of its own (a pair is never split, cut or dropped).",
        0,
    )
    logits_chunk_size: int = _help(
        "Response positions per chunk of the vocabulary projection (memory vs. speed).", 1024
    )
    activation_offload: bool = _help(
        "Long sequences on a GPU: keep the activations the policy's backward needs in (pinned) CPU memory "
        "instead of GPU memory (torch.autograd.graph.save_on_cpu), copied back for the backward; the same "
        "numbers, GPU memory for transfer time. On a CPU they already live in host memory: use "
        "`gradient_checkpointing: true` (recomputes each layer's activations in the backward) there.",
        False,
    )
    early_stopping_steps: int | None = _help(
        "Stop training after this many evaluations in a row without improvement of `metric_for_best_model` "
        "(transformers' EarlyStoppingCallback with this patience, as LLaMA-Factory); needs `eval_strategy` and "
        "held-out data (`val_size` or `eval_dataset`)."
    )
    # outputs
    plot_loss: bool = _help("Save loss and reward plots (PNG) to the output dir.", False)
    overwrite_output_dir: bool = _help(
        "Allow writing into a non-empty output dir (otherwise: resume or stop).", False
    )
    # SwanLab (transformers' SwanLabCallback; `pip install prefalign[swanlab]`)
    use_swanlab: bool = _help("Log the run to SwanLab (transformers' SwanLab integration; needs `swanlab`).", False)
    swanlab_project: str = _help("SwanLab project (SWANLAB_PROJECT).", "llamafactory")
    swanlab_workspace: str | None = _help("SwanLab workspace or organisation (SWANLAB_WORKSPACE; unset: yours).")
    swanlab_mode: str = _help("SwanLab mode: `cloud` (LF's word for swanlab's online), `online`, `local`, `offline` "
                              "or `disabled` (SWANLAB_MODE).", "cloud")
    swanlab_api_key: str | None = _help("SwanLab API key (SWANLAB_API_KEY; or log in with `swanlab login`).")
    swanlab_logdir: str | None = _help("Where SwanLab writes its files in local/offline mode (SWANLAB_LOG_DIR).")

    def __post_init__(self):
        if self.pref_loss is None:
            self.pref_loss = list(STAGE_LOSSES.get(self.stage, STAGE_LOSSES["dpo"]))

    def problems(self) -> list[str]:
        from prefalign.config.checks import loss_problems, loss_settings_of, stage_problems
        from prefalign.losses import needs_reference

        problems = []
        if self.swanlab_mode not in SWANLAB_MODES:
            problems.append(f"swanlab_mode: {self.swanlab_mode!r} is not one of {', '.join(SWANLAB_MODES)}")
        if self.stage not in STAGE_LOSSES:
            problems.append(f"stage: prefalign runs preference optimization (stage: dpo, or kto for unpaired "
                            f"feedback), not {self.stage!r}; set stage: dpo or stage: kto")
        else:
            problems += stage_problems(self)
        problems += _one_of("finetuning_type", self.finetuning_type, FINETUNING_TYPES)
        if self.lora_rank < 1:
            problems.append(f"lora_rank: {self.lora_rank} must be at least 1")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout: {self.lora_dropout} must be in [0, 1)")
        problems += self._adapter_type_problems()
        if self.ref_model_adapters and not self.ref_model:
            problems.append("ref_model_adapters is set without ref_model; name the reference model in ref_model")
        if self.ref_model_quantization_bit is not None:
            problems += _quantization_problems("ref_model_quantization_bit", self.ref_model_quantization_bit)
            if not self.ref_model:
                problems.append("ref_model_quantization_bit is set without ref_model; name the reference model "
                                "in ref_model")
        if self.packing_length < 0:
            problems.append(f"packing_length: {self.packing_length} is negative; give a row length in tokens, or 0 "
                            "for one row per micro-batch")
        if self.packing_length and self.packing is False:
            problems.append("packing_length is set but packing is off; set packing: true, or remove packing_length")
        if self.logits_chunk_size < 1:
            problems.append(f"logits_chunk_size: {self.logits_chunk_size} must be at least 1")
        settings = loss_settings_of(self)
        problems += loss_problems(self.pref_loss, self.pref_loss_weights, settings, has_ref_model=bool(self.ref_model))
        if self.precompute_ref_log_probs and self.pref_loss and not _unknown(self.pref_loss) \
                and not needs_reference(self.pref_loss, settings):
            problems.append(f"precompute_ref_log_probs: pref_loss={','.join(self.pref_loss)} uses no reference; "
                            "remove precompute_ref_log_probs")
        return problems

    def _adapter_type_problems(self) -> list[str]:
        """The keys of one adapter type set for another (LF refuses the same combinations)."""
        problems = []
        if self.loraplus_lr_ratio is not None:
            if self.finetuning_type != "lora":
                problems.append(f"loraplus_lr_ratio is LoRA+ and needs finetuning_type: lora, not "
                                f"{self.finetuning_type}; remove loraplus_lr_ratio")
            elif self.loraplus_lr_ratio <= 0:
                problems.append(f"loraplus_lr_ratio: {self.loraplus_lr_ratio} must be positive, e.g. 16")
        problems += self._pissa_problems() + self._galore_problems() + self._optimizer_problems()
        problems += self._badam_problems()
        if self.finetuning_type == "oft":
            if (self.oft_rank == 0) == (self.oft_block_size == 0):
                problems.append(f"oft_rank: {self.oft_rank} and oft_block_size: {self.oft_block_size}: give exactly "
                                "one of them, the other 0 (e.g. oft_rank: 0, oft_block_size: 32)")
            if self.oft_rank < 0 or self.oft_block_size < 0:
                problems.append("oft_rank and oft_block_size must not be negative")
            if not 0 <= self.module_dropout < 1:
                problems.append(f"module_dropout: {self.module_dropout} must be in [0, 1)")
            if self.use_dora or self.use_rslora:
                problems.append("use_dora / use_rslora are LoRA variants and need finetuning_type: lora; remove them")
        return problems


    def _galore_problems(self) -> list[str]:
        if not self.use_galore:
            return []
        problems = []
        if is_adapter(self.finetuning_type):
            problems.append(f"use_galore with finetuning_type: {self.finetuning_type}: GaLore projects the gradients of "
                            "full weights (LLaMA-Factory refuses it with adapters too); use finetuning_type: full or freeze")
        if self.galore_rank < 1 or self.galore_update_interval < 1:
            problems.append("galore_rank and galore_update_interval must be at least 1")
        problems += _one_of("galore_proj_type", self.galore_proj_type, GALORE_PROJECTIONS)
        return problems

    def _optimizer_problems(self) -> list[str]:
        """The LLaMA-Factory optimizer keys: one optimizer at a time; APOLLO's settings (GaLore's: above)."""
        chosen = [key for key in OPTIMIZER_KEYS if getattr(self, key)]
        problems = [f"{' and '.join(chosen)} both given: each replaces the optimizer; keep one"] if len(chosen) > 1 else []
        if self.loraplus_lr_ratio is not None and chosen:
            problems.append(f"loraplus_lr_ratio and {chosen[0]} both given: each replaces the optimizer; keep one")
        if self.use_apollo:
            if is_adapter(self.finetuning_type):
                problems.append(f"use_apollo with finetuning_type: {self.finetuning_type}: APOLLO projects the "
                                "gradients of full weights (LLaMA-Factory refuses it with adapters too); use "
                                "finetuning_type: full or freeze")
            if self.apollo_rank < 1 or self.apollo_update_interval < 1:
                problems.append("apollo_rank and apollo_update_interval must be at least 1")
            problems += _one_of("apollo_proj", self.apollo_proj, ("random", "svd"))
            problems += _one_of("apollo_proj_type", self.apollo_proj_type, ("std", "right", "left"))
            problems += _one_of("apollo_scale_type", self.apollo_scale_type, ("channel", "tensor"))
        return problems

    def _badam_problems(self) -> list[str]:
        if not self.use_badam:
            return []
        problems = []
        if self.finetuning_type != "full":
            problems.append(f"use_badam with finetuning_type: {self.finetuning_type}: BAdam trains blocks of the full "
                            "model (LLaMA-Factory refuses it with LoRA too); use finetuning_type: full")
        problems += _one_of("badam_mode", self.badam_mode, ("layer", "ratio"))
        problems += _one_of("badam_switch_mode", self.badam_switch_mode, ("ascending", "descending", "random", "fixed"))
        problems += _one_of("badam_mask_mode", self.badam_mask_mode, ("adjacent", "scatter"))
        if self.badam_switch_interval == 0 or self.badam_switch_interval < -1:
            problems.append(f"badam_switch_interval: {self.badam_switch_interval} must be at least 1 (or -1: never switch)")
        if not 1e-6 < self.badam_update_ratio <= 1:
            problems.append(f"badam_update_ratio: {self.badam_update_ratio} must be in (0, 1]")
        return problems

    def _pissa_problems(self) -> list[str]:
        if not self.pissa_init:
            return ["pissa_convert converts a PiSSA adapter and needs pissa_init: true; remove pissa_convert"] \
                if self.pissa_convert else []
        problems = []
        if self.finetuning_type != "lora":
            problems.append(f"pissa_init is a LoRA initialisation and needs finetuning_type: lora, not "
                            f"{self.finetuning_type}; remove pissa_init")
        if self.pissa_iter < 1 and self.pissa_iter != -1:
            problems.append(f"pissa_iter: {self.pissa_iter} must be at least 1 (fast-SVD iterations), or -1 for exact SVD")
        return problems


def _unknown(names: list[str]) -> bool:
    from prefalign.losses import LOSSES

    return any(name not in LOSSES for name in names)


@dataclass
class ExportArguments:
    """`prefalign export`: merge the LoRA adapter(s) into the base and write a standalone model."""

    export_dir: str | None = _help("Where `prefalign export` writes the merged model (required by export).")
    export_size: float = _help("Largest safetensors shard of the exported model, in GB (10^9 bytes).", 5.0)
    export_overwrite: bool = _help("Allow `prefalign export` to write into a non-empty export_dir.", False)
    export_legacy_format: bool = _help(
        "LLaMA-Factory key; only `false` is accepted: transformers 5 writes safetensors, not .bin files.", False
    )

    def problems(self) -> list[str]:
        problems = []
        if self.export_size <= 0:
            problems.append(f"export_size: {self.export_size} must be a positive number of GB, e.g. 5")
        if self.export_legacy_format:
            problems.append("export_legacy_format: transformers 5 saves safetensors only; set export_legacy_format: false")
        return problems


@dataclass
class GenerationArguments:
    """`prefalign chat`: how replies are generated (transformers' `generate`)."""

    max_new_tokens: int = _help("Most tokens generated per reply.", 1024)
    do_sample: bool = _help("Sample (true) or decode greedily (false).", True)
    temperature: float = _help("Sampling temperature (with do_sample).", 0.95)
    top_p: float = _help("Nucleus sampling: keep the smallest token set with this probability mass.", 0.7)
    top_k: int = _help("Sample among the k most likely tokens (0: no limit).", 50)
    repetition_penalty: float = _help("Penalty > 1 for repeating tokens (1.0: none).", 1.0)

    def problems(self) -> list[str]:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens: {self.max_new_tokens} must be at least 1")
        if self.do_sample and self.temperature <= 0:
            problems.append(f"temperature: {self.temperature} must be > 0 with do_sample: true (or set do_sample: false)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p: {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k: {self.top_k} must be >= 0")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty: {self.repetition_penalty} must be > 0")
        return problems


@dataclass
class RunConfig:
    """Everything a run needs, after parsing and validation."""

    model: ModelArguments
    data: DataArguments
    finetuning: FinetuningArguments
    training: "transformers.Seq2SeqTrainingArguments"  # noqa: F821
    raw: dict  # the resolved key/values (defaults included), saved as run_config.yaml
    export: ExportArguments = field(default_factory=ExportArguments)
    generation: GenerationArguments = field(default_factory=GenerationArguments)

    def __post_init__(self):
        from prefalign.config.checks import loss_settings_of
        from prefalign.losses import Objective

        ft = self.finetuning
        weights = ft.pref_loss_weights or [1.0] * len(ft.pref_loss)
        # built once here; every command reads it from the config
        self.objective = Objective(tuple(ft.pref_loss), tuple(float(w) for w in weights), loss_settings_of(ft))
