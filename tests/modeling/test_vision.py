"""Vision-language models: image tokens, batches and log-probs against each family's own processor.

The tiny models (tests/mm_helpers.py) are random Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA and Gemma 3 models with
their real processors; the images are drawn with PIL at sizes LLaMA-Factory's resize leaves alone
(between image_min_pixels and image_max_pixels, each side at least 28), so the processor alone, given the
same images, is an independent computation of what prefalign must produce.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mm_helpers import build_vlm, draw_image, load_processor, png_bytes  # noqa: E402

from prefalign.config.args import DataArguments, FinetuningArguments, ModelArguments  # noqa: E402
from prefalign.contracts import IGNORE_INDEX, PreferencePair, RecordSource  # noqa: E402
from prefalign.data.chat import ChatRenderer  # noqa: E402
from prefalign.data.collate import PairCollator, PrefixSharedCollator  # noqa: E402
from prefalign.data.encode import encode_pair, encode_pairs  # noqa: E402
from prefalign.data.media import open_image  # noqa: E402
from prefalign.errors import ConfigError, PairError  # noqa: E402
from prefalign.modeling.layout import choose_layout  # noqa: E402
from prefalign.modeling.load import load_causal_lm, load_policy, load_tokenizer  # noqa: E402
from prefalign.modeling.logprobs import pair_logps  # noqa: E402
from prefalign.modeling.vision import image_features_fixed, load_vision  # noqa: E402

FAMILIES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl", "qwen3_vl": "qwen3_vl_nothink", "llava": "llava",
            "gemma3": "gemma3"}

# The conversation as LLaMA-Factory's template of each family writes it, as a chat template for the family's
# processor (image parts as the family's image marker, which the processor expands).
QWEN2_VL_CHAT = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
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
# LLaMA-Factory's gemma3: BOS, then user turns that end with the model's header (the processor writes each
# <start_of_image> as its full image sequence)
GEMMA3_CHAT = (
    "{{ '<bos>' }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '<start_of_turn>user\\n' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{{ '<end_of_turn>\\n<start_of_turn>model\\n' }}"
    "{% else %}{{ message['content'][0]['text'] + '<end_of_turn>\\n' }}{% endif %}{% endfor %}"
)
CHAT = {"qwen2_vl": QWEN2_VL_CHAT, "qwen2_5_vl": QWEN2_VL_CHAT, "qwen3_vl": QWEN3_VL_CHAT, "llava": LLAVA_CHAT,
        "gemma3": GEMMA3_CHAT}
REPLY_END = {"llava": "</s>", "gemma3": "<end_of_turn>\n"}  # LF's assistant slot after the reply (Qwen: below)


def png(width: int, height: int, *, seed: int = 0) -> bytes:
    return png_bytes(draw_image(seed, (width, height)))


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {family: build_vlm(family, root / family) for family in FAMILIES}


def _run(family, path, **model_keys):
    model_args = ModelArguments(model_name_or_path=path, **model_keys)
    data_args = DataArguments(template=FAMILIES[family], dataset=["x"], cutoff_len=1024)
    tokenizer = load_tokenizer(model_args)
    vision = load_vision(model_args, data_args, tokenizer)
    return tokenizer, vision, ChatRenderer.from_config(tokenizer, data_args, vision)


def _pairs():
    """Three pairs: two images (one before the text, one after), one image, three images over two user turns."""
    src = RecordSource("pairs.json", 0)
    return [
        PreferencePair([{"role": "user", "content": "<image>What is this? <image>"}], "A red box.", "A cat.",
                       src, images=(png(40, 30), png(60, 60, seed=1))),
        PreferencePair([{"role": "user", "content": "Look: <image>"}], "Blue.", "Green sky is here.",
                       RecordSource("pairs.json", 1), images=(png(30, 50, seed=2),)),
        PreferencePair([{"role": "user", "content": "<image> and <image>?"}, {"role": "assistant", "content": "Two."},
                        {"role": "user", "content": "Now <image>"}], "One more.", "None.",
                       RecordSource("pairs.json", 2), images=(png(56, 42, seed=3), png(28, 64, seed=4),
                                                              png(44, 44, seed=5))),
    ]


def _parts(content: str) -> list[dict]:
    """A message's text with `<image>` placeholders as the processor's chat-template content parts."""
    pieces = content.split("<image>")
    parts = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
    for piece in pieces[1:]:
        parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _reply_end(family: str, tokenizer) -> str:
    return REPLY_END.get(family, "<|im_end|>\n")


def _processor_ids(family, processor, pair: PreferencePair, reply: str):
    """The family's processor on the conversation: (prompt ids, prompt + reply ids, model inputs)."""
    messages = [{"role": m["role"], "content": _parts(m["content"]) if m["role"] == "user"
                 else [{"type": "text", "text": m["content"]}]} for m in pair.prompt]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=family not in REPLY_END,
                                           tokenize=False, chat_template=CHAT[family])  # user turns end with the header
    images = [open_image(data) for data in pair.images]
    prompt_ids = processor(text=[prompt], images=images, return_tensors="pt")["input_ids"][0].tolist()
    inputs = processor(text=[prompt + reply + _reply_end(family, processor.tokenizer)], images=images,
                       return_tensors="pt")
    return prompt_ids, inputs["input_ids"][0].tolist(), inputs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_image_tokens_and_label_masks_equal_the_processors(vlm_dirs, family):
    """Each `<image>` becomes as many image tokens as the family's processor writes for that image, at the
    same place; the collator's labels are -100 exactly on the processor's prompt tokens and padding; the token
    types the processor gives the model (Gemma 3's `token_type_ids`: its bidirectional attention within an image;
    Qwen's `mm_token_type_ids`) are the batch's, row by row."""
    tokenizer, vision, renderer = _run(family, vlm_dirs[family])
    processor = load_processor(vlm_dirs[family])
    pairs = _pairs()
    features = []
    for i, pair in enumerate(pairs):
        encoded = encode_pair(pair, renderer, 1024)
        for side, reply in (("chosen_ids", pair.chosen), ("rejected_ids", pair.rejected)):
            prompt_ids, full_ids, _ = _processor_ids(family, processor, pair, reply)
            assert encoded["prompt_ids"] == prompt_ids
            assert encoded["prompt_ids"] + encoded[side] == full_ids
        features.append({**encoded, "images": list(pair.images), "index": i})
    batch = PairCollator(tokenizer.pad_token_id, vision=vision)(features)
    for row in range(2 * len(pairs)):
        pair = pairs[row % len(pairs)]
        reply = pair.chosen if row < 3 else pair.rejected
        prompt_ids, full_ids, inputs = _processor_ids(family, processor, pair, reply)
        expected = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids):]
        expected += [IGNORE_INDEX] * (batch["labels"].shape[1] - len(expected))
        assert batch["labels"][row].tolist() == expected
        for key in ("token_type_ids", "mm_token_type_ids"):
            if key in inputs:
                assert batch[key][row, :len(full_ids)].tolist() == inputs[key][0].tolist(), key
                assert not batch[key][row, len(full_ids):].any()
    assert family != "gemma3" or "token_type_ids" in inputs  # (so the check above is not vacuous)
    image_id = tokenizer.convert_tokens_to_ids(vision.plugin.image_token)
    assert int((batch["input_ids"] == image_id).sum()) > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batch_log_probs_equal_one_pair_at_a_time_with_the_processor(vlm_dirs, family):
    """A batch of three pairs (1-3 images each, padded rows): each pair's summed chosen and rejected
    log-probs equal the model's own forward on the processor's inputs for that pair alone, summed over the
    reply's tokens by hand (log-softmax of the logits at the positions before each reply token)."""
    path = vlm_dirs[family]
    tokenizer, vision, renderer = _run(family, path)
    processor = load_processor(path)
    pairs = _pairs()
    features = [{**encode_pair(p, renderer, 1024), "images": list(p.images), "index": i} for i, p in enumerate(pairs)]
    batch = PairCollator(tokenizer.pad_token_id, vision=vision)(features)
    model = load_causal_lm(path, ModelArguments(model_name_or_path=path)).eval()
    with torch.no_grad():
        got = pair_logps(model, batch)
        for i, pair in enumerate(pairs):
            for side, reply in (("chosen", pair.chosen), ("rejected", pair.rejected)):
                prompt_ids, full_ids, inputs = _processor_ids(family, processor, pair, reply)
                logits = model(**inputs).logits[0, :-1].float()
                token = logits.log_softmax(-1).gather(-1, inputs["input_ids"][0, 1:, None])[:, 0]
                expected = token[len(prompt_ids) - 1:].sum()
                assert torch.allclose(getattr(got, side)[i], expected, atol=1e-4), (family, i, side)


