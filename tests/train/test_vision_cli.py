"""Vision-language DPO through the real command line, on tiny models and an rlhf_v-shaped local dataset.

LLaMA-Factory's three VLM DPO examples (tests/fixtures/llamafactory/: qwen3vl_lora_dpo.yaml from the 0.9.5
sdist, qwen2vl_lora_dpo.yaml and qwen2_5vl_lora_dpo.yaml from its repository) run unchanged but for
model_name_or_path, dataset_dir and output_dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mm_helpers import build_vlm, write_rlhf_v  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LF_EXAMPLES = ROOT / "tests" / "fixtures" / "llamafactory"
LF_EXAMPLE = LF_EXAMPLES / "qwen3vl_lora_dpo.yaml"


def prefalign(*args, cwd):
    return subprocess.run([sys.executable, "-m", "prefalign", *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)


def _lf_config(tmp_path, family: str, example: Path = LF_EXAMPLE, **changes) -> Path:
    model = build_vlm(family, tmp_path / f"model-{family}")
    data = write_rlhf_v(tmp_path / "data")
    config = yaml.safe_load(example.read_text())
    config.update(model_name_or_path=model, dataset_dir=data, output_dir=str(tmp_path / "out"), **changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _zero_and_one_process(tmp_path, zero: str, **changes) -> None:
    """A 3-step run of a tiny Qwen2-VL under DeepSpeed `zero` (z2 / z3) in 2 CPU processes of 2 pairs each
    (output tmp_path/zero) logs the losses, margins and chosen log-probs (within 1e-5) of its one-process
    twin with 4 pairs per step (tmp_path/one), which learned."""
    common = dict(template="qwen2_vl", max_steps=3, warmup_ratio=0.0, logging_steps=1,
                  gradient_accumulation_steps=1, learning_rate=1e-2, dataloader_num_workers=0,
                  preprocessing_num_workers=1, bf16=False, **changes)
    two = _lf_config(tmp_path, "qwen2_vl", per_device_train_batch_size=2,
                     deepspeed=str(ROOT / "examples" / "deepspeed" / f"ds_{zero}_config.json"), **common)
    run = subprocess.run([sys.executable, "-m", "prefalign", "train", str(two), "--nproc", "2",
                          f"output_dir={tmp_path / zero}"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    one = _lf_config(tmp_path, "qwen2_vl", per_device_train_batch_size=4, **common)
    run = prefalign("train", str(one), f"output_dir={tmp_path / 'one'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    logs = {name: [h for h in json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
                   if "loss" in h] for name in (zero, "one")}
    assert len(logs[zero]) == len(logs["one"]) == 3 and logs["one"][-1]["loss"] < 0.69  # it learned
    for a, b in zip(logs[zero], logs["one"]):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


@pytest.mark.extended
@pytest.mark.parametrize("example, family", [("qwen3vl_lora_dpo.yaml", "qwen3_vl"),
                                             ("qwen2vl_lora_dpo.yaml", "qwen2_vl"),
                                             ("qwen2_5vl_lora_dpo.yaml", "qwen2_5_vl")])
def test_lf_vlm_dpo_examples_run_unchanged_and_their_adapters_load_with_peft(tmp_path, example, family):
    """Each example trains (LoRA, 3 epochs of 8 pairs with 1-3 images each, accumulation 8, bf16 autocast on
    the CPU; qwen2vl's holds out val_size 0.1 and evaluates) to completion; policy == reference at the start,
    so with its learning rate of 5e-6 the mean loss stays ln 2 = 0.6931 to 4 digits; the saved adapter adapts
    only the language model (lora_target: all never reaches the frozen vision tower or projector) and loads
    with peft on the base model."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    config = _lf_config(tmp_path, family, LF_EXAMPLES / example)
    run = prefalign("train", str(config), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    assert abs(json.loads((out / "train_results.json").read_text())["train_loss"] - 0.6931) < 1e-4
    summary = json.loads((out / "data_summary.json").read_text())
    held_out = (summary.get("eval") or {}).get("pairs", 0)
    assert summary["train"]["pairs"] + held_out == 8
    assert (held_out > 0) == ("val_size" in yaml.safe_load((LF_EXAMPLES / example).read_text()))
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all("language_model" in key for key in weights)
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card
    assert "- Vision-language model: vision tower frozen, projector frozen, language model trained" in card
    base = AutoModelForImageTextToText.from_pretrained(yaml.safe_load(config.read_text())["model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(out))
    assert any("lora_B" in name and param.abs().sum() > 0 for name, param in model.named_parameters())


@pytest.mark.extended
@pytest.mark.parametrize("finetuning_type", ["full", "freeze"])
def test_full_and_freeze_tuning_train_only_the_language_model(tmp_path, finetuning_type):
    """Full and freeze tuning of a Qwen2-VL model (two steps, a large learning rate): the saved weights of the
    vision tower and projector are the base model's, bit for bit; language-model weights changed."""
    from safetensors.torch import load_file

    config = _lf_config(tmp_path, "qwen2_vl", finetuning_type=finetuning_type, template="qwen2_vl",
                        learning_rate=1e-2, num_train_epochs=1.0, max_steps=2, gradient_accumulation_steps=1,
                        dataloader_num_workers=0, preprocessing_num_workers=1, bf16=False)
    run = prefalign("train", str(config), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    base = load_file(str(tmp_path / "model-qwen2_vl" / "model.safetensors"))
    trained = load_file(str(tmp_path / "out" / "model.safetensors"))
    vision = [key for key in base if ".visual." in f".{key}"]
    assert vision and all(torch.equal(base[key], trained[key]) for key in vision)
    language = [key for key in base if "layers.1." in key and ".visual." not in f".{key}"]  # Qwen2-VL's own key names
    assert any(not torch.equal(base[key], trained[key]) for key in language)


@pytest.mark.extended
@pytest.mark.parametrize("family, template, shown_image", [
    ("qwen2_vl", "qwen2_vl", "<|vision_start|><|image_pad|>×"),
    ("gemma3", "gemma3", "<start_of_image><image_soft_token>×4<end_of_image>"),
])
def test_data_eval_chat_and_export_take_images(tmp_path, family, template, shown_image):
    """After a short LoRA run on a tiny Qwen2-VL or Gemma 3: `data` shows each image's tokens, where and how
    many (as many as the image processor makes for the image: tests/modeling/test_vision.py checks the counts);
    `eval` scores every pair; `chat --image` answers; `export` writes the image processor beside the merged
    model, which gives base + adapter's logits."""
    from peft import PeftModel
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    config = _lf_config(tmp_path, family, template=template, max_steps=2, gradient_accumulation_steps=1,
                        learning_rate=1e-2, dataloader_num_workers=0, preprocessing_num_workers=1, bf16=False)
    out, model = tmp_path / "out", tmp_path / f"model-{family}"
    run = prefalign("train", str(config), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "preprocessor_config.json").is_file()  # the processor beside the adapter, as LF saves it

    shown = prefalign("data", str(config), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr[-3000:]
    records = json.loads((tmp_path / "data" / "rlhf_v.json").read_text())
    assert f"[images: {len(records[0]['images'])}, " in shown.stdout and " tokens at " in shown.stdout
    assert shown_image in shown.stdout

    scored = prefalign("eval", str(config), f"adapter_name_or_path={out}", f"output_dir={tmp_path / 'eval'}",
                       cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "eval_pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(row["loss"] > 0 for row in rows)

    image = tmp_path / "data" / records[0]["images"][0]
    chat = prefalign("chat", str(config), f"adapter_name_or_path={out}", "--image", str(image), "--prompt",
                     "What is it?", "max_new_tokens=4", cwd=tmp_path)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert "Assistant:" in chat.stdout
    missing = prefalign("chat", str(config), "--image", str(tmp_path / "nope.png"), "--prompt", "hi", cwd=tmp_path)
    assert missing.returncode != 0 and "--image" in missing.stderr and "nope.png" in missing.stderr
    assert "Traceback" not in missing.stderr

    exported = prefalign("export", str(config), f"adapter_name_or_path={out}", f"export_dir={tmp_path / 'exp'}",
                         cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    AutoImageProcessor.from_pretrained(tmp_path / "exp")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "exp").eval()
    adapted = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(model), str(out)).eval()
    ids = torch.tensor([[1, 5, 9, 12, 40, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5)


@pytest.mark.extended
def test_qlora_trains_a_vision_language_model(tmp_path):
    """quantization_bit: 4 (bitsandbytes on the CPU) on a tiny Qwen2-VL through LF's example: the language
    model's linear layers load as 4-bit layers, the run finishes at ln 2 (policy == reference at the start,
    two steps at lr 1e-3 move the loss by less than 1e-3 here), and the adapter adapts the language model only."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from prefalign.config.args import FinetuningArguments, ModelArguments
    from prefalign.modeling.load import load_policy

    config = _lf_config(tmp_path, "qwen2_vl", template="qwen2_vl", max_steps=2, gradient_accumulation_steps=1,
                        learning_rate=1e-3, dataloader_num_workers=0, preprocessing_num_workers=1, bf16=False,
                        quantization_bit=4)
    run = prefalign("train", str(config), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert abs(json.loads((tmp_path / "out" / "train_results.json").read_text())["train_loss"] - 0.6931) < 1e-3
    weights = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert weights and all("language_model" in key for key in weights)
    policy = load_policy(ModelArguments(model_name_or_path=str(tmp_path / "model-qwen2_vl"), quantization_bit=4),
                         FinetuningArguments(finetuning_type="lora"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for n, m in policy.named_modules() if "language_model" in n)


@pytest.mark.extended
def test_zero3_in_two_processes_trains_what_one_process_trains(tmp_path):
    """Full tuning of a tiny Qwen2-VL under DeepSpeed ZeRO-3 in 2 CPU processes (2 pairs each; the frozen-copy
    reference in its own inference engine) logs the losses and margins of one process with 4 pairs per step,
    and saves the same weights (within 1e-4: Adam's normalised steps carry the processes' fp32 reduction-order
    differences, 1.5e-5 here), the frozen vision tower and projector the base's, bit for bit."""
    from transformers import AutoModelForImageTextToText

    _zero_and_one_process(tmp_path, "z3", finetuning_type="full")
    z3, single, base = (AutoModelForImageTextToText.from_pretrained(tmp_path / name).state_dict()
                        for name in ("z3", "one", "model-qwen2_vl"))  # ZeRO-3's consolidated save loads too
    assert z3.keys() == single.keys()
    for key, value in single.items():
        assert torch.allclose(z3[key], value, atol=1e-4), key
        if ".visual." in f".{key}":
            assert torch.equal(z3[key], base[key]), key
    assert any(not torch.equal(single[key], base[key]) for key in single if "language_model" in key)


@pytest.mark.extended
def test_zero2_lora_in_two_processes_trains_what_one_process_trains(tmp_path):
    """LoRA on a tiny Qwen2-VL under DeepSpeed ZeRO-2 in 2 CPU processes (2 pairs each; the adapter-disabled
    reference) logs the losses and margins of one process with 4 pairs per step; the saved adapter equals the
    one-process adapter (within 1e-4), adapts the language model only and loads with peft on the base."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    _zero_and_one_process(tmp_path, "z2")
    z2, single = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("z2", "one"))
    assert z2 and z2.keys() == single.keys() and all("language_model" in key for key in z2)
    for key, value in single.items():
        assert torch.allclose(z2[key], value, atol=1e-4), key
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tmp_path / "model-qwen2_vl"),
                                      str(tmp_path / "z2"))
    loaded = [param for name, param in model.named_parameters() if "lora_B" in name]
    assert loaded and any(param.abs().sum() > 0 for param in loaded)


@pytest.mark.slow
def test_report_and_card_count_images_and_name_the_processor(tmp_path):
    """A 2-step LoRA run of a tiny Qwen2-VL on 8 rlhf_v pairs whose images are redrawn at fixed sizes: 56 x 56
    (4 x 4 patches of 14 px, merged 2 x 2: 4 image tokens) for a prompt's 1st and 3rd image, 56 x 28 (2 x 4
    patches: 2 tokens) for its 2nd; image_max_pixels 56 * 56 and image_min_pixels 28 * 28 resize none of them.
    The data summary, the log and report.html count the pairs with images, the images and their tokens by
    that arithmetic; the frozen tower runs once per pair (the adapter-disabled reference reuses the policy's
    image features: 1 tower run per pair). The card names the saved processor and the pixel limits."""
    from mm_helpers import draw_image

    config = _lf_config(tmp_path, "qwen2_vl", template="qwen2_vl", max_steps=2, per_device_train_batch_size=2,
                        gradient_accumulation_steps=1, logging_steps=1, learning_rate=1e-3, num_train_epochs=1.0,
                        dataloader_num_workers=0, preprocessing_num_workers=1, bf16=False,
                        image_max_pixels=56 * 56, image_min_pixels=28 * 28)
    data = tmp_path / "data"
    records = json.loads((data / "rlhf_v.json").read_text())
    tokens = 0
    for n, record in enumerate(records):
        for k, relative in enumerate(record["images"]):
            size = (56, 28) if k % 2 else (56, 56)
            draw_image(100 + 10 * n + k, size).save(data / relative)
            tokens += 2 if k % 2 else 4
    images = sum(len(r["images"]) for r in records)
    assert images > len(records)  # some prompts hold 2-3 images (mm_helpers.rlhf_v_records)
    run = prefalign("train", str(config), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"

    train = json.loads((out / "data_summary.json").read_text())["train"]
    assert (train["pairs_with_images"], train["images"], train["image_tokens"]) == (8, images, tokens)
    assert f"train: 8 pairs with images, {images} images, {tokens} image tokens" in run.stdout + run.stderr
    logged = [h["vision/tower_runs_per_pair"] for h in json.loads((out / "trainer_state.json").read_text())
              ["log_history"] if "vision/tower_runs_per_pair" in h]
    assert logged == [1.0, 1.0]

    page = (out / "report.html").read_text()
    assert (f'<table id="images"><thead><tr><th>split</th><th>pairs with images</th><th>images</th>'
            f'<th>image tokens</th></tr></thead><tbody><tr><th>train</th><td class="num">8</td>'
            f'<td class="num">{images}</td><td class="num">{tokens}</td></tr>') in page
    assert "<tr><th>vision/tower_runs_per_pair</th>" in page and "tower runs per pair:" in page

    card = (out / "README.md").read_text()
    # the saved processor carries the run's limits (transformers 5 keeps a Qwen processor's pixel counts in `size`)
    assert ("- Processor: `Qwen2VLImageProcessor` (size longest_edge 3136, size shortest_edge 784, patch_size 14, "
            "merge_size 2), saved beside the model (`preprocessor_config.json`") in card
    assert "at most image_max_pixels 3136 and at least image_min_pixels 784 pixels" in card
    assert 'processor = AutoProcessor.from_pretrained("' in card and "AutoModelForImageTextToText" in card


def test_gemma3_trains_from_the_command_line_with_bad_records_named_or_counted(tmp_path):
    """LF's VLM DPO example with `template: gemma3` on a tiny Gemma 3 (4 soft tokens per image) and 8 rlhf_v
    pairs, of which record 1's first image is cut short and record 2 has a video: without on_bad_record the
    command fails in one line naming record 1's image; with `skip` the 6 good pairs train (LoRA, learning rate
    1e-2, 2 steps: the loss leaves ln 2), the summary counts one skip at media and one at render, the rejects
    file says why the video was refused (Gemma 3 takes none, as in LLaMA-Factory), and the adapter adapts only the language model and loads with peft."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    config = _lf_config(tmp_path, "gemma3", template="gemma3", max_steps=2, gradient_accumulation_steps=1,
                        per_device_train_batch_size=3, learning_rate=1e-2, logging_steps=1, warmup_ratio=0.0,
                        dataloader_num_workers=0, preprocessing_num_workers=1, bf16=False)
    data = tmp_path / "data"
    records = json.loads((data / "rlhf_v.json").read_text())
    image = data / records[1]["images"][0]
    image.write_bytes(image.read_bytes()[:len(image.read_bytes()) // 2])
    (data / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    records[2]["videos"] = ["clip.mp4"]
    records[2]["conversations"][0]["value"] = "<video>" + records[2]["conversations"][0]["value"]
    (data / "rlhf_v.json").write_text(json.dumps(records))
    info = json.loads((data / "dataset_info.json").read_text())
    info["rlhf_v"]["columns"]["videos"] = "videos"
    (data / "dataset_info.json").write_text(json.dumps(info))

    failed = prefalign("train", str(config), cwd=tmp_path)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("prefalign train: error:")]
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert len(errors) == 1 and "rlhf_v.json record 1" in errors[0] and records[1]["images"][0] in errors[0]
    assert "on_bad_record: skip" in errors[0]

    run = prefalign("train", str(config), "on_bad_record=skip", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["train"]["pairs"] == 6 and summary["skipped_by_stage"] == {"media": 1, "render": 1}
    rejects = [json.loads(line) for line in (out / "rejected_records.jsonl").read_text().splitlines()]
    video = next(r for r in rejects if r["stage"] == "render")
    assert video["index"] == 2 and "Gemma3Plugin models take no videos" in json.dumps(video)
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert losses[0] == pytest.approx(0.6931, abs=1e-4) and abs(losses[-1] - 0.6931) > 1e-3
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all("language_model" in key for key in weights)
    base = AutoModelForImageTextToText.from_pretrained(tmp_path / "model-gemma3")
    model = PeftModel.from_pretrained(base, str(out))
    assert any("lora_B" in name and param.abs().sum() > 0 for name, param in model.named_parameters())


def test_default_layout_packs_image_pairs_and_trains_as_the_plain_layout(tmp_path):
    """A Qwen2-VL run with the default layout logs "Batch layout: packing + prefix sharing" (no note: its
    image pairs pack), and its 3 logged steps (4 pairs of 1-3 images each per step, LoRA, precomputed
    reference) have the losses, margins and chosen log-probs of the same run with packing and prefix sharing
    off (within 1e-5), which learned."""
    common = dict(template="qwen2_vl", max_steps=3, warmup_ratio=0.0, logging_steps=1, gradient_accumulation_steps=1,
                  learning_rate=1e-2, per_device_train_batch_size=4, bf16=False, dataloader_num_workers=0,
                  preprocessing_num_workers=1)
    config = _lf_config(tmp_path, "qwen2_vl", **common)
    runs = {}
    for name, keys in (("default", []), ("plain", ["packing=false", "prefix_sharing=false"])):
        run = prefalign("train", str(config), f"output_dir={tmp_path / name}", *keys, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        runs[name] = [line for line in run.stderr.splitlines() if "Batch layout:" in line]
    assert runs["default"] and all(line.endswith("Batch layout: packing + prefix sharing") for line in runs["default"])
    assert runs["plain"] and all(line.endswith("Batch layout: plain (no packing, no prefix sharing)")
                                 for line in runs["plain"])
    logs = {name: [h for h in json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
                   if "loss" in h] for name in runs}
    assert len(logs["default"]) == len(logs["plain"]) == 3 and logs["plain"][-1]["loss"] < 0.69
    for a, b in zip(logs["default"], logs["plain"]):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
