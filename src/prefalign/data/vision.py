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

Videos (the Qwen2-VL / Qwen2.5-VL plugin, `Qwen2VLPlugin._regularize_videos`): a video file is decoded with
PyAV; of its N frames, k = min(N, video_maxlen, max(1, floor(duration x video_fps))) are kept, at
numpy.linspace(0, N - 1, k) (`video_frames`), the last repeated when k is odd (frames go to the tower in
temporal pairs); each frame is resized as an image is, under `video_max_pixels` / `video_min_pixels`; the
model's video processor (transformers', which runs on torchvision) patches them into `pixel_values_videos`
and `video_grid_thw`; a `<video>` placeholder becomes `<|vision_start|>` + `<|video_pad|>` x
(grid_t * grid_h * grid_w // merge_size²) + `<|vision_end|>`. Qwen2.5-VL's processor also gives the model
`second_per_grid_ts` (temporal_patch_size / (k / duration)) for its rotary time axis.

Qwen3-VL videos (`Qwen3VLPlugin`): the frames are sampled, resized and patched as above, but each temporal patch
(a pair of frames) is written on its own, after its time as text: `<{t:.1f} seconds>` + `<|vision_start|>` +
`<|video_pad|>` x (grid_h * grid_w // merge_size²) + `<|vision_end|>`, once per temporal patch, with no markers
around the whole video. A frame's time is its index in the file over the stream's average frame rate; a temporal
patch's is the mean of its first and last frame's (the repeated last frame of an odd count included), as
transformers' Qwen3VLProcessor computes it from the frame indices LLaMA-Factory gives it (`_calculate_timestamps`).
LLaMA-Factory 0.9.5's Qwen3VLPlugin reads the first video's frame count and the metadata by message index for every
video; prefalign gives each video its own, as the model's processor does (the same tokens for one video in the
first message).
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, field

from prefalign.data.formats import IMAGE_PLACEHOLDER, SYSTEM, VIDEO_PLACEHOLDER
from prefalign.data.media import MediaError, check_placeholder_count, open_image, video_refusal


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
    timestamps: bool = False  # Qwen3-VL: each temporal patch of a video after its time, in markers of its own

    def image_text(self, seqlen: int, token: str | None = None) -> str:
        """An image's (or, with `token` the video token, a video's) text: its tokens between the markers."""
        return self.around + self.start + (token or self.image_token) * seqlen + self.end + self.around

    def video_text(self, tokens_per_step: int, seconds: list[float]) -> str:
        """A video's text: one `tokens_per_step` run of the video token per temporal patch, each between the
        markers after its time in `seconds` (Qwen3-VL), or all of them between one pair of markers."""
        if not self.timestamps:
            return self.image_text(tokens_per_step * len(seconds), self.video_token)
        return "".join(f"<{t:.1f} seconds>" + self.start + self.video_token * tokens_per_step + self.end
                       for t in seconds)

    def marker_tokens(self) -> list[str]:
        """The tokens that belong to images (what truncation must never cut)."""
        return [t for t in (self.start, self.image_token, self.end, self.video_token) if t]


PLUGINS = {
    "Qwen2VLPlugin": VisionPlugin("Qwen2VLPlugin", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                  "<|vision_end|>", qwen=True, type_ids="mm_token_type_ids"),
    "Qwen3VLPlugin": VisionPlugin("Qwen3VLPlugin", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                  "<|vision_end|>", qwen=True, type_ids="mm_token_type_ids", timestamps=True),
    "LlavaPlugin": VisionPlugin("LlavaPlugin", "<image>", count="patches"),
    "Gemma3Plugin": VisionPlugin("Gemma3Plugin", "<image_soft_token>", start="<start_of_image>", end="<end_of_image>",
                                 around="\n\n", count="fixed", type_ids="token_type_ids"),
}
"""The plugins prefalign implements, by LLaMA-Factory's class name (a template's `mm_plugin`)."""

TESTED_TEMPLATES = ("qwen2_vl", "qwen3_vl", "qwen3_vl_nothink", "llava", "gemma3")
"""The vision templates the tests check against each family's own processor (the ones errors suggest)."""


VIDEO_PLUGINS = ("Qwen2VLPlugin", "Qwen3VLPlugin")
"""The plugins whose videos prefalign encodes."""


def _scaled(image, factor: float):
    return image.resize((int(image.width * factor), int(image.height * factor)))


def sample_indices(total_frames: int, duration: float, fps: float, maxlen: int) -> list[int]:
    """The frames LLaMA-Factory keeps of a video of `total_frames` frames lasting `duration` seconds
    (`_get_video_sample_indices`): min(total, maxlen, max(1, floor(duration x fps))) of them, evenly spaced
    from the first to the last; a stream that does not know its frame count: the first `maxlen`."""
    import numpy as np

    if total_frames == 0:
        return list(range(maxlen))
    count = min(total_frames, maxlen, max(1, math.floor(duration * fps)))
    return np.linspace(0, total_frames - 1, count).astype(np.int32).tolist()


class VideoError(MediaError):
    """Bytes that are not a readable video, or a video this model's processing cannot take (one line)."""


@dataclass(frozen=True)
class Clip:
    """A video's sampled frames (RGB PIL images, an even number: the last repeated if need be), the sampled frames
    per second of video (Qwen2.5-VL's `second_per_grid_ts`) and each frame's time in seconds (Qwen3-VL's)."""

    frames: list
    sampled_fps: float
    seconds: list[float]


def _sampling(container, size: int, fps: float, maxlen: int):
    """(the video stream, the indices of the frames to keep, its frames per second, its duration or None)."""
    stream = next((s for s in container.streams if s.type == "video"), None)
    if stream is None:
        raise VideoError(f"has no video stream ({size:,} bytes)")
    duration = float(stream.duration * stream.time_base) if stream.duration is not None else None
    rate = float(stream.average_rate) if stream.average_rate else fps
    return stream, sample_indices(stream.frames, duration or 0.0, fps, maxlen), rate, duration


def sampled_frame_count(data: bytes, fps: float, maxlen: int) -> int:
    """How many frames the video processor gets of this video (`video_frames`, the repeated last one included),
    from the file's header alone (nothing is decoded); 0 for a file PyAV cannot read."""
    import av

    try:
        with av.open(io.BytesIO(data), "r") as container:
            keep = _sampling(container, len(data), fps, maxlen)[1]
    except (av.FFmpegError, VideoError):
        return 0
    return len(keep) + len(keep) % 2


def video_frames(data: bytes, fps: float, maxlen: int) -> Clip:
    """A video file's bytes -> its Clip, sampled as LLaMA-Factory samples it (module docstring).

    Raises VideoError when PyAV cannot read the file or decodes none of the frames it should keep.
    """
    import av

    try:
        with av.open(io.BytesIO(data), "r") as container:
            stream, keep, rate, duration = _sampling(container, len(data), fps, maxlen)
            wanted = set(keep)
            frames = [frame.to_image() for n, frame in enumerate(container.decode(stream)) if n in wanted]
    except av.FFmpegError as err:
        raise VideoError(f"is not a readable video ({(err.strerror or str(err)).strip() or type(err).__name__}; "
                         f"{len(data):,} bytes)") from None
    if len(frames) < len(set(keep)):
        raise VideoError(f"is a damaged or truncated video: {len(frames)} of the {len(set(keep))} frames to sample "
                         f"decode ({len(data):,} bytes)")
    sampled_fps = len(keep) / duration if duration else fps
    seconds = [index / rate for index in keep[:len(frames)]]
    if len(frames) % 2:
        frames.append(frames[-1])
        seconds.append(seconds[-1])
    return Clip([frame if frame.mode == "RGB" else frame.convert("RGB") for frame in frames], sampled_fps, seconds)


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
    video_processor: object | None = None  # the model's (needs torchvision); None: videos are refused
    video_max_pixels: int = 256 * 256
    video_min_pixels: int = 16 * 16
    video_fps: float = 2.0
    video_maxlen: int = 128
    video_token_id: int | None = None
    seconds_per_grid: bool = False  # Qwen2.5-VL: the model reads `second_per_grid_ts`
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def identity(self) -> str:
        """What changes the image tokens (for cache keys): the plugin, the limits, the processor's settings."""
        settings = self.image_processor.to_json_string() if hasattr(self.image_processor, "to_json_string") else ""
        return hashlib.sha256("|".join(map(str, (
            self.plugin.name, self.max_pixels, self.min_pixels, self.patch_size, self.num_additional_image_tokens,
            self.vision_feature_select_strategy, self.image_seq_length, settings, *self._video_identity())))
            .encode()).hexdigest()[:16]

    def _video_identity(self) -> tuple:
        if self.video_processor is None:
            return ()
        settings = self.video_processor.to_json_string() if hasattr(self.video_processor, "to_json_string") else ""
        return (self.video_max_pixels, self.video_min_pixels, self.video_fps, self.video_maxlen, settings)

    def prepared(self, data: bytes):
        """One image's bytes -> the PIL image the processor gets (LLaMA-Factory's _preprocess_image)."""
        return self.resized(open_image(data), self.max_pixels, self.min_pixels)

    def resized(self, image, max_pixels: int, min_pixels: int):
        """An image (or a video frame) resized as LLaMA-Factory's _preprocess_image does under these limits."""
        if image.width * image.height > max_pixels:
            image = _scaled(image, math.sqrt(max_pixels / (image.width * image.height)))
        if image.width * image.height < min_pixels:
            image = _scaled(image, math.sqrt(min_pixels / (image.width * image.height)))
        if self.plugin.qwen:
            if min(image.width, image.height) < 28:
                image = image.resize((max(image.width, 28), max(image.height, 28)))
            if image.width / image.height > 200:
                image = image.resize((image.height * 180, image.height))
            if image.height / image.width > 200:
                image = image.resize((image.width, image.width * 180))
        return image

    def model_inputs(self, images: list[bytes], videos: list[bytes] = ()) -> dict:
        """The processors' tensors for `images` and `videos`, in order: Qwen `pixel_values` (patches, D) and
        `image_grid_thw` (n, 3), `pixel_values_videos` (patches, D), `video_grid_thw` (m, 3) and, for
        Qwen2.5-VL, `second_per_grid_ts` (m,); LLaVA `pixel_values` (n, C, H, W). Empty for no media."""
        out = {}
        if images:
            processed = self.image_processor([self.prepared(data) for data in images], return_tensors="pt")
            out.update({key: value for key, value in processed.items()
                        if key in ("pixel_values", "image_grid_thw", "image_sizes")})
        if videos:
            out.update(self.video_inputs(videos))
        return out

    def video_inputs(self, videos: list[bytes]) -> dict:
        """The video processor's `pixel_values_videos` and `video_grid_thw` for `videos` (module docstring)."""
        import torch

        refused = self.video_refusal()
        if refused:
            raise VideoError(refused)
        clips = [video_frames(data, self.video_fps, self.video_maxlen) for data in videos]
        frames = [[self.resized(frame, self.video_max_pixels, self.video_min_pixels) for frame in clip.frames]
                  for clip in clips]
        # the frames are LLaMA-Factory's sample already (Qwen3-VL's processor would sample again by default)
        processed = self.video_processor(videos=frames, do_sample_frames=False, return_tensors="pt")
        out = {key: processed[key] for key in ("pixel_values_videos", "video_grid_thw")}
        if self.seconds_per_grid:
            temporal = getattr(self.video_processor, "temporal_patch_size", 2)
            out["second_per_grid_ts"] = torch.tensor([temporal / clip.sampled_fps for clip in clips])
        return out

    def video_refusal(self) -> str | None:
        """Why this run cannot encode videos (one line), or None when it can."""
        if self.plugin.video_token is None:
            return (f"{self.plugin.name} models take no videos (LLaMA-Factory: this model does not support video "
                    "input); remove the record's videos, or skip it with on_bad_record: skip")
        if self.plugin.name not in VIDEO_PLUGINS:
            return (f"videos are not encoded for {self.plugin.name} models yet (prefalign encodes them for Qwen2-VL, "
                    "Qwen2.5-VL and Qwen3-VL); remove the record's videos, or skip it with on_bad_record: skip")
        return video_refusal() if self.video_processor is None else None

    def video_seqlen(self, data: bytes) -> int:
        """How many video tokens this video becomes."""
        per_step, seconds = self._video_layout(data)
        return per_step * len(seconds)

    def video_text(self, data: bytes) -> str:
        """The text a `<video>` placeholder becomes for this video (VisionPlugin.video_text)."""
        return self.plugin.video_text(*self._video_layout(data))

    def _video_layout(self, data: bytes) -> tuple[int, list[float]]:
        """(video tokens per temporal patch, each temporal patch's time in seconds); cached by the video's hash.

        A temporal patch's time is the mean of its first and last frame's (module docstring)."""
        key = "video:" + hashlib.sha256(data).hexdigest()
        if key not in self._cache:
            grid = self.video_inputs([data])["video_grid_thw"][0].tolist()
            merge = getattr(self.video_processor, "merge_size", 2)
            seconds = video_frames(data, self.video_fps, self.video_maxlen).seconds
            step = len(seconds) // grid[0]
            times = [(seconds[t * step] + seconds[(t + 1) * step - 1]) / 2 for t in range(grid[0])]
            self._cache[key] = (grid[1] * grid[2] // (merge * merge), times)
        return self._cache[key]

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

    def expand(self, messages: list[dict], images: tuple[bytes, ...], videos: tuple[bytes, ...] = ()) -> list[dict]:
        """`messages` with each `<image>` (`<video>`) placeholder of a non-system message replaced by its image's
        (video's) tokens, in order; a MediaError when they do not match `images` (`videos`) one to one
        (data/media.check_placeholder_count)."""
        for placeholder, items, text_of in (
                (IMAGE_PLACEHOLDER, images, lambda data: self.plugin.image_text(self.seqlen(data))),
                (VIDEO_PLACEHOLDER, videos,
                 self.video_text)):
            messages = _expanded(messages, placeholder, items, text_of)
        return messages

    def marker_ids(self, tokenizer) -> set[int]:
        return {tokenizer.convert_tokens_to_ids(t) for t in self.plugin.marker_tokens()}


def _expanded(messages: list[dict], placeholder: str, items: tuple[bytes, ...], text_of) -> list[dict]:
    check_placeholder_count(messages, placeholder, len(items))
    if not items:
        return messages
    out, at = [], 0
    for message in messages:
        if message["role"] == SYSTEM:  # as LLaMA-Factory: its placeholders are text
            out.append(message)
            continue
        pieces = message["content"].split(placeholder)
        text = pieces[0]
        for piece in pieces[1:]:
            try:
                text += text_of(items[at]) + piece
            except VideoError as err:
                raise VideoError(f"video {at + 1} of the prompt {err}; replace the file, or skip the record with "
                                 "on_bad_record: skip") from None
            at += 1
        out.append({**message, "content": text})
    return out


def plugin_for(mm_plugin: str) -> VisionPlugin | None:
    """The implemented plugin of a template's `mm_plugin` name, or None."""
    return PLUGINS.get(mm_plugin)