def test_lf_resize_rules_shape_the_image_tokens(vlm_dirs):
    """image_max_pixels scales a large image down before the processor (aspect kept), as LLaMA-Factory:
    a 100 x 50 image under image_max_pixels 1250 is scaled by sqrt(1250 / 5000) = 0.5 to 50 x 25, then Qwen's
    28-pixel minimum side makes it 50 x 28; the processor rounds that to 56 x 28 = 4 x 2 patches of 14 px
    (grid 1 x 2 x 4), 8 / (2 x 2 merge) = 2 image tokens. Under LF's defaults (1024 to 768² pixels) 100 x 50
    stays as it is."""
    _, vision, _ = _run("qwen2_vl", vlm_dirs["qwen2_vl"], image_max_pixels=1250)
    assert vision.prepared(png(100, 50)).size == (50, 28)
    assert vision.seqlen(png(100, 50)) == 2
    _, vision, _ = _run("qwen2_vl", vlm_dirs["qwen2_vl"])
    assert vision.prepared(png(100, 50)).size == (100, 50)
    _, vision, _ = _run("qwen2_vl", vlm_dirs["qwen2_vl"])
    assert vision.prepared(png(40, 20)).size[1] == 28


def test_truncation_never_cuts_an_image(vlm_dirs, tmp_path):
    """A pair whose image tokens do not fit within cutoff_len beside the reply is refused at tokenize with
    field images, and is a counted skip under on_bad_record: skip; a pair cut only in text before its image
    keeps every image token (a built-in template cuts as LLaMA-Factory does, keeping the prompt's start, so the
    text after the image is cut)."""
    tokenizer, vision, renderer = _run("qwen2_vl", vlm_dirs["qwen2_vl"])
    pair = _pairs()[0]
    with pytest.raises(PairError) as caught:
        encode_pair(pair, renderer, 16)
    assert (caught.value.stage, caught.value.field) == ("tokenize", "images")
    assert "cutoff_len 16" in caught.value.reason
    long_text = PreferencePair([{"role": "user", "content": "<image>" + " words" * 40}], "Yes.", "No.",
                               RecordSource("pairs.json", 3), images=(png(40, 30),))
    full = encode_pair(long_text, renderer, 1024)
    cut = encode_pair(long_text, renderer, len(full["prompt_ids"]) - 20)
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert len(cut["prompt_ids"]) < len(full["prompt_ids"])
    assert cut["prompt_ids"].count(image_id) == full["prompt_ids"].count(image_id) > 0
    dataset, stats = encode_pairs([pair, long_text], renderer, 16, cache_dir=tmp_path, on_bad_record="skip")
    assert stats["skipped"] >= 1 and stats["skipped"] + len(dataset) == 2
    assert stats["rejects"][0]["index"] == 0 and stats["rejects"][0]["field"] == "images"


