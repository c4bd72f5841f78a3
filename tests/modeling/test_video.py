"""Videos of the Qwen2-VL family and Qwen3-VL (data/vision.py): frames sampled as LLaMA-Factory samples them, video tokens and
per-pair log-probs against the model's own processor, a truncated file a named record error.

These need PyAV and a torchvision that loads with the installed torch (transformers' Qwen-VL video processor
runs on torchvision); where either is missing they skip. Build an environment that has both as README.md's
vision-language section says (a venv with `torch==2.14.1 torchvision==0.29.1 av` and prefalign), then run
`/work/venvs/video/bin/python -m pytest tests/modeling/test_video.py`.

The videos are written by the test with PyAV from PIL-drawn frames of 56 x 42 pixels: inside LLaMA-Factory's
video_min_pixels..video_max_pixels and 28 pixels or more a side, so LF's resize leaves them alone and the
processor, given the frames the test picks by hand, is an independent computation of what prefalign must give.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _missing() -> str | None:
    try:
        import av  # noqa: F401
        import torchvision  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a torchvision built for another torch raises RuntimeError
        return f"videos need PyAV and a torchvision that loads with torch {torch.__version__}: {exc}".splitlines()[0]
    return None


if _missing():
    pytest.skip(_missing(), allow_module_level=True)

from helpers import EXAMPLES  # noqa: E402
from mm_helpers import build_vlm, draw_image, load_processor, png_bytes, video_bytes  # noqa: E402

from prefalign.config.args import DataArguments, ModelArguments  # noqa: E402
from prefalign.contracts import PreferencePair, RecordSource  # noqa: E402
from prefalign.data.chat import ChatRenderer  # noqa: E402
from prefalign.data.collate import PairCollator, PrefixSharedCollator  # noqa: E402
from prefalign.data.encode import encode_pair, encode_pairs  # noqa: E402
from prefalign.data.packing import PackedCollator  # noqa: E402
from prefalign.data.vision import sample_indices  # noqa: E402
from prefalign.errors import PairError  # noqa: E402
from prefalign.modeling.load import load_causal_lm, load_tokenizer  # noqa: E402
from prefalign.modeling.logprobs import pair_logps  # noqa: E402
from prefalign.modeling.vision import load_vision  # noqa: E402

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TEMPLATE = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl", "qwen3_vl": "qwen3_vl_nothink"}
SIZE = (56, 42)

# LLaMA-Factory's qwen2_vl template as a chat template for the processor (a video part as the family's marker)
CHAT = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


QWEN3_CHAT = CHAT.replace("{% if loop.first and message['role'] != 'system' %}"
                          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}", "")
"""LLaMA-Factory's qwen3_vl_nothink template: no default system message."""


def frames(count: int, seed: int = 0) -> list:
    return [draw_image(seed * 100 + n, SIZE) for n in range(count)]


