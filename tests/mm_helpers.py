"""Test fixtures for vision-language models: tiny random VLMs with real processors, PIL-drawn images,
and an `rlhf_v`-shaped dataset folder (LLaMA-Factory's multimodal DPO data).

    build_vlm(family, path)      a tiny random model of a family (FAMILIES: qwen2_vl, qwen2_5_vl,
                                 qwen3_vl, llava, gemma3) saved with its image processor (PIL backend) and a
                                 tokenizer trained locally that has the family's vision tokens and a
                                 chat template; returns the path
    load_processor(path)         the family's processor for such a folder (see below)
    draw_image(seed, size)       a small PIL image of random shapes; png_bytes(image)
    write_rlhf_v(dataset_dir)    images + rlhf_v.json + dataset_info.json (LF's `rlhf_v` entry)
    video_bytes(frames, fps)     an MPEG-4 video of PIL frames, written with PyAV (where it is installed)

torchvision is not installed here, and transformers 5 then refuses to build a Qwen-VL processor at
all (its constructor checks the class of the video processor, which needs torchvision, even when
there is none). `load_processor` builds the same processor class with that one check skipped for
an absent video processor: the image processor and tokenizer are the real ones.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# -- chat templates: the families' markup, simplified (string content or TRL/HF content parts) --------

_PARTS = ("{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
          "{% if p['type'] == 'image' %}{{ IMAGE }}{% elif p['type'] == 'video' %}{{ VIDEO }}"
          "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}")

QWEN_VL_TEMPLATE = (
    "{% set IMAGE = '<|vision_start|><|image_pad|><|vision_end|>' %}"
    "{% set VIDEO = '<|vision_start|><|video_pad|><|vision_end|>' %}"
    "{% if DEFAULT_SYSTEM and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n' + DEFAULT_SYSTEM + '<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}" + _PARTS + "{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# LLaVA-1.5 (vicuna): "USER: <image>\n... ASSISTANT: reply</s>"
LLAVA_TEMPLATE = (
    "{% set IMAGE = '<image>\\n' %}{% set VIDEO = '' %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + ' ' }}"
    "{% elif m['role'] == 'user' %}{{ 'USER: ' }}" + _PARTS + "{{ ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}" + _PARTS + "{{ '</s>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Gemma 3: "<bos><start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\nreply<end_of_turn>\n"
GEMMA3_TEMPLATE = (
    "{% set IMAGE = '<start_of_image>' %}{% set VIDEO = '' %}{{ bos_token }}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '<start_of_turn>user\\n' }}" + _PARTS + "{{ '<end_of_turn>\\n' }}"
    "{% else %}{{ '<start_of_turn>model\\n' }}" + _PARTS + "{{ '<end_of_turn>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
GEMMA3_NAMED_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                       "image_token": "<image_soft_token>"}
"""The tokenizer attributes Gemma3Processor reads (a hub Gemma 3 tokenizer_config.json's named tokens)."""

QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

WORDS = ("what is in the picture red green blue square circle line left right top bottom "
         "the image shows a small large shape color one two three and of it on near compare first second "
         "describe count answer yes no there are is").split()


@dataclass(frozen=True)
class Family:
    """One model family: its LLaMA-Factory template name, its tokens and how its parts are built."""

    lf_template: str
    special_tokens: tuple[str, ...]
    chat_template: str
    build: Callable  # (tokenizer, hidden) -> (model, image processor, processor class, processor kwargs)
    eos: str = "<|im_end|>"
    default_system: str | None = None
    image_token: str = "<|image_pad|>"
    bos: str | None = None
    named_tokens: dict = field(default_factory=dict)  # tokenizer attributes naming special tokens


def _text_config(tokenizer, hidden: int, **extra) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **extra)


def _ids(tokenizer, **names) -> dict:
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}