def test_images_are_part_of_the_cache_keys(vlm_dirs, tmp_path):
    """The same text with another image encodes to another cache entry (and other image tokens), and the
    precomputed reference's data fingerprint changes with the image bytes even where the ids do not."""
    from prefalign.reference_cache import dataset_fingerprint

    _, _, renderer = _run("qwen2_vl", vlm_dirs["qwen2_vl"])
    one = PreferencePair([{"role": "user", "content": "<image>"}], "a", "b", RecordSource("f", 0),
                         images=(png(40, 30, seed=1),))
    other = PreferencePair(one.prompt, "a", "b", one.source, images=(png(40, 30, seed=2),))
    first, _ = encode_pairs([one], renderer, 256, cache_dir=tmp_path)
    second, _ = encode_pairs([other], renderer, 256, cache_dir=tmp_path)
    assert first["prompt_ids"] == second["prompt_ids"]  # same size: same tokens
    assert first["images"] != second["images"]
    assert dataset_fingerprint(first) != dataset_fingerprint(second)


def test_vision_models_pack_and_share_the_prompt_by_default(vlm_dirs):
    """Qwen families and LLaVA: packing and prefix sharing on by default, with no note (their image inputs
    follow a packed row: the equality tests above and below); Gemma 3 (its image tokens attend both ways)
    takes the plain layout, with its reason, and a `true` is refused naming it."""
    from transformers import Gemma3Config

    from prefalign.modeling.layout import unsupported

    for family in ("qwen2_vl", "qwen3_vl", "llava"):
        path = vlm_dirs[family]
        model = load_causal_lm(path, ModelArguments(model_name_or_path=path))
        layout = choose_layout(FinetuningArguments(), DataArguments(dataset=["x"]), model)
        assert (layout.packing, layout.prefix_sharing, layout.notes) == (True, True, ()), family
    gemma3 = Gemma3Config()
    for sharing in (False, True):
        assert "attend to each other in both directions" in unsupported(gemma3, sharing_prompt=sharing,
                                                                        cutoff_len=1024)
    gemma = load_causal_lm(vlm_dirs["gemma3"], ModelArguments(model_name_or_path=vlm_dirs["gemma3"]))
    layout = choose_layout(FinetuningArguments(), DataArguments(dataset=["x"]), gemma)
    assert not layout.packing and not layout.prefix_sharing
    assert len(layout.notes) == 2 and all("both directions" in note for note in layout.notes)
    with pytest.raises(ConfigError, match="packing: true"):
        choose_layout(FinetuningArguments(packing=True), DataArguments(dataset=["x"]), gemma)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava"])