# Two clips at 4 frames per second, sampled at LF's default video_fps 2 (video_maxlen 128):
# 10 frames, 2.5 s: max(1, floor(2.5 x 2)) = 5 frames, linspace(0, 9, 5) = 0, 2.25, 4.5, 6.75, 9 -> 0, 2, 4, 6, 9,
#   odd, so the last is repeated: 6 frames, grid_t 3; sampled at 5 / 2.5 = 2 frames per second.
# 9 frames, 2.25 s: floor(4.5) = 4 frames, linspace(0, 8, 4) = 0, 2.67, 5.33, 8 -> 0, 2, 5, 8: grid_t 2; 4 / 2.25
#   = 1.78 frames per second, so Qwen2.5-VL's second_per_grid_ts is 2 / 1.78 = 1.125.
# Each 56 x 42 frame: the processor rounds to 56 x 56 (factor 28) = 4 x 4 patches of 14 px, 16 / 2² = 4 tokens per
# temporal step: 12 and 8 video tokens.
CLIPS = {"ten": (10, [0, 2, 4, 6, 9, 9], 3, 12, 1.0), "nine": (9, [0, 2, 5, 8], 2, 8, 1.125)}
# Qwen3-VL (16-pixel patches merged 2 x 2, its video processor's smart_resize over all frames, factor 32): a 56 x 42
# frame rounds to 64 x 32 = 4 x 2 patches, 8 / 2² = 2 tokens per temporal step: 6 and 4 video tokens, each step
# after its time: the mean of its two frames' times (index / 4 fps): ten: (0 + 2) / 8 = 0.25, (4 + 6) / 8 = 1.25,
# (9 + 9) / 8 = 2.25, written "0.2", "1.2", "2.2" (Python's %.1f rounds an exact half to even); nine: 0.25 and
# (5 + 8) / 8 = 1.625, "0.2" and "1.6".
GRIDS = {"qwen2_vl": [[3, 4, 4], [2, 4, 4]], "qwen2_5_vl": [[3, 4, 4], [2, 4, 4]], "qwen3_vl": [[3, 2, 4], [2, 2, 4]]}
VIDEO_TOKENS = {"qwen2_vl": (12, 8), "qwen2_5_vl": (12, 8), "qwen3_vl": (6, 4)}
QWEN3_TEN = "".join(f"<{t} seconds><|vision_start|><|video_pad|><|video_pad|><|vision_end|>" for t in ("0.2", "1.2", "2.2"))


def qwen3_video_processor():
    """Qwen3-VL's video processor as its model repository ships it (video_preprocessor_config.json), with pixel
    limits for the 56 x 42 test frames: at least 32 x 32 and at most 64 frames of 32 x 32 pixels a video."""
    import transformers

    return transformers.Qwen3VLVideoProcessor(size={"shortest_edge": 32 * 32, "longest_edge": 32 * 32 * 64},
                                              patch_size=16, merge_size=2, temporal_patch_size=2)


def decoded(data: bytes) -> list:
    """Every frame of a video, decoded by PyAV here (MPEG-4 is lossy: the frames are not the drawn ones)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def clips():
    """name -> (the video's bytes, its frames at the indices CLIPS picks by hand)."""
    out = {}
    for n, (name, (count, picked, *_)) in enumerate(CLIPS.items()):
        data = video_bytes(frames(count, seed=n), fps=4)
        every = decoded(data)
        assert len(every) == count
        out[name] = (data, [every[i] for i in picked])
    return out


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    dirs = {family: build_vlm(family, root / family) for family in FAMILIES}
    qwen3_video_processor().save_pretrained(dirs["qwen3_vl"])
    return dirs


def _run(path, template="qwen2_vl", **model_keys):
    model_args = ModelArguments(model_name_or_path=path, **model_keys)
    data_args = DataArguments(template=template, dataset=["x"], cutoff_len=1024)
    tokenizer = load_tokenizer(model_args)
    vision = load_vision(model_args, data_args, tokenizer)
    return tokenizer, vision, ChatRenderer.from_config(tokenizer, data_args, vision)


def _pairs(clips):
    """A video alone; an image and a video over two user turns."""
    return [
        PreferencePair([{"role": "user", "content": "<video>What happens?"}], "A red box moves.", "A cat.",
                       RecordSource("clips.json", 0), videos=(clips["ten"][0],)),
        PreferencePair([{"role": "user", "content": "Look: <image>"}, {"role": "assistant", "content": "Blue."},
                        {"role": "user", "content": "And now <video>?"}], "Green.", "None at all.",
                       RecordSource("clips.json", 1), images=(png_bytes(draw_image(7, (40, 30))),),
                       videos=(clips["nine"][0],)),
    ]


def _processor_inputs(processor, pair, reply, clips, family):
    """The processor on the conversation with the frames the test picked: (prompt ids, full inputs)."""
    def parts(content):
        out = []
        for piece in content.replace("<video>", "\0video\0").replace("<image>", "\0image\0").split("\0"):
            if piece in ("video", "image"):
                out.append({"type": piece})
            elif piece:
                out.append({"type": "text", "text": piece})
        return out

    messages = [{"role": m["role"], "content": parts(m["content"]) if m["role"] == "user"
                 else [{"type": "text", "text": m["content"]}]} for m in pair.prompt]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                           chat_template=QWEN3_CHAT if family == "qwen3_vl" else CHAT)
    from PIL import Image

    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in pair.images] or None
    picked = [next(picks for data, picks in clips.values() if data == video) for video in pair.videos]
    kwargs = {}
    if family != "qwen2_vl":  # the source video's metadata: second_per_grid_ts (Qwen2.5-VL), the times (Qwen3-VL)
        count, picks = zip(*[next(CLIPS[n][:2] for n in CLIPS if clips[n][0] == video) for video in pair.videos])
        kwargs["video_metadata"] = [{"total_num_frames": n, "fps": 4, "frames_indices": sorted(set(p))}
                                    for n, p in zip(count, picks)]
    if family == "qwen3_vl":  # the frames are sampled already (its video processor would sample them again)
        kwargs["do_sample_frames"] = False
    prompt_ids = processor(text=[prompt], images=images, videos=picked, return_tensors="pt", **kwargs)["input_ids"]
    inputs = processor(text=[prompt + reply + "<|im_end|>\n"], images=images, videos=picked, return_tensors="pt",
                       **kwargs)
    return prompt_ids[0].tolist(), inputs


