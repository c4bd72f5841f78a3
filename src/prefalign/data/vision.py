"""A vision-language template's images, as LLaMA-Factory 0.9.5's mm_plugin treats them.

A record's images are raw file bytes (`PreferencePair.images`), one per `<image>` placeholder of its
prompt, in order. Before the prompt is encoded each placeholder becomes the model's image tokens
(`expand`); the collator turns the same bytes into the model's inputs (`model_inputs`), so the number
of image tokens in the ids and the number of image features the vision tower returns always agree:
both come from one call of the image processor on one preprocessed image.

LLaMA-Factory's rules, per plugin (data/mm_plugin.py):
- every image is resized first (aspect kept) to at most `image_max_pixels` and at least
  `image_min_pixels` pixels, and converted to RGB; Qwen's plugins also make each side at least 28
  pixels and no side more than 200 times the other;
- Qwen2-VL / Qwen2.5-VL / Qwen3-VL (`Qwen2VLPlugin`, `Qwen3VLPlugin`): a placeholder becomes
  `<|vision_start|>` + `<|image_pad|>` x (grid_t * grid_h * grid_w // merge_size²) + `<|vision_end|>`;
- LLaVA (`LlavaPlugin`): a placeholder becomes `<image>` x ((H // patch) * (W // patch) + the
  processor's additional tokens, minus 1 with the `default` feature strategy), H x W the processed size;
- Gemma 3 (`Gemma3Plugin`, without pan-and-scan): a placeholder becomes the processor's
  `full_image_sequence`, `\\n\\n<start_of_image>` + `<image_soft_token>` x `image_seq_length` +
  `<end_of_image>\\n\\n` (every image the same count, the projector pools it to that many), and the model
  gets `token_type_ids` (1 at the soft tokens: its attention is bidirectional within an image).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from prefalign.data.formats import IMAGE_PLACEHOLDER, SYSTEM
from prefalign.data.media import check_placeholder_count, open_image


@dataclass(frozen=True)
class VisionPlugin:
    """What a LLaMA-Factory mm_plugin writes for an image: its token, and the tokens around each image."""

    name: str
    image_token: str
    video_token: str | None = None
    start: str = ""  # written before each image's tokens
    end: str = ""  # and after them
    qwen: bool = False  # Qwen's resize rules, grid-sized images
    around: str = ""  # written before `start` and after `end` (Gemma 3's blank lines)
    count: str = "grid"  # how an image's token count is known: grid (Qwen), patches (LLaVA), fixed (Gemma 3)
    type_ids: str | None = None  # the model's input that marks image tokens with 1 (collate.image_inputs)

    def image_text(self, seqlen: int) -> str:
        return self.around + self.start + self.image_token * seqlen + self.end + self.around

    def marker_tokens(self) -> list[str]:
        """The tokens that belong to images (what truncation must never cut)."""
        return [t for t in (self.start, self.image_token, self.end, self.video_token) if t]


PLUGINS = {
    "Qwen2VLPlugin": VisionPlugin("Qwen2VLPlugin", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                  "<|vision_end|>", qwen=True, type_ids="mm_token_type_ids"),
    "Qwen3VLPlugin": VisionPlugin("Qwen3VLPlugin", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                  "<|vision_end|>", qwen=True, type_ids="mm_token_type_ids"),
    "LlavaPlugin": VisionPlugin("LlavaPlugin", "<image>", count="patches"),
    "Gemma3Plugin": VisionPlugin("Gemma3Plugin", "<image_soft_token>", start="<start_of_image>", end="<end_of_image>",
                                 around="\n\n", count="fixed", type_ids="token_type_ids"),
}
"""The plugins prefalign implements, by LLaMA-Factory's class name (a template's `mm_plugin`)."""

TESTED_TEMPLATES = ("qwen2_vl", "qwen3_vl", "qwen3_vl_nothink", "llava", "gemma3")
"""The vision templates the tests check against each family's own processor (the ones errors suggest)."""


def _scaled(image, factor: float):
    return image.resize((int(image.width * factor), int(image.height * factor)))