def test_prefix_sharing_with_images_equals_the_plain_layout(vlm_dirs, family):
    """Prompt+chosen+rejected in one row, the prompt's images once: each pair's chosen and rejected log-probs
    and every gradient (tower, projector and language model all trained) equal the plain layout's, on pairs
    with one to three images and a multi-turn prompt; the tower sees each pair's patches once. Without the
    3-D positions (the collator's 1-D ones, as for text), or with the rejected reply's positions counted from
    the chosen reply's end, this test fails (both checked by changing the code). LLaVA's positions are 1-D,
    the collator's."""
    path = vlm_dirs[family]
    tokenizer, vision, renderer = _run(family, path)
    pairs = _pairs()
    features = [{**encode_pair(p, renderer, 1024), "images": list(p.images), "index": i} for i, p in enumerate(pairs)]
    plain = PairCollator(tokenizer.pad_token_id, vision=vision)(features)
    shared = PrefixSharedCollator(tokenizer.pad_token_id, vision=vision)(features)
    ft = FinetuningArguments(finetuning_type="full", freeze_vision_tower=False, freeze_multi_modal_projector=False)
    model = load_policy(ModelArguments(model_name_or_path=path), ft)
    seen = []
    first = model.model.visual.patch_embed if family != "llava" else model.model.vision_tower.embeddings
    first.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    results = []
    for batch in (plain, shared):
        model.zero_grad()
        seen.clear()
        logps = pair_logps(model, batch)
        (logps.chosen.sum() - 0.5 * logps.rejected.sum()).backward()
        results.append((logps, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        sum(seen)))
    (want, want_grads, want_seen), (got, got_grads, got_seen) = results
    assert torch.allclose(got.chosen, want.chosen, atol=1e-5, rtol=0)
    assert torch.allclose(got.rejected, want.rejected, atol=1e-5, rtol=0)
    assert torch.equal(got.chosen_tokens, want.chosen_tokens) and torch.equal(got.rejected_tokens, want.rejected_tokens)
    assert set(got_grads) == set(want_grads) and any("visual" in n or "vision_tower" in n for n in want_grads)
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, atol=1e-5, rtol=1e-4), name
    once = int(shared["image_grid_thw"].prod(-1).sum()) if family != "llava" else shared["pixel_values"].shape[0]
    assert got_seen == want_seen == once