def test_frames_are_sampled_as_llamafactory_samples_them():
    """LF's _get_video_sample_indices: min(total, maxlen, max(1, floor(duration x fps))) frames, evenly spaced."""
    assert sample_indices(10, 2.5, 2.0, 128) == [0, 2, 4, 6, 9]
    assert sample_indices(10, 2.5, 2.0, 3) == [0, 4, 9]  # linspace(0, 9, 3) = 0, 4.5, 9
    assert sample_indices(100, 10.0, 0.05, 128) == [0]  # floor(0.5) = 0, at least one frame
    assert sample_indices(4, 10.0, 2.0, 128) == [0, 1, 2, 3]  # never more than the video has
    assert sample_indices(0, 0.0, 2.0, 3) == [0, 1, 2]  # a stream without a frame count: the first maxlen


@pytest.mark.parametrize("family", FAMILIES)
def test_video_tokens_equal_the_processors(vlm_dirs, clips, family):
    """Each `<video>` becomes `<|vision_start|>` + the processor's count of `<|video_pad|>` + `<|vision_end|>` for
    the frames LF samples (12 and 8 by hand, CLIPS), at the same place as the processor writes them; Qwen3-VL's
    each temporal step after its time (6 and 4, by hand); the batch's video inputs are the processor's, its
    mm_token_type_ids (2 at video tokens) the processor's, row by row."""
    tokenizer, vision, renderer = _run(vlm_dirs[family], TEMPLATE[family])
    processor = load_processor(vlm_dirs[family])
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    pairs = _pairs(clips)
    features = []
    for i, pair in enumerate(pairs):
        encoded = encode_pair(pair, renderer, 1024)
        expected_tokens = sum(count for n, count in zip(CLIPS, VIDEO_TOKENS[family]) if clips[n][0] in pair.videos)
        assert encoded["prompt_ids"].count(video_id) == expected_tokens
        if family == "qwen3_vl" and i == 0:  # the timestamps by hand (CLIPS)
            assert tokenizer.decode(encoded["prompt_ids"]).startswith("<|im_start|>user\n" + QWEN3_TEN + "What happens?")
        for side, reply in (("chosen_ids", pair.chosen), ("rejected_ids", pair.rejected)):
            prompt_ids, inputs = _processor_inputs(processor, pair, reply, clips, family)
            assert encoded["prompt_ids"] == prompt_ids
            assert encoded["prompt_ids"] + encoded[side] == inputs["input_ids"][0].tolist()
        features.append({**encoded, "images": list(pair.images), "videos": list(pair.videos), "index": i})
    batch = PairCollator(tokenizer.pad_token_id, vision=vision)(features)
    assert batch["video_grid_thw"].tolist() == GRIDS[family] * 2  # chosen rows, then rejected rows
    for row in range(2 * len(pairs)):
        pair = pairs[row % len(pairs)]
        _, inputs = _processor_inputs(processor, pair, pair.chosen if row < 2 else pair.rejected, clips, family)
        n = inputs["input_ids"].shape[1]
        assert batch["mm_token_type_ids"][row, :n].tolist() == inputs["mm_token_type_ids"][0].tolist()
        assert 2 in batch["mm_token_type_ids"][row].tolist()
    _, inputs = _processor_inputs(processor, pairs[1], pairs[1].chosen, clips, family)
    half = batch["pixel_values_videos"].shape[0] // 2
    first = int(batch["video_grid_thw"][0].prod())
    assert torch.allclose(batch["pixel_values_videos"][first:half], inputs["pixel_values_videos"], atol=1e-6)
    if family == "qwen2_5_vl":
        assert batch["second_per_grid_ts"].tolist() == pytest.approx([1.0, 1.125] * 2)
        assert inputs["second_per_grid_ts"].tolist() == pytest.approx([1.125])


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_log_probs_equal_one_pair_at_a_time_with_the_processor(vlm_dirs, clips, family):
    """Every layout (concatenated: the tower once per pair for images and videos; prefix-shared: the prompt and
    its video once, with the 3-D rotary positions over the video's frames; packed, with and without prefix
    sharing: the pairs end to end, positions restarting per sequence): each pair's chosen and rejected
    log-probs equal the model's own forward on the processor's inputs for that pair alone, summed over the
    reply's tokens by hand. The tower encodes each pair's video patches once per layout."""
    path = vlm_dirs[family]
    tokenizer, vision, renderer = _run(path, TEMPLATE[family])
    processor = load_processor(path)
    pairs = _pairs(clips)
    features = [{**encode_pair(p, renderer, 1024), "images": list(p.images), "videos": list(p.videos), "index": i}
                for i, p in enumerate(pairs)]
    model = load_causal_lm(path, ModelArguments(model_name_or_path=path)).eval()
    seen = []
    model.model.visual.register_forward_hook(lambda module, args, kwargs, out: seen.append(args[0].shape[0]),
                                             with_kwargs=True)
    # the video grids, the 40 x 30 image's (28 x 28, Qwen3-VL 32 x 32: 2 x 2 patches)
    patches = sum(t * h * w for t, h, w in GRIDS[family]) + 1 * 2 * 2
    with torch.no_grad():
        collators = {"plain": PairCollator(tokenizer.pad_token_id, vision=vision),
                     "prefix-shared": PrefixSharedCollator(tokenizer.pad_token_id, vision=vision),
                     "packed": PackedCollator(tokenizer.pad_token_id, False, 0, vision=vision),
                     "packed, prefix-shared": PackedCollator(tokenizer.pad_token_id, True, 0, vision=vision)}
        for name, collator in collators.items():
            seen.clear()
            got = pair_logps(model, collator(features))
            assert sum(seen) == patches, name
            for i, pair in enumerate(pairs):
                for side, reply in (("chosen", pair.chosen), ("rejected", pair.rejected)):
                    prompt_ids, inputs = _processor_inputs(processor, pair, reply, clips, family)
                    logits = model(**inputs).logits[0, :-1].float()
                    token = logits.log_softmax(-1).gather(-1, inputs["input_ids"][0, 1:, None])[:, 0]
                    expected = token[len(prompt_ids) - 1:].sum()
                    assert torch.allclose(getattr(got, side)[i], expected, atol=3e-5, rtol=0), (name, i, side)


