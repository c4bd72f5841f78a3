"""Vision-language models: which modules are the vision tower, the projector and the language model, what
trains of each, and the image processing a run's template needs.

The module keys are LLaMA-Factory 0.9.5's (model/model_utils/visual.py, COMPOSITE_MODELS), matched as
substrings of parameter and module names, as LLaMA-Factory matches them:
- full and freeze tuning never train a frozen part (`freeze_vision_tower`, `freeze_multi_modal_projector`,
  both true by default; `freeze_language_model`, false);
- LoRA's `lora_target: all` takes the linear layers outside the projector (always) and outside the vision
  tower (unless `freeze_vision_tower: false`) and the output head; named targets are matched by their full
  module names, leaving out the frozen parts and the modules LoRA cannot wrap (patch embeddings).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from prefalign.errors import PrefalignError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Composite:
    projector: tuple[str, ...]
    vision: tuple[str, ...]
    language: tuple[str, ...] = ("language_model", "lm_head")
    lora_conflicts: tuple[str, ...] = ()
    plain_only: str | None = None
    """Why its batches take the plain layout only (modeling/layout.unsupported), in a phrase; None where its
    image features follow a packed or prefix-shared row (each image's features into its tokens, in row
    order) and so do its rotary positions: 1-D ones from the collator (LLaVA), Qwen's 3-D ones from the
    model's own `get_rope_index` per sequence (modeling/prefix.py); tests/modeling/test_vision.py."""

    @property
    def tower(self) -> str:
        """The vision tower's module name (the last part of its full name): `visual`, `vision_tower`."""
        return self.vision[0].split(".")[0]


_QWEN = Composite(("visual.merger",), ("visual.patch_embed", "visual.blocks"), lora_conflicts=("patch_embed",))
COMPOSITES = {
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": Composite(("visual.merger",), ("visual.pos_embed", "visual.patch_embed", "visual.blocks",
                                               "visual.deepstack_merger_list"), lora_conflicts=("patch_embed",)),
    "llava": Composite(("multi_modal_projector",), ("vision_tower",)),
    "gemma3": Composite(("multi_modal_projector",), ("vision_tower",),
                        plain_only="Gemma 3's image tokens attend to each other in both directions, which "
                                   "prefalign's packed and prefix-shared attention do not"),
}
"""The families prefalign loads as vision-language models, by `model_type`."""


def is_vision_language(config) -> bool:
    """True for a composite vision-language model (its config has a vision part)."""
    return getattr(config, "vision_config", None) is not None


def composite(config) -> Composite | None:
    return COMPOSITES.get(getattr(config, "model_type", None)) if is_vision_language(config) else None


def frozen_keys(config, ft) -> set[str]:
    """The module keys that `ft` (FinetuningArguments) keeps frozen in a vision-language model (LF's
    get_forbidden_modules); empty for any other model."""
    parts = composite(config)
    if parts is None:
        return set()
    keys = set()
    if ft.freeze_vision_tower:
        keys.update(parts.vision)
    if ft.freeze_multi_modal_projector:
        keys.update(parts.projector)
    if ft.freeze_language_model:
        keys.update(parts.language)
    return keys


def freeze_parts(model, ft) -> None:
    """Full and freeze tuning: the frozen parts' parameters stop requiring grad."""
    keys = frozen_keys(model.config, ft)
    for name, param in model.named_parameters():
        if any(key in name for key in keys):
            param.requires_grad_(False)


def image_features_fixed(model) -> bool:
    """True when `model`'s (a vision-language policy's) vision tower and projector neither train nor drop
    out: its image features are then what a reference with the same tower computes (scoring reuses them)."""
    import torch

    from prefalign.modeling.logprobs import causal_lm

    lm = causal_lm(model)
    parts = composite(lm.config)
    if parts is None:
        return False
    keys = (*parts.vision, *parts.projector)
    for name, module in lm.named_modules():
        if not any(key in name for key in keys):
            continue
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            return False
        rate = module.p if isinstance(module, torch.nn.Dropout) else getattr(module, "dropout", 0.0)
        if module.training and isinstance(rate, float) and rate > 0:  # a layer or an attention's own dropout
            return False
    return True