def _lora_policy(path):
    """A LoRA policy adapting the language model and the vision tower, its B matrices moved off zero (so every
    LoRA parameter has a gradient)."""
    policy = load_policy(ModelArguments(model_name_or_path=path),
                         FinetuningArguments(finetuning_type="lora", freeze_vision_tower=False))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return policy


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava"])
@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_packing_with_images_equals_the_plain_layout(vlm_dirs, family, prefix_sharing):
    """Packed rows (one row for the micro-batch, and one block per row, longest first, so the rows' image order
    is not the pairs'), with and without prefix sharing: each sequence's image tokens in the row, the images'
    tensors in the same order, the 3-D rotary positions restarting per sequence. The per-pair log-probs, the
    DPO loss and the gradient of every LoRA parameter (language model and vision tower) equal the plain layout's,
    on pairs with one to three images of different sizes beside a text-only pair, and the tower sees each
    pair's images once. (Checked to fail with the rows' positions counted on across the row, and with the
    images in pair order instead of row order.)"""
    from prefalign.data.packing import PackedCollator

    path = vlm_dirs[family]
    tokenizer, vision, renderer = _run(family, path)
    pairs = _pairs() + [PreferencePair([{"role": "user", "content": "No picture here, just words."}], "Fine.",
                                       "Not fine at all.", RecordSource("pairs.json", 3))]
    features = [{**encode_pair(p, renderer, 1024), "images": list(p.images), "index": i} for i, p in enumerate(pairs)]
    policy = _lora_policy(path)
    lm = policy.get_base_model()
    first = lm.model.visual.patch_embed if family != "llava" else lm.model.vision_tower.embeddings
    seen = []
    first.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    reference = torch.tensor([-30.0, -20.0, -40.0, -25.0]), torch.tensor([-35.0, -30.0, -38.0, -30.0])

    def scored(batch):
        policy.zero_grad()
        seen.clear()
        logps = pair_logps(policy, batch)
        margin = (logps.chosen - reference[0]) - (logps.rejected - reference[1])
        loss = -torch.nn.functional.logsigmoid(0.1 * margin).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
        return logps, loss.detach(), grads, sum(seen)

    want, want_loss, want_grads, _ = scored(PairCollator(tokenizer.pad_token_id, vision=vision)(features))
    assert any("visual" in n or "vision_tower" in n for n in want_grads) and all(
        g.abs().sum() > 0 for g in want_grads.values())
    images = vision.model_inputs([data for p in pairs for data in p.images])
    once = int(images["image_grid_thw"].prod(-1).sum()) if family != "llava" else images["pixel_values"].shape[0]
    for packing_length in (0, 1):
        batch = PackedCollator(tokenizer.pad_token_id, prefix_sharing, packing_length, vision=vision)(features)
        assert batch["input_ids"].shape[0] == (1 if packing_length == 0 else len(pairs))
        got, loss, grads, got_seen = scored(batch)
        assert torch.allclose(got.chosen, want.chosen, atol=1e-5, rtol=0), packing_length
        assert torch.allclose(got.rejected, want.rejected, atol=1e-5, rtol=0), packing_length
        assert torch.equal(got.chosen_tokens, want.chosen_tokens)
        assert torch.allclose(loss, want_loss, atol=1e-6, rtol=0)
        for name, grad in want_grads.items():
            assert torch.allclose(grads[name], grad, atol=1e-5, rtol=1e-4), (packing_length, name)
        assert got_seen == once