def test_video_limits_are_lfs(vlm_dirs, clips):
    """video_maxlen caps the sampled frames (3 of the ten-frame clip: 0, 4, 9, padded to 4, grid_t 2, 8 tokens);
    video_max_pixels resizes each frame first (56 x 42 under 1200 pixels: x sqrt(1200 / 2352) = 0.714 -> about 40 x 30,
    which the processor rounds to 28 x 28: 1 token per temporal step; 2 steps: 2 tokens)."""
    _, vision, _ = _run(vlm_dirs["qwen2_vl"], video_maxlen=3)
    assert vision.video_seqlen(clips["ten"][0]) == 8
    _, vision, _ = _run(vlm_dirs["qwen2_vl"], video_max_pixels=1200)
    assert vision.video_seqlen(clips["nine"][0]) == 2
    _, plain, _ = _run(vlm_dirs["qwen2_vl"])
    assert plain.identity != vision.identity  # the encoded-data cache tells the two apart


def test_qwen3_vl_timestamps_follow_video_maxlen(vlm_dirs, clips):
    """Qwen3-VL under video_maxlen 3: the ten-frame clip keeps frames 0, 4, 9 (padded to 0, 4, 9, 9), two temporal
    steps of 2 tokens at (0 + 4) / 8 = 0.5 s and (9 + 9) / 8 = 2.25 s, written "0.5" and "2.2"."""
    _, vision, _ = _run(vlm_dirs["qwen3_vl"], "qwen3_vl_nothink", video_maxlen=3)
    step = "<|vision_start|><|video_pad|><|video_pad|><|vision_end|>"
    assert vision.video_text(clips["ten"][0]) == f"<0.5 seconds>{step}<2.2 seconds>{step}"


