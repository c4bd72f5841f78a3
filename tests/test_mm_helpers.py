"""The shared VLM fixtures (tests/mm_helpers.py) are what they claim: each family's processor turns the
drawn images into pixel values and image tokens its model accepts."""

import pytest
from mm_helpers import FAMILIES, build_vlm, draw_image, load_processor


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_processes_drawn_images_into_tokens_its_model_reads(family, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText

    path = build_vlm(family, tmp_path / family)
    processor = load_processor(path)
    images = [draw_image(1, (40, 30)), draw_image(2, (16, 56))]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "which"},
                                             {"type": "image"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = processor(text=[text], images=images, return_tensors="pt")
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(FAMILIES[family].image_token)
    assert image_id != tokenizer.unk_token_id and FAMILIES[family].image_token in tokenizer.all_special_tokens
    assert batch["pixel_values"].numel() > 0 and torch.isfinite(batch["pixel_values"]).all()
    if "image_grid_thw" in batch:  # Qwen-VL: one (t, h, w) grid per image; tokens = patches / merge**2
        merge = processor.image_processor.merge_size
        assert batch["image_grid_thw"].shape == (2, 3)
        assert int((batch["input_ids"] == image_id).sum()) == int(batch["image_grid_thw"].prod(-1).sum()) // merge**2
    else:  # LLaVA: 28 px / 14 px patches = 2 x 2 = 4 tokens per image
        assert int((batch["input_ids"] == image_id).sum()) == 2 * 4
    model = AutoModelForImageTextToText.from_pretrained(path)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer)) and torch.isfinite(logits).all()