def test_packed_spans_never_reach_the_vision_towers_attention(vlm_dirs):
    """Where the tower is not run beforehand (`vision_once=False`; transformers before `mm_encoder_outputs`,
    as on the GPU machine's 5.17), the model's forward hands the decoder's keywords (a packed batch's spans)
    to the vision tower too: its attention must stay the model's own, not the packed one, whose spans index
    text positions. The packed log-probs then equal the plain layout's. (Failed before the fix here on the
    last assertion, the tower switched with the language model; on transformers 5.17 the tower's attention
    took the spans, a size mismatch in sdpa.)"""
    from prefalign.data.packing import PackedCollator

    path = vlm_dirs["qwen2_vl"]
    tokenizer, vision, renderer = _run("qwen2_vl", path)
    features = [{**encode_pair(p, renderer, 1024), "images": list(p.images), "index": i}
                for i, p in enumerate(_pairs())]
    model = load_policy(ModelArguments(model_name_or_path=path), FinetuningArguments(finetuning_type="full"))
    with torch.no_grad():
        want = pair_logps(model, PairCollator(tokenizer.pad_token_id, vision=vision)(features), vision_once=False)
        got = pair_logps(model, PackedCollator(tokenizer.pad_token_id, False, 0, vision=vision)(features),
                         vision_once=False)
    assert torch.allclose(got.chosen, want.chosen, atol=1e-5, rtol=0)
    assert torch.allclose(got.rejected, want.rejected, atol=1e-5, rtol=0)
    assert model.config.vision_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "gemma3"])
def test_lora_all_never_touches_a_frozen_tower_or_projector(vlm_dirs, family):
    """lora_target: all adapts the language model's linear layers only (LF's find_all_linear_modules +
    patch_target_modules); freeze_vision_tower: false lets it adapt the tower's layers too; full tuning trains
    neither tower nor projector by default, and nothing of the language model with freeze_language_model."""
    path = vlm_dirs[family]
    model_args = ModelArguments(model_name_or_path=path)
    tower, projector = {"qwen2_vl": ("visual.blocks", "visual.merger"),
                        "llava": ("vision_tower", "multi_modal_projector"),
                        "gemma3": ("vision_tower", "multi_modal_projector")}[family]
    lora = load_policy(model_args, FinetuningArguments(finetuning_type="lora"))
    adapted = {name for name, p in lora.named_parameters() if p.requires_grad}
    assert adapted and all("lora_" in name and "language_model" in name for name in adapted)
    assert image_features_fixed(lora)  # its reference may reuse its image features
    lora = load_policy(model_args, FinetuningArguments(finetuning_type="lora", freeze_vision_tower=False))
    adapted = {name for name, p in lora.named_parameters() if p.requires_grad}
    assert any(tower in name for name in adapted) and not any(projector in name for name in adapted)
    assert not image_features_fixed(lora)  # an adapted tower: the reference encodes the images itself
    full = load_policy(model_args, FinetuningArguments(finetuning_type="full"))
    trained = {name for name, p in full.named_parameters() if p.requires_grad}
    assert trained and not any(tower in n or projector in n for n in trained)
    assert any("language_model" in n for n in trained)
    frozen_lm = load_policy(model_args, FinetuningArguments(finetuning_type="full", freeze_language_model=True,
                                                            freeze_multi_modal_projector=False))
    trained = {name for name, p in frozen_lm.named_parameters() if p.requires_grad}
    assert trained and all(projector in n for n in trained)