def _clips_folder(root: Path, clips, truncate: int | None = None) -> Path:
    """A ShareGPT preference dataset of four video records (LF's `videos` column); record `truncate` cut short."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for n in range(4):
        data = video_bytes(frames(4 + 2 * n, seed=10 + n), fps=4)
        if n == truncate:
            data = data[:len(data) // 2]
        (root / f"clip{n}.mp4").write_bytes(data)
        records.append({"conversations": [{"from": "human", "value": f"<video>What moves in clip {n}?"}],
                        "chosen": {"from": "gpt", "value": "a red box"}, "rejected": {"from": "gpt", "value": "no"},
                        "videos": [f"clip{n}.mp4"]})
    (root / "clips.json").write_text(json.dumps(records))
    (root / "dataset_info.json").write_text(json.dumps({"clips": {
        "file_name": "clips.json", "ranking": True, "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "videos": "videos"}}}))
    return root


def test_a_truncated_video_is_a_named_record_error_or_a_counted_skip(vlm_dirs, clips, tmp_path):
    """In-process, a video cut in half (its MP4 index lost) is a render error naming the field and the video; under
    on_bad_record: skip the other pairs encode and the skip is counted."""
    _, _, renderer = _run(vlm_dirs["qwen2_vl"])
    data = clips["ten"][0][:len(clips["ten"][0]) // 2]
    pair = PreferencePair([{"role": "user", "content": "<video>What happens?"}], "A box.", "A cat.",
                          RecordSource("clips.json", 3), videos=(data,))
    with pytest.raises(PairError) as caught:
        encode_pair(pair, renderer, 1024)
    assert (caught.value.stage, caught.value.field) == ("render", "videos")
    assert caught.value.reason.startswith("video 1 of the prompt is not a readable video (")
    good = _pairs(clips)[0]
    _, stats = encode_pairs([good, pair], renderer, 1024, cache_dir=tmp_path, on_bad_record="skip")
    assert stats["pairs"] == 1 and stats["skipped"] == 1 and stats["rejects"][0]["field"] == "videos"


def test_the_cli_names_a_truncated_video_and_counts_its_skip(vlm_dirs, clips, tmp_path):
    """`prefalign data` on a dataset whose record 2's video is truncated: one error line naming the file, record and
    field, exit 2; with on_bad_record=skip the three good pairs load and the skip is counted at stage render, and the
    summary counts their videos: clips of 4, 6 and 10 frames at 4 fps (1, 1.5 and 2.5 s) keep floor(2 x duration) =
    2, 3 and 5 frames, 2, 4 and 6 given to the processor (even counts): 12 frames, 1 + 2 + 3 temporal steps of 4
    tokens (56 x 42 -> 56 x 56): 24 video tokens."""
    data_dir = _clips_folder(tmp_path / "data", clips, truncate=2)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "prefalign", "data", str(EXAMPLES / "lora_dpo.yaml"),
                               f"model_name_or_path={vlm_dirs['qwen2_vl']}", "build_demo_model=false",
                               f"dataset_dir={data_dir}", "dataset=clips", "val_size=0", "template=qwen2_vl", *args],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)

    failed = run()
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("prefalign data: error:")]
    assert len(errors) == 1 and "clips.json record 2" in errors[0] and "videos" in errors[0], errors
    assert "is not a readable video" in errors[0] and "on_bad_record: skip" in errors[0]
    skipped = run("on_bad_record=skip")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "skipped records by stage: render 1 (see rejected_records.jsonl)" in skipped.stdout.splitlines(), \
        skipped.stdout
    assert "train: 3 pairs with videos, 3 videos, 12 sampled frames, 24 video tokens" in skipped.stdout.splitlines()


def test_the_reference_cache_key_covers_the_video_bytes(vlm_dirs, tmp_path):
    """Two clips of the same length and size give the same token ids but other log-probs: the reference cache's
    data fingerprint differs (it hashes each video's bytes), and the encoded-data cache keeps them apart."""
    from prefalign.reference_cache import dataset_fingerprint

    _, _, renderer = _run(vlm_dirs["qwen2_vl"])
    splits = []
    for seed in (5, 6):
        pair = PreferencePair([{"role": "user", "content": "<video>What happens?"}], "A box.", "A cat.",
                              RecordSource("clips.json", 0), videos=(video_bytes(frames(10, seed=seed), fps=4),))
        splits.append(encode_pairs([pair], renderer, 1024, cache_dir=tmp_path)[0])
    assert splits[0]["prompt_ids"] == splits[1]["prompt_ids"] and splits[0]["videos"] != splits[1]["videos"]
    assert dataset_fingerprint(splits[0]) != dataset_fingerprint(splits[1])


def test_truncation_never_cuts_a_video(vlm_dirs, clips):
    """A prompt whose 12 video tokens do not fit within cutoff_len beside the reply is refused (stage tokenize,
    field videos), not cut through the video."""
    _, _, renderer = _run(vlm_dirs["qwen2_vl"])
    pair = _pairs(clips)[0]
    assert encode_pair(pair, renderer, 1024)["prompt_ids"]  # fits without a cut
    with pytest.raises(PairError) as caught:
        encode_pair(pair, renderer, 20)
    assert (caught.value.stage, caught.value.field) == ("tokenize", "videos")
    assert "1 video(s) take 14 tokens" in caught.value.reason  # 12 video pads and the two vision markers


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_train_on_video_pairs_from_the_command_line(vlm_dirs, clips, tmp_path, family):
    """`prefalign train` with LoRA on the four-clip dataset: the first logged loss is ln 2 (policy == reference,
    the adapter disabled) and training moves it; the vision tower runs once per pair. data_summary.json counts the
    videos: clips of 4, 6, 8, 10 frames at 4 fps keep 2, 3, 4, 5 frames, 2, 4, 4, 6 given to the processor (16), in
    1 + 2 + 2 + 3 = 8 temporal steps of 4 tokens (Qwen3-VL: 2, CLIPS): 32 (16) video tokens."""
    data_dir = _clips_folder(tmp_path / "data", clips)
    run = subprocess.run([sys.executable, "-m", "prefalign", "train", str(EXAMPLES / "lora_dpo.yaml"),
                          f"model_name_or_path={vlm_dirs[family]}", "build_demo_model=false",
                          f"dataset_dir={data_dir}", "dataset=clips", "val_size=0", f"template={TEMPLATE[family]}",
                          f"output_dir={tmp_path / 'out'}", "max_steps=2", "per_device_train_batch_size=2",
                          "gradient_accumulation_steps=1", "learning_rate=1e-2", "logging_steps=1", "warmup_ratio=0",
                          "plot_loss=false", "bf16=false", "dataloader_num_workers=0", "eval_strategy=no"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[0] == pytest.approx(0.6931, abs=1e-4) and abs(losses[-1] - 0.6931) > 1e-3
    summary = json.loads((tmp_path / "out" / "data_summary.json").read_text())["train"]
    assert {k: summary[k] for k in ("pairs_with_videos", "videos", "video_frames", "video_tokens")} == {
        "pairs_with_videos": 4, "videos": 4, "video_frames": 16, "video_tokens": 8 * (2 if family == "qwen3_vl" else 4)}
    runs = [h["vision/tower_runs_per_pair"] for h in history if "vision/tower_runs_per_pair" in h]
    assert runs and all(r == pytest.approx(1.0) for r in runs)


def test_chat_answers_about_a_video_and_refuses_one_for_a_family_without_videos(vlm_dirs, clips, tmp_path):
    """`prefalign chat --video` on the tiny Qwen3-VL: the greedy answer is the model's own `generate` on its
    processor's inputs for the conversation (the video before the text, as LF's chat places it when the message
    has no `<video>`); on a LLaVA model (no videos in LF either) a one-line error, no traceback."""
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(clips["ten"][0])

    def chat(model, template):
        return subprocess.run([sys.executable, "-m", "prefalign", "chat", str(EXAMPLES / "lora_dpo.yaml"),
                               f"model_name_or_path={model}", "build_demo_model=false", f"template={template}",
                               "finetuning_type=full", "max_new_tokens=6", "do_sample=false", "bf16=false", "--video", str(clip), "--prompt",
                               "What moves?"], capture_output=True, text=True, timeout=300, cwd=tmp_path)

    run = chat(vlm_dirs["qwen3_vl"], "qwen3_vl_nothink")
    assert run.returncode == 0, run.stderr[-3000:]
    path = vlm_dirs["qwen3_vl"]
    processor = load_processor(path)
    pair = PreferencePair([{"role": "user", "content": "<video>What moves?"}], "", "", RecordSource("chat", 0),
                          videos=(clips["ten"][0],))
    prompt_ids, inputs = _processor_inputs(processor, pair, "", clips, "qwen3_vl")
    model = load_causal_lm(path, ModelArguments(model_name_or_path=path)).eval()
    n = len(prompt_ids)  # the processor's inputs for the prompt alone (no reply, no end of turn)
    inputs["input_ids"], inputs["attention_mask"] = inputs["input_ids"][:, :n], inputs["attention_mask"][:, :n]
    inputs["mm_token_type_ids"] = inputs["mm_token_type_ids"][:, :n]
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=[end],
                                pad_token_id=processor.tokenizer.pad_token_id)
    expected = processor.tokenizer.decode(output[0, n:], skip_special_tokens=True)
    answer = next(line for line in run.stdout.splitlines() if line.startswith("Assistant: "))
    assert answer.removeprefix("Assistant: ").strip() == expected.strip(), (run.stdout, expected)

    llava = build_vlm("llava", tmp_path / "llava")
    refused = chat(llava, "llava")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    errors = [line for line in refused.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "--video" in errors[0] and "take no videos" in errors[0], refused.stderr