_QWEN_IDS = dict(image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                 vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
# head_dim hidden/4 = 8 for hidden 32 (16 for 64): mrope's (temporal, height, width) sections sum to head_dim / 2
_MROPE = {32: [2, 1, 1], 64: [4, 2, 2]}


def _qwen2_vl(tokenizer, hidden):
    import transformers as t

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _MROPE[hidden]}
    config = t.Qwen2VLConfig(text_config=_text_config(tokenizer, hidden, rope_parameters=rope),
                             vision_config=dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                                                patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                             **_ids(tokenizer, **_QWEN_IDS))
    images = t.Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2)
    return t.Qwen2VLForConditionalGeneration(config), images, t.Qwen2VLProcessor, {}


def _qwen2_5_vl(tokenizer, hidden):
    import transformers as t

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _MROPE[hidden]}
    config = t.Qwen2_5_VLConfig(text_config=_text_config(tokenizer, hidden, rope_parameters=rope),
                                vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                                   out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                                                   temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
                                **_ids(tokenizer, **_QWEN_IDS))
    images = t.Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2)
    return t.Qwen2_5_VLForConditionalGeneration(config), images, t.Qwen2_5_VLProcessor, {}


def _qwen3_vl(tokenizer, hidden):
    import transformers as t

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _MROPE[hidden], "mrope_interleaved": True}
    text = _text_config(tokenizer, hidden, rope_parameters=rope, head_dim=hidden // 4)
    config = t.Qwen3VLConfig(text_config=text,
                             vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                                out_hidden_size=hidden, patch_size=16, spatial_merge_size=2,
                                                temporal_patch_size=2, num_position_embeddings=16,
                                                deepstack_visual_indexes=[0]),
                             **_ids(tokenizer, **_QWEN_IDS))
    # Qwen3-VL: 16-pixel patches, merged 2 x 2, so sizes are multiples of 32
    images = t.Qwen2VLImageProcessorPil(size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}, patch_size=16,
                                        merge_size=2)
    return t.Qwen3VLForConditionalGeneration(config), images, t.Qwen3VLProcessor, {}


def _llava(tokenizer, hidden):
    import transformers as t

    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32)
    config = t.LlavaConfig(vision_config=vision, text_config=dict(model_type="llama", **_text_config(tokenizer, hidden)),
                           image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                           vision_feature_select_strategy="default", projector_hidden_act="gelu")
    images = t.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    # 28 / 14 = 2 x 2 patches; the "default" strategy drops CLS: 4 image tokens per image
    kwargs = dict(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return t.LlavaForConditionalGeneration(config), images, t.LlavaProcessor, kwargs


def _gemma3(tokenizer, hidden):
    import transformers as t

    text = {**_text_config(tokenizer, hidden, head_dim=hidden // 4, sliding_window=512,
                           layer_types=["sliding_attention", "full_attention"]),
            "bos_token_id": tokenizer.bos_token_id}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14)
    # 28 / 14 = 2 x 2 patches, pooled to mm_tokens_per_image 4 (a 2 x 2 grid: pooling kernel 1)
    config = t.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                            **_ids(tokenizer, boi_token_index="<start_of_image>", eoi_token_index="<end_of_image>",
                                   image_token_index="<image_soft_token>"))
    images = t.Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
    return t.Gemma3ForConditionalGeneration(config), images, t.Gemma3Processor, dict(image_seq_length=4)


FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family("qwen2_vl", QWEN_VISION_TOKENS, QWEN_VL_TEMPLATE, _qwen2_vl,
                       default_system="You are a helpful assistant."),
    "qwen2_5_vl": Family("qwen2_vl", QWEN_VISION_TOKENS, QWEN_VL_TEMPLATE, _qwen2_5_vl,
                         default_system="You are a helpful assistant."),
    "qwen3_vl": Family("qwen3_vl_nothink", QWEN_VISION_TOKENS, QWEN_VL_TEMPLATE, _qwen3_vl),
    "llava": Family("llava", ("<image>",), LLAVA_TEMPLATE, _llava, eos="</s>", image_token="<image>"),
    "gemma3": Family("gemma3", ("<bos>", "<start_of_turn>", *GEMMA3_NAMED_TOKENS.values()), GEMMA3_TEMPLATE,
                     _gemma3, eos="<end_of_turn>", image_token="<image_soft_token>", bos="<bos>",
                     named_tokens=GEMMA3_NAMED_TOKENS),
}