def test_step0_loss_is_ln2_with_images(vlm_dirs):
    """Policy == reference at step 0 (LoRA, the adapter off): every pair's sigmoid DPO loss is ln 2 exactly."""
    path = vlm_dirs["qwen2_vl"]
    tokenizer, vision, renderer = _run("qwen2_vl", path)
    pairs = _pairs()
    features = [{**encode_pair(p, renderer, 1024), "images": list(p.images), "index": i} for i, p in enumerate(pairs)]
    batch = PairCollator(tokenizer.pad_token_id, vision=vision)(features)
    policy = load_policy(ModelArguments(model_name_or_path=path), FinetuningArguments(finetuning_type="lora"))
    with torch.no_grad():
        logps = pair_logps(policy, batch)
        with policy.disable_adapter():
            reference = pair_logps(policy, batch)
    margin = (logps.chosen - reference.chosen) - (logps.rejected - reference.rejected)
    losses = -torch.nn.functional.logsigmoid(0.1 * margin)
    assert torch.equal(margin, torch.zeros_like(margin))
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=0, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_vision_tower_runs_once_per_pair_with_the_same_losses_and_gradients(vlm_dirs, family):
    """The concatenated layout's rejected rows repeat the chosen rows' images. Encoding them once and handing
    each image's features to both rows gives the log-probs and the gradients (of a trained tower, projector
    and language model) of encoding every row's copy, while the tower's first layer sees half the inputs:
    Qwen: the pairs' patches once (Σ t·h·w of each image's grid), LLaVA and Gemma 3: the pairs' images once."""
    path = vlm_dirs[family]
    tokenizer, vision, renderer = _run(family, path)
    pairs = _pairs()
    features = [{**encode_pair(p, renderer, 1024), "images": list(p.images), "index": i} for i, p in enumerate(pairs)]
    batch = PairCollator(tokenizer.pad_token_id, vision=vision)(features)
    ft = FinetuningArguments(finetuning_type="full", freeze_vision_tower=False, freeze_multi_modal_projector=False)
    model = load_policy(ModelArguments(model_name_or_path=path), ft)
    first = model.model.visual.patch_embed if family.startswith("qwen") else model.model.vision_tower.embeddings
    seen = []
    first.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    results = {}
    for once in (False, True):
        model.zero_grad()
        seen.clear()
        logps = pair_logps(model, batch, vision_once=once)
        (logps.chosen.sum() - 0.5 * logps.rejected.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[once] = (logps, grads, sum(seen))
    (plain, plain_grads, plain_seen), (shared, shared_grads, shared_seen) = results[False], results[True]
    assert torch.allclose(plain.chosen, shared.chosen, atol=1e-5)
    assert torch.allclose(plain.rejected, shared.rejected, atol=1e-5)
    assert set(plain_grads) == set(shared_grads) and any("visual" in n or "vision_tower" in n for n in plain_grads)
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, shared_grads[name], atol=1e-5, rtol=1e-4), name
    images = [data for p in pairs for data in p.images]
    once = (int(vision.model_inputs(images)["image_grid_thw"].prod(-1).sum()) if family.startswith("qwen")
            else len(images))
    assert (plain_seen, shared_seen) == (2 * once, once)


def test_a_text_template_refuses_image_pairs_by_name(vlm_dirs):
    """Images are never dropped silently: with a template that has no image slots (LF's `qwen`), or the
    tokenizer's own chat template (even with the model's image processor), an image pair is a render error
    naming the field and the templates that take images."""
    path = vlm_dirs["qwen2_vl"]
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=path))
    _, vision, _ = _run("qwen2_vl", path)
    for renderer in (ChatRenderer.from_config(tokenizer, DataArguments(template="qwen", dataset=["x"])),
                     ChatRenderer.from_config(tokenizer, DataArguments(dataset=["x"]), vision)):
        with pytest.raises(PairError) as caught:
            encode_pair(_pairs()[1], renderer, 1024)
        assert (caught.value.stage, caught.value.field) == ("render", "images")
        assert "qwen2_vl" in caught.value.reason
    assert load_vision(ModelArguments(model_name_or_path=path), DataArguments(template="qwen", dataset=["x"]),
                       tokenizer) is None


@pytest.mark.parametrize("family, finetuning_type", [("qwen2_vl", "lora"), ("llava", "full"), ("qwen3_vl", "lora"),
                                                       ("gemma3", "lora")])