class TowerCounter:
    """How many times the vision tower encodes each trained pair's images, policy and reference together:
    1 when it runs once per pair and the reference reuses the features, 4 for a plain concatenated batch
    with a live reference (each of its two rows encodes its copy, for both models).

    Forward hooks on the tower of each of `models` count the images a call encodes (a Qwen tower's
    `grid_thw` rows, a LLaVA tower's `pixel_values`) while `counting(batch)` is open; the batch's own
    images are counted once each, however often its layout places them (modeling/logprobs.distinct_images)."""

    def __init__(self, models):
        from prefalign.modeling.logprobs import causal_lm

        self.encoded = self.images = 0.0
        self._active = False
        towers = {}
        for model in models:
            lm = causal_lm(model) if model is not None else None
            parts = composite(lm.config) if lm is not None else None
            if parts is None:
                continue
            for name, module in lm.named_modules():
                if name.rsplit(".", 1)[-1] == parts.tower:
                    towers[id(module)] = module
        self._handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in towers.values()]

    def _hook(self, module, args, kwargs, output) -> None:
        if not self._active:
            return
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.encoded += len(grid) if grid is not None else len(args[0] if args else kwargs["pixel_values"])

    def counting(self, batch: dict):
        import contextlib

        from prefalign.modeling.logprobs import distinct_images

        images = distinct_images(batch)
        if not images or not self._handles:
            return contextlib.nullcontext()
        self.images += images

        @contextlib.contextmanager
        def active():
            self._active = True
            try:
                yield
            finally:
                self._active = False
        return active()

    def totals(self):
        import torch

        return torch.tensor([self.encoded, self.images], dtype=torch.float64)

    def report(self, totals=None) -> dict[str, float]:
        """`vision/tower_runs_per_pair` from (summed) totals, then a fresh interval; {} without images."""
        encoded, images = (totals if totals is not None else self.totals()).tolist()
        self.encoded = self.images = 0.0
        return {"vision/tower_runs_per_pair": encoded / images} if images else {}


def lora_targets(model, ft, targets: list[str]):
    """peft's `target_modules` for `targets` (a list, or ["all"]) on `model`: unchanged for a text model; for
    a vision-language model the full names of the matching linear layers outside the frozen parts."""
    parts = composite(model.config)
    if parts is None:
        return "all-linear" if targets == ["all"] else list(targets)
    import torch

    forbidden = frozen_keys(model.config, ft) | set(parts.lora_conflicts)
    if targets == ["all"]:
        forbidden |= {"lm_head", *parts.projector}
        if ft.freeze_vision_tower:
            forbidden.update(parts.vision)
        leaves = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and not any(key in name for key in forbidden)}
    else:
        leaves = set(targets)
    names = [name for name, module in model.named_modules()
             if name and name.rsplit(".", 1)[-1] in leaves and not any(key in name for key in forbidden)]
    if not names:
        raise PrefalignError(f"lora_target: {','.join(targets)} matches no layer outside the frozen parts "
                             f"({', '.join(sorted(forbidden))}); name the language model's layers, or unfreeze a part")
    return names


