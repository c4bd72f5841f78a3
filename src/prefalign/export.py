"""`prefalign export`: merge the LoRA adapter(s) into the base and write a standalone model.

The result is what `AutoModelForCausalLM.from_pretrained(export_dir)` loads with no peft: sharded
safetensors (at most `export_size` GB each), config, generation config and tokenizer. Where the
config names a built-in `template:`, it becomes the exported tokenizer's chat template and its
end-of-turn token joins the generation config's stop tokens, so the model chats as it was trained.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefalign.config import RunConfig
from prefalign.errors import ConfigError, PrefalignError
from prefalign.modeling.load import load_causal_lm, merge_adapters
from prefalign.modeling.vision import is_vision_language, save_processor

logger = logging.getLogger(__name__)


def check_export(config: RunConfig) -> Path:
    """Refuse, with one line saying how to fix it, an export that cannot or should not run; return export_dir."""
    exp = config.export
    if not exp.export_dir:
        raise ConfigError("export_dir is required: the folder prefalign export writes the merged model to")
    out = Path(exp.export_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export_dir: {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not exp.export_overwrite:
        raise ConfigError(f"export_dir: {out} is not empty; set export_overwrite: true or choose another export_dir")
    if config.model.quantization_bit is not None:
        raise ConfigError(
            f"quantization_bit: {config.model.quantization_bit}: a LoRA adapter cannot be merged into quantized "
            "weights exactly; remove quantization_bit to merge into the unquantized base (a QLoRA adapter loads on it)"
        )
    quantization = _quantization_config(config)
    if quantization is not None:
        method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", "unknown")
        raise ConfigError(
            f"model_name_or_path: {config.model.model_name_or_path} is quantized ({method}), and a LoRA adapter "
            "cannot be merged into quantized weights exactly; export from the unquantized (fp16/bf16/fp32) base model"
        )
    return out


def _quantization_config(config: RunConfig):
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(
            config.model.model_name_or_path, trust_remote_code=config.model.trust_remote_code,
            revision=config.model.model_revision, cache_dir=config.model.cache_dir)
    except (OSError, ValueError) as exc:
        raise PrefalignError(f"model_name_or_path: cannot read the config of "
                             f"{config.model.model_name_or_path!r}: {str(exc).splitlines()[0]}") from None
    return getattr(model_config, "quantization_config", None)


def _tokenizer_source(config: RunConfig) -> str:
    """The last adapter's folder when it holds a tokenizer (the one training used and saved), else the base."""
    adapters = list(config.model.adapter_name_or_path or [])
    if adapters and (Path(adapters[-1]) / "tokenizer_config.json").is_file():
        return adapters[-1]
    return config.model.model_name_or_path


def run_export(config: RunConfig) -> Path:
    """Merge `adapter_name_or_path` into `model_name_or_path` and save a standalone model to `export_dir`."""
    from transformers import AutoTokenizer

    from prefalign.data.chat import ChatRenderer
    from prefalign.data.templates import resolve_template, stop_token_ids, tool_macros
    from prefalign.data.vocab import extend_tokenizer

    out = check_export(config)
    adapters = list(config.model.adapter_name_or_path or [])
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(config),
                                              trust_remote_code=config.model.trust_remote_code)
    # the tokens training added (already in a run's saved tokenizer: nothing is added twice), and the base
    # resized to them before the adapter, whose saved embedding and head have the new rows, is merged
    vocab = extend_tokenizer(tokenizer, config.model, config.data, seed=config.training.seed)
    # "auto": the dtype the base was saved in; the adapter's fp32 delta is added in that dtype.
    model = load_causal_lm(config.model.model_name_or_path, config.model, "auto", vocab=vocab)
    model = merge_adapters(model, adapters)
    if not adapters:
        logger.info("export: no adapter_name_or_path; the model is re-saved as it is (resharded, with its tokenizer)")
    model.config.use_cache = True  # load_causal_lm turns it off for training; generation wants it

    template = config.data.template
    builtin = resolve_template(template).builtin
    if builtin is not None:
        tokenizer.chat_template = builtin.jinja
        if tool_macros(builtin.lf) is None:
            logger.info("export: the chat template written for template: %s refuses tools: its tool format (%s) is "
                        "not written in Jinja; render tool conversations with prefalign chat", template,
                        builtin.lf.tool_format)
    # the ids chat stops at (LLaMA-Factory's stop words for a built-in), or the eos alone without a template
    stop_ids = (ChatRenderer.from_config(tokenizer, config.data).stop_ids
                if builtin is not None or tokenizer.chat_template else stop_token_ids(tokenizer, None))
    generation = model.generation_config
    eos = generation.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    generation.eos_token_id = eos + [i for i in stop_ids if i not in eos] or None
    if generation.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id

    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
        stale.unlink()  # export_overwrite: old shards would otherwise linger beside the new ones
    model.save_pretrained(out, max_shard_size=int(config.export.export_size * 10**9))
    tokenizer.save_pretrained(out)
    if is_vision_language(model.config):  # the image processor beside the model, as a hub checkpoint has it
        save_processor(config.model, out)
    print(f"Exported {config.model.model_name_or_path}"
          f"{' + ' + ', '.join(adapters) if adapters else ''} to {out.resolve()}", flush=True)
    return out