def test_the_reference_reuses_the_policys_frozen_image_features(vlm_dirs, tmp_path, family, finetuning_type):
    """With the tower and projector frozen (the defaults), the adapter-disabled or frozen-copy reference takes
    the policy's image features: one tower run per batch for policy and reference together, and the same
    loss as the reference encoding the images itself (the LoRA B / full weights perturbed, so policy != ref)."""
    from prefalign.config import build_config
    from prefalign.scoring import build_planned_reference, reference_plan, score_batch

    path = vlm_dirs[family]
    tokenizer, vision, renderer = _run(family, path)
    features = [{**encode_pair(p, renderer, 1024), "images": list(p.images), "index": i}
                for i, p in enumerate(_pairs())]
    collators = [PairCollator] + ([PrefixSharedCollator] if family.startswith("qwen") else [])
    config = build_config({"model_name_or_path": path, "finetuning_type": finetuning_type, "template": FAMILIES[family],
                           "dataset": "x", "output_dir": str(tmp_path / "out"), "report_to": "none"})
    policy = load_policy(config.model, config.finetuning)
    reference = build_planned_reference(config, reference_plan(config, "train"), policy)
    assert reference.same_image_features
    with torch.no_grad():  # as if trained: the policy moves away from its reference
        for name, param in policy.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    calls = []
    for model in {id(policy): policy, id(reference.model): reference.model}.values():
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        tower = lm.model.visual.patch_embed if family.startswith("qwen") else lm.model.vision_tower.embeddings
        tower.register_forward_hook(lambda module, args, out: calls.append(1))
    for collator in collators:  # the plain layout, and the prefix-shared one
        batch = collator(tokenizer.pad_token_id, vision=vision)(features)
        calls.clear()
        reference.same_image_features = True
        out, _, _ = score_batch(policy, reference, config.objective, batch)
        assert len(calls) == 1
        reference.same_image_features = False  # the reference encodes the images itself
        again, _, _ = score_batch(policy, reference, config.objective, batch)
        assert len(calls) == 3
        assert torch.allclose(out.losses, again.losses, atol=1e-6) and (out.losses - math.log(2)).abs().max() > 1e-4


def test_a_pair_with_a_video_is_refused_naming_what_is_missing(vlm_dirs):
    """Where PyAV or a torchvision that loads is missing, videos are read (data/media.py) but not encoded: the pair
    is a render error, field videos (a PairError, so on_bad_record: skip counts it), whose reason says which of
    the two this environment lacks, as a fresh interpreter finds them (torchvision 0.28.0's PyPI wheel is a CUDA
    build: beside torch 2.13.0+cpu it is installed and fails to import). Where both load, videos are encoded
    (tests/modeling/test_video.py)."""
    import importlib.util
    import subprocess

    _, vision, renderer = _run("qwen2_vl", vlm_dirs["qwen2_vl"])
    if vision.video_refusal() is None:
        pytest.skip("PyAV and torchvision load here: videos are encoded (tests/modeling/test_video.py)")
    pair = PreferencePair([{"role": "user", "content": "<video>What happens?"}], "A ball falls.", "Nothing.",
                          RecordSource("pairs.json", 0), videos=(b"\x00\x00\x00\x18ftypmp42",))
    with pytest.raises(PairError) as caught:
        encode_pair(pair, renderer, 1024)
    assert (caught.value.stage, caught.value.field) == ("render", "videos")
    reason = caught.value.reason
    assert "\n" not in reason and "on_bad_record: skip" in reason and "videos are not read here" in reason
    assert ("PyAV (av) is not installed" in reason) == (importlib.util.find_spec("av") is None)
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    assert ("torchvision is not installed" in reason) == ("ModuleNotFoundError" in probe.stderr)
    broken = probe.returncode != 0 and "ModuleNotFoundError" not in probe.stderr
    assert (f"does not load with torch {torch.__version__}" in reason) == broken


def test_expanding_images_checks_the_placeholders_as_reading_a_record_does(vlm_dirs):
    """One placeholder rule (data/media.check_placeholder_count) for records and for `chat --image`, which
    expands a prompt without reading a record: two images for one placeholder is the record check's
    reason; a system message's placeholder is text, neither counted nor expanded (LLaMA-Factory's rule)."""
    from prefalign.data.media import MediaError

    _, vision, _ = _run("qwen2_vl", vlm_dirs["qwen2_vl"])
    image = png(40, 30)
    with pytest.raises(MediaError, match=r"^holds 2 image\(s\) but the prompt has 1 <image> placeholder\(s\)$"):
        vision.expand([{"role": "user", "content": "<image>Which?"}], (image, image))
    system = {"role": "system", "content": "Answer about <image> inputs."}
    out = vision.expand([system, {"role": "user", "content": "<image>Which?"}], (image,))
    assert out[0] == system
    assert out[1]["content"] == vision.plugin.image_text(vision.seqlen(image)) + "Which?"
