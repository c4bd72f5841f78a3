"""The README.md model card of a run's output dir, in the Hugging Face Hub's convention.

YAML front matter (base_model, library_name, tags, datasets) for the Hub's metadata, then what a
reader needs: the base model, the data, the loss and hyper-parameters, the final metrics and a
snippet that loads the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from prefalign.config.args import is_adapter as is_adapter_type
from prefalign.data.summary import DataSummary
from prefalign.scoring import reference_plan

_HYPER_PARAMETERS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "optim", "bf16", "fp16", "seed",
)


def _front_matter(config, is_adapter: bool, vision_language: bool) -> dict:
    datasets = list(config.data.dataset or []) + list(config.data.eval_dataset or [])
    meta = {
        "base_model": config.model.model_name_or_path,
        "library_name": "peft" if is_adapter else "transformers",
        "pipeline_tag": "image-text-to-text" if vision_language else "text-generation",
        "tags": ["dpo", "prefalign"] + ([config.finetuning.finetuning_type] if is_adapter else []),
    }
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))
    return meta


def _method(config, is_adapter: bool, vision_language: bool, out: Path) -> list[str]:
    ft, model = config.finetuning, config.model
    lines = []
    adapters = list(model.adapter_name_or_path or [])
    if adapters:
        if not is_adapter_type(ft.finetuning_type):
            what = " (merged into the weights before training)"
        elif ft.create_new_adapter:
            what = " (merged; a new adapter was trained on top)"
        else:
            what = ""
        lines.append(f"- Starting adapter(s): {', '.join(f'`{a}`' for a in adapters)}{what}")
    if ft.finetuning_type == "lora":
        lines.append(f"- Method: LoRA, rank {ft.lora_rank}, alpha {ft.lora_alpha or 2 * ft.lora_rank}, "
                     f"dropout {ft.lora_dropout}, target `{','.join(ft.lora_target)}`"
                     + (", rsLoRA" if ft.use_rslora else "") + (", DoRA" if ft.use_dora else "")
                     + (f", LoRA+ ratio {ft.loraplus_lr_ratio:g}" if ft.loraplus_lr_ratio else ""))
    elif ft.finetuning_type == "oft":
        size = f"{ft.oft_rank} blocks" if ft.oft_rank else f"blocks of {ft.oft_block_size}"
        lines.append(f"- Method: OFT, {size}, module dropout {ft.module_dropout}, target `{','.join(ft.oft_target)}`")
    elif ft.finetuning_type == "freeze":
        lines.append(f"- Method: freeze tuning, trainable layers {ft.freeze_trainable_layers}, "
                     f"modules `{','.join(ft.freeze_trainable_modules)}`")
    else:
        lines.append("- Method: full fine-tuning")
    weights = f" (weights {','.join(f'{w:g}' for w in ft.pref_loss_weights)})" if ft.pref_loss_weights else ""
    lines.append(f"- Loss: `{','.join(ft.pref_loss)}`{weights}, β = {ft.pref_beta}"
                 + "".join(f", {k} = {v}" for k, v in _changed_loss_settings(config).items())
                 + " (see prefalign's docs/losses.md)")
    if vision_language:
        parts = [f"{name} {'frozen' if frozen else 'trained'}" for name, frozen in (
            ("vision tower", ft.freeze_vision_tower), ("projector", ft.freeze_multi_modal_projector),
            ("language model", ft.freeze_language_model))]
        lines.append(f"- Vision-language model: {', '.join(parts)} (image_max_pixels {model.image_max_pixels}, "
                     f"image_min_pixels {model.image_min_pixels})")
        lines.append(_processor_line(config, out))
    lines.append(f"- Reference: {reference_plan(config, 'train').description}")
    return lines


def _processor_line(config, out: Path) -> str:
    """The image processing of a vision-language run: the processor saved beside the model (modeling/vision.
    save_processor) and the pixel limits its images were resized to first, as LLaMA-Factory resizes them."""
    model = config.model
    saved = out / "preprocessor_config.json"
    if not saved.is_file():
        return (f"- Processor: the base model's (none was saved in this folder); images were resized to at most "
                f"image_max_pixels {model.image_max_pixels} and at least image_min_pixels {model.image_min_pixels} "
                "pixels before it")
    settings = json.loads(saved.read_text())
    name = settings.get("image_processor_type") or settings.get("processor_class") or "image processor"
    size = settings.get("size") if isinstance(settings.get("size"), dict) else {}
    limits = ", ".join([f"size {key} {value}" for key, value in size.items()]
                       + [f"{key} {settings[key]}" for key in ("min_pixels", "max_pixels", "patch_size", "merge_size")
                          if key in settings])
    return (f"- Processor: `{name}`{f' ({limits})' if limits else ''}, saved beside the model "
            f"(`preprocessor_config.json`{', `processor_config.json`' if (out / 'processor_config.json').is_file() else ''}); "
            f"the training images were first resized to at most image_max_pixels {model.image_max_pixels} and at "
            f"least image_min_pixels {model.image_min_pixels} pixels (LLaMA-Factory's rule): give new images the same.")


def _vision_language(config) -> bool:
    """Whether the run's base model is a vision-language model (its config, read from the base's folder)."""
    from transformers import AutoConfig

    from prefalign.modeling.vision import is_vision_language

    try:
        # local files only: the run loaded the base already, and a card is never worth a network wait
        base = AutoConfig.from_pretrained(config.model.model_name_or_path, local_files_only=True,
                                          trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError):
        return False
    return is_vision_language(base)


def _changed_loss_settings(config) -> dict:
    from prefalign.config.args import FinetuningArguments

    defaults = FinetuningArguments()
    keys = ("pref_ftx", "pref_bco_weight", "dpo_label_smoothing", "simpo_gamma", "discopop_tau", "ld_alpha",
            "use_weighting", "f_divergence_type", "f_alpha_divergence_coef", "kto_chosen_weight", "kto_rejected_weight")
    return {k: getattr(config.finetuning, k) for k in keys if getattr(config.finetuning, k) != getattr(defaults, k)}


def _data(config, summary: DataSummary | None) -> list[str]:
    lines = []
    if summary:
        unit = "examples" if summary.unpaired else "pairs"
        for name, count in summary.datasets.items():
            skipped = summary.skipped.get(name, 0)
            split = summary.split_pairs.get(name)
            lines.append(f"- `{name}`: {count} {unit}" + (f" ({skipped} records skipped)" if skipped else "")
                         + (f" ({split} preference pairs, each split into a desirable and an undesirable example)"
                            if split else ""))
        for split, stats in summary.splits():
            labels = (f" ({stats.desirable} desirable, {stats.undesirable} undesirable)"
                      if stats.desirable is not None else "")
            lines.append(f"- {split}: {stats.pairs} {unit}{labels}, {stats.truncated_prompts} prompts and "
                         f"{stats.truncated_responses} responses truncated")
    else:
        data = config.data
        lines.append(f"- dataset: `{','.join(data.dataset or [])}`"
                     + (f", eval: `{','.join(data.eval_dataset)}`" if data.eval_dataset else ""))
    from prefalign.data.chat import template_arguments
    from prefalign.data.templates import resolve_template

    choice = resolve_template(config.data.template)
    kwargs = template_arguments(config.data)
    args = f" with {kwargs}" if kwargs else ""
    lines.append(f"- Chat template: {choice.description}{args}; "
                 f"cutoff_len {config.data.cutoff_len} tokens")
    return lines


def _vision_usage(config, path: str, is_adapter: bool) -> str:
    """The snippet for a vision-language model: its Auto class, the processor saved beside it, one image."""
    base = (f'base = AutoModelForImageTextToText.from_pretrained("{config.model.model_name_or_path}")\n'
            f'model = PeftModel.from_pretrained(base, "{path}")\n' if is_adapter else
            f'model = AutoModelForImageTextToText.from_pretrained("{path}")\n')
    return (("from peft import PeftModel\n" if is_adapter else "")
            + "from PIL import Image\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n\n"
            + base + f'processor = AutoProcessor.from_pretrained("{path}")  # the processor saved beside the model\n\n'
            'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]\n'
            "text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)\n"
            'inputs = processor(text=[text], images=[Image.open("photo.png")], return_tensors="pt")\n'
            "output = model.generate(**inputs, max_new_tokens=64)\n"
            'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n')


def _usage(config, out: Path, is_adapter: bool, vision_language: bool = False) -> str:
    from prefalign.data.templates import resolve_template

    path = str(out)
    load = (f'from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n'
            "# the base model is the one named in adapter_config.json\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{path}")\n'
            if is_adapter else
            f'from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
            f'model = AutoModelForCausalLM.from_pretrained("{path}")\n')
    code = (load + f'tokenizer = AutoTokenizer.from_pretrained("{path}")\n\n'
            'messages = [{"role": "user", "content": "Hello! Who are you?"}]\n'
            "text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)\n"
            'inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)\n'
            "output = model.generate(**inputs, max_new_tokens=64)\n"
            'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n')
    if vision_language:
        code = _vision_usage(config, path, is_adapter)
    notes = []
    if resolve_template(config.data.template).builtin is not None:
        notes.append(f"The model was trained with LLaMA-Factory's `{config.data.template}` template (its slots, "
                     "encoded slot by slot), which may differ from the tokenizer's own: `prefalign export` writes it into the exported tokenizer.")
    if is_adapter and len(config.model.adapter_name_or_path or []) > 1:
        notes.append("This adapter was trained on the base with the earlier starting adapters merged; merge them "
                     "first (or use `prefalign export` with all of them in adapter_name_or_path).")
    standalone = ("A standalone model with the adapter merged: `prefalign export CONFIG.yaml "
                  f"adapter_name_or_path={path} export_dir=merged`." if is_adapter else "")
    return "\n\n".join([f"```python\n{code}```"] + notes + ([standalone] if standalone else [])
                       + [f"Or chat in the terminal: `prefalign chat CONFIG.yaml "
                          f"{'adapter_name_or_path' if is_adapter else 'model_name_or_path'}={path}"
                          + (" --image PATH" if vision_language else "") + "`."])


def _metrics_table(metrics: dict) -> str:
    if not metrics:
        return "No final metrics were saved."
    keep = {k: v for k, v in sorted(metrics.items()) if not k.endswith(("_runtime", "_per_second", "total_flos"))}
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in keep.items())
    return f"| metric | value |\n|---|---|\n{rows}"


def model_card(config, out: str | Path) -> str:
    """The README.md text for the run whose config is `config` and whose files are in `out`."""
    from prefalign import __version__

    out = Path(out)
    is_adapter = (out / "adapter_config.json").is_file()
    summary = DataSummary.read(out)
    metrics = json.loads((out / "all_results.json").read_text()) if (out / "all_results.json").is_file() else {}
    args = config.training
    values = {k: getattr(args, k, None) for k in _HYPER_PARAMETERS}
    if values["max_steps"] is not None and values["max_steps"] > 0:  # max_steps overrides num_train_epochs
        values["num_train_epochs"] = None
    else:
        values["max_steps"] = None
    hyper = "\n".join(f"| {k} | {getattr(v, 'value', v)} |" for k, v in values.items() if v is not None)
    versions = _versions(__version__)
    vision_language = _vision_language(config)  # the base's config, read once for both sections
    front = yaml.safe_dump(_front_matter(config, is_adapter, vision_language), sort_keys=False, allow_unicode=True)
    what = "a LoRA adapter for" if is_adapter else "a fine-tune of"
    return "\n".join([
        f"---\n{front}---",
        f"# {out.resolve().name}",
        "",
        f"This is {what} `{config.model.model_name_or_path}`, aligned to human preferences with "
        f"`{','.join(config.finetuning.pref_loss)}` ("
        + ("KTO-style alignment on unpaired desirable/undesirable feedback" if config.objective.unpaired
           else "preference optimisation in the DPO family") + ") by prefalign.",
        "",
        "## Training",
        "",
        f"- Base model: `{config.model.model_name_or_path}`",
        *_method(config, is_adapter, vision_language, out),
        "",
        "### Data",
        "",
        *_data(config, summary),
        "",
        "### Hyper-parameters",
        "",
        "| key | value |\n|---|---|\n" + hyper,
        "",
        "The full resolved configuration is in `run_config.yaml`; curves and example pairs in `report.html`.",
        "",
        "## Results",
        "",
        _metrics_table(metrics),
        "",
        "Rewards are β × log(π / π_ref) of the chosen and rejected replies; `rewards/accuracies` is the share of "
        "pairs whose chosen reward exceeds the rejected one.",
        "",
        "## How to use",
        "",
        _usage(config, out, is_adapter, vision_language),
        "",
        "## Framework versions",
        "",
        versions,
        "",
    ])


def _versions(prefalign_version: str) -> str:
    import importlib.metadata as md

    lines = [f"- prefalign {prefalign_version}"]
    for package in ("transformers", "peft", "torch", "datasets"):
        try:
            lines.append(f"- {package} {md.version(package)}")
        except md.PackageNotFoundError:
            pass
    return "\n".join(lines)


def write_model_card(config, out: str | Path) -> Path:
    path = Path(out) / "README.md"
    path.write_text(model_card(config, out), encoding="utf-8")
    return path