PROCESSOR_FILE = "prefalign_test_processor.json"
"""Written beside a built model: the processor class and its arguments (for `load_processor`)."""


def vlm_tokenizer(family: str):
    """A byte-level BPE tokenizer trained locally (prefalign.demo) with the family's vision tokens as
    special tokens, its end-of-turn token as eos and its chat template."""
    from prefalign.demo import train_tokenizer

    spec = FAMILIES[family]
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200)]
    if spec.eos == "</s>":
        texts += ["USER: ", "ASSISTANT: "] * 20
    tokenizer = train_tokenizer(texts, vocab_size=600)
    extra = [token for token in (*spec.special_tokens, spec.eos) if token not in tokenizer.get_vocab()]
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *extra]})
    tokenizer.eos_token = spec.eos
    if spec.bos:
        tokenizer.bos_token = spec.bos
    if spec.named_tokens:  # saved in tokenizer_config.json, read back as attributes (transformers' named tokens)
        tokenizer._set_model_specific_special_tokens(spec.named_tokens)
    template = spec.chat_template.replace("DEFAULT_SYSTEM", repr(spec.default_system or ""))
    tokenizer.chat_template = template
    return tokenizer


def build_vlm(family: str, path, *, hidden: int = 32, seed: int = 0) -> str:
    """A tiny random model of `family` (2 text layers of width `hidden`, a 1-2 layer vision tower of
    width 32) saved at `path` with its image processor and tokenizer; returns the path."""
    import torch

    tokenizer = vlm_tokenizer(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, image_processor, processor_class, kwargs = FAMILIES[family].build(tokenizer, hidden)
    return save_vlm(path, family, model, tokenizer, image_processor, processor_class, kwargs)


def save_vlm(path, family: str, model, tokenizer, image_processor, processor_class, kwargs: dict) -> str:
    """Save a VLM with its processor's parts so that `load_processor` (and transformers' AutoProcessor
    where torchvision is installed) rebuilds the processor; returns the path. benchmarks/ use it for
    larger shapes than `build_vlm`'s."""
    model.save_pretrained(path)
    processor = _processor(processor_class, image_processor, tokenizer, kwargs)
    if getattr(processor, "video_processor", "none needed") is None:  # transformers cannot save it: its parts
        tokenizer.save_pretrained(path)
        image_processor.save_pretrained(path)
    else:
        processor.save_pretrained(path)
    # as a hub repository's preprocessor_config.json says it: the processor class to load
    config_file = Path(path) / "preprocessor_config.json"
    if config_file.exists():  # (a processor transformers saves whole keeps it in processor_config.json)
        config = json.loads(config_file.read_text())
        config["processor_class"] = processor_class.__name__
        config_file.write_text(json.dumps(config, indent=2))
    (Path(path) / PROCESSOR_FILE).write_text(json.dumps({"family": family, "class": processor_class.__name__,
                                                         "kwargs": kwargs}))
    return str(path)


def _processor(base, image_processor, tokenizer, kwargs):
    """`base` (a processor class) built from its parts; a Qwen-VL one with no video processor (module docstring)."""
    if "video_processor" not in base.get_attributes():
        return base(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template,
                    **kwargs)

    class WithoutVideo(base):
        def check_argument_for_proper_class(self, name, argument):
            return None if argument is None else super().check_argument_for_proper_class(name, argument)

    WithoutVideo.__name__ = WithoutVideo.__qualname__ = base.__name__
    return WithoutVideo(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                        chat_template=tokenizer.chat_template, **kwargs)


def load_processor(path):
    """The processor of a `build_vlm` folder: transformers' AutoProcessor where it can build one,
    else the family's processor class with the video-processor class check skipped (module docstring)."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(path)
    except ImportError:  # torchvision missing: the Qwen-VL video processor cannot be built
        pass
    info = json.loads((Path(path) / PROCESSOR_FILE).read_text())
    return _processor(getattr(transformers, info["class"]), transformers.AutoImageProcessor.from_pretrained(path),
                      transformers.AutoTokenizer.from_pretrained(path), info["kwargs"])


# -- images ---------------------------------------------------------------------------------------


def draw_image(seed: int, size: tuple[int, int] | None = None):
    """A small RGB image (16-56 px a side unless `size` says) of a few random rectangles and ellipses."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    width, height = size or (rng.randint(16, 56), rng.randint(16, 56))
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = [x0, y0, min(width - 1, x0 + rng.randint(2, width)), min(height - 1, y0 + rng.randint(2, height))]
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=colour)
    return image