@dataclass
class VisionProcessor:
    """A template's plugin with the model's image processor and LLaMA-Factory's pixel limits.

    `patch_size`, `num_additional_image_tokens`, `vision_feature_select_strategy`: the LLaVA processor's
    own attributes (its processor_config.json); `image_seq_length`: Gemma 3's processor's; the Qwen plugins
    read the image processor's merge size.
    """

    plugin: VisionPlugin
    image_processor: object
    max_pixels: int = 768 * 768
    min_pixels: int = 32 * 32
    patch_size: int | None = None
    num_additional_image_tokens: int = 0
    vision_feature_select_strategy: str = "default"
    image_token_id: int | None = None  # the image token's id in the run's tokenizer
    image_seq_length: int | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def identity(self) -> str:
        """What changes the image tokens (for cache keys): the plugin, the limits, the processor's settings."""
        settings = self.image_processor.to_json_string() if hasattr(self.image_processor, "to_json_string") else ""
        return hashlib.sha256("|".join(map(str, (
            self.plugin.name, self.max_pixels, self.min_pixels, self.patch_size, self.num_additional_image_tokens,
            self.vision_feature_select_strategy, self.image_seq_length, settings))).encode()).hexdigest()[:16]

    def prepared(self, data: bytes):
        """One image's bytes -> the PIL image the processor gets (LLaMA-Factory's _preprocess_image)."""
        image = open_image(data)
        if image.width * image.height > self.max_pixels:
            image = _scaled(image, math.sqrt(self.max_pixels / (image.width * image.height)))
        if image.width * image.height < self.min_pixels:
            image = _scaled(image, math.sqrt(self.min_pixels / (image.width * image.height)))
        if self.plugin.qwen:
            if min(image.width, image.height) < 28:
                image = image.resize((max(image.width, 28), max(image.height, 28)))
            if image.width / image.height > 200:
                image = image.resize((image.height * 180, image.height))
            if image.height / image.width > 200:
                image = image.resize((image.width, image.width * 180))
        return image

    def model_inputs(self, images: list[bytes]) -> dict:
        """The image processor's tensors for `images`, in order: Qwen `pixel_values` (patches, D) and
        `image_grid_thw` (n, 3); LLaVA `pixel_values` (n, C, H, W). Empty for no images."""
        if not images:
            return {}
        out = self.image_processor([self.prepared(data) for data in images], return_tensors="pt")
        return {key: value for key, value in out.items() if key in ("pixel_values", "image_grid_thw", "image_sizes")}

    def seqlen(self, data: bytes) -> int:
        """How many image tokens this image becomes (LLaMA-Factory's process_messages); cached by its hash."""
        if self.plugin.count == "fixed":  # the processor's own count, the same for every image
            return self.image_seq_length
        key = hashlib.sha256(data).hexdigest()
        if key not in self._cache:
            inputs = self.model_inputs([data])
            if self.plugin.count == "grid":
                merge = getattr(self.image_processor, "merge_size", 2)
                self._cache[key] = int(inputs["image_grid_thw"][0].prod()) // (merge * merge)
            else:
                height, width = inputs["pixel_values"].shape[-2:]
                n = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
                self._cache[key] = n - 1 if self.vision_feature_select_strategy == "default" else n
        return self._cache[key]

    def expand(self, messages: list[dict], images: tuple[bytes, ...]) -> list[dict]:
        """`messages` with each `<image>` placeholder of a non-system message replaced by its image's tokens,
        in order; a MediaError when they do not match `images` one to one (data/media.check_placeholder_count)."""
        check_placeholder_count(messages, IMAGE_PLACEHOLDER, len(images))
        out, at = [], 0
        for message in messages:
            if message["role"] == SYSTEM:  # as LLaMA-Factory: its placeholders are text
                out.append(message)
                continue
            pieces = message["content"].split(IMAGE_PLACEHOLDER)
            text = pieces[0]
            for piece in pieces[1:]:
                text += self.plugin.image_text(self.seqlen(images[at])) + piece
                at += 1
            out.append({**message, "content": text})
        return out

    def marker_ids(self, tokenizer) -> set[int]:
        return {tokenizer.convert_tokens_to_ids(t) for t in self.plugin.marker_tokens()}


def plugin_for(mm_plugin: str) -> VisionPlugin | None:
    """The implemented plugin of a template's `mm_plugin` name, or None."""
    return PLUGINS.get(mm_plugin)
