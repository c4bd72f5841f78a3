"""How often the vision tower runs per DPO step, and what it costs: a Qwen2-VL-shaped model scaled down.

One batch of image preference pairs (1-3 images of 224 x 168 px per prompt), a LoRA policy and its
adapter-disabled reference; one step = policy forward + backward and reference forward, as
scoring.score_batch runs them. Three ways to run the tower:
  every row       each of the 2B rows encodes its copy of the prompt's images (what a plain
                  concatenated batch does, TRL's DPOTrainer included), for policy and reference
  once per pair   the rejected rows reuse the chosen rows' features (modeling/logprobs)
  once per batch  and the reference reuses the policy's (frozen tower: scoring.score_batch)
and then, with the tower once per batch, the four batch layouts (plain, prefix-shared, packed, packed +
prefix-shared: modeling/layout.py), which give the same log-probs (tests/modeling/test_vision.py).

    python benchmarks/bench_vision.py [--pairs 4] [--steps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bench_vlm import build_model
    from mm_helpers import draw_image, png_bytes

    from prefalign.config.args import DataArguments, FinetuningArguments, ModelArguments
    from prefalign.contracts import PreferencePair, RecordSource
    from prefalign.data.chat import ChatRenderer
    from prefalign.data.collate import PairCollator, make_collator
    from prefalign.data.encode import encode_pair
    from prefalign.modeling.load import load_policy, load_tokenizer
    from prefalign.modeling.logprobs import pair_logps
    from prefalign.modeling.vision import load_vision

    folder = Path(tempfile.mkdtemp(prefix="bench-vision-"))
    build_model(folder, "small", bf16=False)  # bench_vlm.py's model: text 4 x 256, tower 4 x 256

    model_args = ModelArguments(model_name_or_path=str(folder))
    data_args = DataArguments(template="qwen2_vl", dataset=["x"])
    tokenizer = load_tokenizer(model_args)
    vision = load_vision(model_args, data_args, tokenizer)
    renderer = ChatRenderer.from_config(tokenizer, data_args, vision)
    features = []
    for i in range(args.pairs):
        images = tuple(png_bytes(draw_image(10 * i + k, (224, 168))) for k in range(1 + i % 3))
        pair = PreferencePair([{"role": "user", "content": "<image>" * len(images) + " Which shape is left?"},
                               {"role": "assistant", "content": "The circle."},
                               {"role": "user", "content": "And its colour?"}], "It is red, " * 4, "Blue.",
                              RecordSource("bench", i), images=images)
        features.append({**encode_pair(pair, renderer, 4096), "images": list(images), "index": i})
    batch = PairCollator(tokenizer.pad_token_id, vision=vision)(features)
    policy = load_policy(model_args, FinetuningArguments(finetuning_type="lora"))
    patches = []
    policy.get_base_model().model.visual.patch_embed.register_forward_hook(
        lambda module, inputs, out: patches.append(inputs[0].shape[0]))

    def step(once: bool, reuse: bool, batch=batch) -> None:
        shared = {} if reuse else None
        logps = pair_logps(policy, batch, vision_once=once, image_features=shared)
        (logps.chosen - logps.rejected).sum().backward()
        with torch.no_grad(), policy.disable_adapter():
            pair_logps(policy, batch, vision_once=once, image_features=shared)

    def timed(*how, **kwargs) -> float:
        step(*how, **kwargs)  # warm-up
        patches.clear()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(*how, **kwargs)
        return (time.perf_counter() - start) / args.steps

    per_pair_patches = int(batch["image_grid_thw"].prod(-1).sum()) // 2 // args.pairs
    print(f"{args.pairs} pairs, {len(batch['image_grid_thw']) // 2} images, {per_pair_patches} patches per pair, "
          f"rows {tuple(batch['input_ids'].shape)}, {args.threads} thread(s)")
    print("| tower runs | tower encodings per pair (policy + reference) | s / step | pairs / s |")
    print("|---|---|---|---|")
    for label, once, reuse in (("every row", False, False), ("once per pair", True, False),
                               ("once per batch", True, True)):
        seconds = timed(once, reuse)
        encodings = sum(patches) / args.steps / (per_pair_patches * args.pairs)
        print(f"| {label} | {encodings:g} | {seconds:.3f} | {args.pairs / seconds:.2f} |")
    print()
    print("| layout (tower once per batch) | rows x positions | of them tokens | s / step | pairs / s |")
    print("|---|---|---|---|---|")
    for label, packing, sharing in (("plain", False, False), ("prefix sharing", False, True),
                                    ("packing", True, False), ("packing + prefix sharing", True, True)):
        laid_out = make_collator(tokenizer.pad_token_id, prefix_sharing=sharing, packing=packing,
                                 vision=vision)(features)
        seconds = timed(True, True, batch=laid_out)
        rows, positions = laid_out["input_ids"].shape
        tokens = int(laid_out["attention_mask"].sum())
        print(f"| {label} | {rows} x {positions} | {tokens} | {seconds:.3f} | {args.pairs / seconds:.2f} |")


if __name__ == "__main__":
    main()