def video_bytes(frames: list, fps: int) -> bytes:
    """An MP4 file (MPEG-4 part 2, yuv420p) of `frames` (PIL images of one even size) at `fps` frames per
    second, written with PyAV: a video whose duration is len(frames) / fps seconds."""
    import io

    import av

    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())
    return out.getvalue()


def png_bytes(image) -> bytes:
    import io

    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# -- an rlhf_v-shaped dataset ------------------------------------------------------------------------

# LLaMA-Factory's `rlhf_v` entry (data/dataset_info.json of 0.9.5), its "hf_hub_url" replaced by the
# local "file_name".
RLHF_V_ENTRY = {
    "file_name": "rlhf_v.json",
    "ranking": True,
    "formatting": "sharegpt",
    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"},
}


def rlhf_v_records(count: int = 8, seed: int = 0, image_dir: str = "images") -> list[tuple[dict, list]]:
    """`count` records in rlhf_v's shape, each with the PIL images its paths name: 1-3 images per
    prompt, one to three user turns (earlier turns answered), `<image>` placeholders spread over them."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        images = [draw_image(seed * 1000 + n * 10 + k) for k in range(rng.randint(1, 3))]
        turns = rng.randint(1, 3)
        where = sorted(rng.randrange(turns) for _ in images)  # which user turn each placeholder is in
        conversation = []
        for turn in range(turns):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + "?"
            placeholders = "<image>" * where.count(turn)
            conversation.append({"from": "human", "value": placeholders + text})
            if turn < turns - 1:
                conversation.append({"from": "gpt", "value": " ".join(rng.choice(WORDS) for _ in range(5))})
        chosen = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
        rejected = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + " no"
        record = {"conversations": conversation, "chosen": {"from": "gpt", "value": chosen},
                  "rejected": {"from": "gpt", "value": rejected},
                  "images": [f"{image_dir}/{n:04d}_{k}.png" for k in range(len(images))]}
        out.append((record, images))
    return out


def write_rlhf_v(dataset_dir, count: int = 8, seed: int = 0) -> str:
    """A dataset folder as LLaMA-Factory's VLM DPO examples expect one (`dataset: rlhf_v`):
    dataset_info.json with the `rlhf_v` entry, rlhf_v.json, and the PNG images its records name
    (paths relative to the folder, LF's default media_dir). Returns the folder."""
    dataset_dir = Path(dataset_dir)
    (dataset_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for record, images in rlhf_v_records(count, seed):
        for relative, image in zip(record["images"], images):
            image.save(dataset_dir / relative)
        records.append(record)
    (dataset_dir / "rlhf_v.json").write_text(json.dumps(records, indent=1))
    (dataset_dir / "dataset_info.json").write_text(json.dumps({"rlhf_v": RLHF_V_ENTRY}, indent=2))
    return str(dataset_dir)


__all__ = ["FAMILIES", "build_vlm", "save_vlm", "load_processor", "vlm_tokenizer", "draw_image", "png_bytes",
           "rlhf_v_records", "write_rlhf_v", "RLHF_V_ENTRY"]
