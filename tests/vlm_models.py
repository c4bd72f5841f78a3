"""Tiny random vision-language models with real processors, built locally (no hub), and PIL-drawn images.

Each family's folder holds what a hub checkpoint holds: config + weights, the tokenizer (the demo's
byte-level BPE with the family's vision special tokens), the image processor (transformers' PIL one:
torchvision is not installed) and, for LLaVA, its processor settings.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024)


def _tokenizer(extra: list[str]):
    from prefalign.demo import demo_texts, train_tokenizer

    tokenizer = train_tokenizer(demo_texts())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *extra]})
    return tokenizer


def _qwen_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def build_vlm(family: str, path, *, seed: int = 0) -> str:
    """Save a tiny `family` model (qwen2_vl, qwen2_5_vl, qwen3_vl, llava) with its tokenizer and image processor."""
    import torch
    import transformers as tf

    path = Path(path)
    if family == "llava":
        tokenizer = _tokenizer(["<image>"])
        config = tf.LlavaConfig(
            text_config=dict(model_type="llama", vocab_size=len(tokenizer), **TEXT),
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
            vision_feature_layer=-1)
        model_class = tf.LlavaForConditionalGeneration
        image_processor = tf.CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    else:
        tokenizer = _tokenizer(QWEN_TOKENS)
        patch = 16 if family == "qwen3_vl" else 14
        vision = dict(depth=1, hidden_size=32, num_heads=2, patch_size=patch, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3, intermediate_size=64, out_hidden_size=32)
        text = dict(vocab_size=len(tokenizer), **TEXT)
        if family == "qwen2_vl":
            vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=patch,
                          spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
            text["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2]}
            config_class, model_class = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration
        elif family == "qwen2_5_vl":
            vision.update(window_size=56, fullatt_block_indexes=[0])
            text["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2]}
            config_class, model_class = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration
        else:
            vision.update(num_position_embeddings=16, deepstack_visual_indexes=[0])
            text["rope_scaling"] = {"rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True}
            text["head_dim"] = 8
            config_class, model_class = tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration
        config = config_class(text_config=text, vision_config=vision, **_qwen_ids(tokenizer))
        image_processor = tf.Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=64 * 64, patch_size=patch,
                                                      merge_size=2, temporal_patch_size=2)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    if family == "llava":
        (path / "processor_config.json").write_text(json.dumps(
            {"processor_class": "LlavaProcessor", "patch_size": 14, "vision_feature_select_strategy": "default",
             "num_additional_image_tokens": 1}))
    return str(path)


def png(width: int, height: int, color=(200, 30, 30), *, seed: int = 0) -> bytes:
    """A PNG drawn with PIL: `color` with a seeded pattern of lighter squares (so images differ by content)."""
    import random

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), color)
    draw = ImageDraw.Draw(image)
    rng = random.Random(seed)
    for _ in range(6):
        x, y = rng.randrange(width), rng.randrange(height)
        draw.rectangle([x, y, x + 4, y + 4], fill=tuple(rng.randrange(256) for _ in range(3)))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# Each family's chat format, as its hub chat template writes it (image parts as the family's image marker).
QWEN2_VL_CHAT = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN3_VL_CHAT = QWEN2_VL_CHAT.replace(
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}", "")
LLAVA_CHAT = (
    "{{ 'A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user\\'s questions.' }}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' }}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ ' ASSISTANT:' }}{% else %}{{ message['content'][0]['text'] + eos_token }}{% endif %}{% endfor %}"
)
CHAT = {"qwen2_vl": QWEN2_VL_CHAT, "qwen2_5_vl": QWEN2_VL_CHAT, "qwen3_vl": QWEN3_VL_CHAT, "llava": LLAVA_CHAT}


def family_processor(family: str, path):
    """The family's own transformers processor (Qwen2VLProcessor, Qwen2_5_VLProcessor, Qwen3VLProcessor,
    LlavaProcessor) over the saved tokenizer and image processor, with the family's chat template.

    Without torchvision the Qwen processors cannot be given a video processor (transformers refuses to
    check its class), so that one check is skipped while building; images never touch it.
    """
    import transformers as tf
    from transformers.processing_utils import ProcessorMixin

    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    image_processor = tf.AutoImageProcessor.from_pretrained(path)
    if family == "llava":
        return tf.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                 chat_template=CHAT[family])
    cls = {"qwen2_vl": tf.Qwen2VLProcessor, "qwen2_5_vl": tf.Qwen2_5_VLProcessor,
           "qwen3_vl": tf.Qwen3VLProcessor}[family]
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = (
        lambda self, name, arg: None if name == "video_processor" else check(self, name, arg))
    try:
        processor = cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                        chat_template=CHAT[family])
    finally:
        ProcessorMixin.check_argument_for_proper_class = check
    return processor


def rlhf_v_dataset(folder, n: int = 8) -> str:
    """A local dataset shaped like LLaMA-Factory's `rlhf_v` (sharegpt `conversations`, `chosen` / `rejected`
    turns, `images` paths relative to the folder): one to three images per prompt, some multi-turn, with the
    dataset_info.json entry LF's own registry has (its file instead of its hub url)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        count = 1 + i % 3
        names = []
        for k in range(count):
            name = f"images/{i}_{k}.png"
            (folder / name).write_bytes(png(28 + 4 * ((i + k) % 5), 28 + 6 * (k % 3), (40 * i % 256, 90, 30 * k),
                                            seed=i * 10 + k))
            names.append(name)
        conversations = [{"from": "human", "value": "<image>" * count + f" Describe picture {i}."}]
        if i % 2:
            conversations += [{"from": "gpt", "value": "Which part?"}, {"from": "human", "value": "The left side."}]
        records.append({"conversations": conversations,
                        "chosen": {"from": "gpt", "value": f"It shows shape {i} in red."},
                        "rejected": {"from": "gpt", "value": "A cat."}, "images": names})
    (folder / "rlhf_v.json").write_text(json.dumps(records))
    (folder / "dataset_info.json").write_text(json.dumps({"rlhf_v": {
        "file_name": "rlhf_v.json", "ranking": True, "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}}}))
    return str(folder)