def text_config(config):
    """The language model's config (a composite model's text_config; a text model's own)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def load_vision(model_args, data_args, tokenizer):
    """The run's image processing (data/vision.VisionProcessor) when its template is a vision template
    prefalign implements and the model ships an image processor; None otherwise (text-only encoding).

    The processor is the model's own (transformers' AutoProcessor; without torchvision its image processor
    alone, AutoImageProcessor picks the PIL one), with LLaMA-Factory's pixel limits of `model_args`.
    """
    from prefalign.data.templates import resolve_template
    from prefalign.data.vision import VisionProcessor, plugin_for

    builtin = resolve_template(data_args.template).builtin if data_args.template else None
    plugin = plugin_for(builtin.lf.mm_plugin) if builtin is not None else None
    if plugin is None:
        return None
    path = model_args.model_name_or_path
    attributes = _processor_attributes(path, model_args)
    image_processor = _image_processor(path, model_args)
    if image_processor is None:
        return None
    needed = _COUNT_ATTRIBUTE.get(plugin.count)
    if needed and not attributes.get(needed):
        raise PrefalignError(f"template: {data_args.template}: {path!r} has no processor settings ({needed} in "
                             "processor_config.json), so its image token count is unknown; use the model's own "
                             "processor files")
    image_token_id = tokenizer.convert_tokens_to_ids(plugin.image_token)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise PrefalignError(f"template: {data_args.template} writes images as {plugin.image_token}, which the "
                             f"tokenizer of {path!r} does not have; is it a model of that template's family?")
    video_processor = _video_processor(path, model_args) if plugin.video_token else None
    return VisionProcessor(plugin, image_processor, model_args.image_max_pixels, model_args.image_min_pixels,
                           patch_size=attributes.get("patch_size"),
                           num_additional_image_tokens=attributes.get("num_additional_image_tokens") or 0,
                           vision_feature_select_strategy=attributes.get("vision_feature_select_strategy") or "default",
                           image_token_id=image_token_id, image_seq_length=attributes.get("image_seq_length"),
                           video_processor=video_processor, video_max_pixels=model_args.video_max_pixels,
                           video_min_pixels=model_args.video_min_pixels, video_fps=model_args.video_fps,
                           video_maxlen=model_args.video_maxlen,
                           video_token_id=tokenizer.convert_tokens_to_ids(plugin.video_token) if plugin.video_token
                           else None,
                           seconds_per_grid="second_per_grid_ts" in attributes.get("model_input_names", ()))


def _video_processor(path: str, model_args):
    """The model's video processor (transformers' AutoVideoProcessor), or None where it cannot be built: its
    processing runs on torchvision, and PyAV decodes the files (data/media.video_refusal says which is missing)."""
    import importlib.util

    if importlib.util.find_spec("av") is None:
        return None
    try:
        import torchvision  # noqa: F401
        from transformers import AutoVideoProcessor

        return AutoVideoProcessor.from_pretrained(path, trust_remote_code=model_args.trust_remote_code,
                                                  revision=model_args.model_revision, cache_dir=model_args.cache_dir)
    except Exception as exc:  # noqa: BLE001 - a torchvision built for another torch fails while registering its ops
        logger.info("No video processor for %s (%s): videos are refused", path, str(exc).splitlines()[0])
        return None


def _image_processor(path: str, model_args):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path, trust_remote_code=model_args.trust_remote_code,
                                                  revision=model_args.model_revision, cache_dir=model_args.cache_dir)
    except (OSError, ValueError) as exc:
        logger.info("No image processor in %s (%s): images are refused", path, str(exc).splitlines()[0])
        return None


_ATTRIBUTES = ("patch_size", "num_additional_image_tokens", "vision_feature_select_strategy", "image_seq_length")
_COUNT_ATTRIBUTE = {"patches": "patch_size", "fixed": "image_seq_length"}
"""The processor setting an image's token count is computed from, by the plugin's `count` (data/vision.py)."""


def _processor_attributes(path: str, model_args) -> dict:
    """The processor's own settings (LLaVA's patch_size, num_additional_image_tokens,
    vision_feature_select_strategy; Gemma 3's image_seq_length): from transformers' AutoProcessor where it
    builds one, else read as data from processor_config.json (a Qwen-VL processor cannot be built without
    torchvision; it needs none)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=model_args.trust_remote_code,
                                                  revision=model_args.model_revision, cache_dir=model_args.cache_dir)
        return {key: getattr(processor, key) for key in (*_ATTRIBUTES, "model_input_names")
                if getattr(processor, key, None) is not None}
    except (ImportError, OSError, ValueError, TypeError):
        pass
    file = Path(path) / "processor_config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def save_processor(model_args, output_dir) -> None:
    """Write the model's image processor and processor settings beside exported weights (export)."""
    import shutil

    image_processor = _image_processor(model_args.model_name_or_path, model_args)
    if image_processor is not None:
        image_processor.save_pretrained(str(output_dir))
    video_processor = _video_processor(model_args.model_name_or_path, model_args)
    if video_processor is not None:
        video_processor.save_pretrained(str(output_dir))
    source = Path(model_args.model_name_or_path) / "processor_config.json"
    if source.is_file():
        shutil.copyfile(source, Path(output_dir) / "processor_config.json")
