"""prefalign vs TRL's DPOTrainer on image preference pairs: a Qwen2-VL-shaped model, LoRA and full.

The workload, built once and read by both tools: a random Qwen2-VL (`--shape small`: text 4 x 256,
tower 4 x 256; `--shape 2b`: Qwen2-VL-2B's config, random weights) saved with its image processor and a
tokenizer trained locally that has Qwen2-VL's vision tokens and chat template; pairs whose prompts hold
1-3 PIL-drawn images of real sizes (224 x 224 to 640 x 480, as PNG files) in 1-3 user turns (earlier
turns answered), text lengths long-tailed (log-normal words per pair: median 60, p90 200). prefalign reads
them as LLaMA-Factory's `rlhf_v` ShareGPT records (`<image>` placeholders, template `qwen2_vl`); TRL as
conversational prompt / chosen / rejected rows whose user turns carry `{"type": "image"}` parts where
the placeholders are, with an `images` column, and the same processor (tests/mm_helpers.load_processor:
no torchvision here either). Both render the same ids (the tokenizer's template is qwen2_vl's).

Same settings: batch x accumulation, steps, lr 5e-5 linear, beta 0.1, sigmoid loss, seed 0, sequential
order, no truncation (max length above every pair), gradient checkpointing off, fp32 (`--bf16` on a
GPU: both load bf16 weights); LoRA r 8 / alpha 16 on the language model's q, k, v, o; full tuning trains
the language model (prefalign's default freeze_vision_tower / freeze_multi_modal_projector; TRL's tower
and merger are frozen by hand to match). Each run is a fresh subprocess (bench_real.run_child).

    python benchmarks/bench_vlm.py                                   # 4 runs, small shape (~15 min here)
    python benchmarks/bench_vlm.py --runs pa-lora,trl-lora --steps 2
    python benchmarks/bench_vlm.py --shape 2b --bf16 --pairs-per-step 8   # on a GPU (benchmarks/gpu_check.sh)

Printed per run: loop pairs/s (Trainer on_train_begin .. on_train_end), peak RSS, peak GPU memory on a
GPU, the logged losses (step 1 is ln 2 for both: policy == reference; later steps must agree), and the
vision tower's work counted by one global forward hook on every Qwen2-VL vision tower in the process
(policy and reference, either tool): calls per step and images encoded per image trained ("encodings
per pair": 4 = chosen and rejected rows each encode the prompt's images, for policy and reference).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from bench_dpo import machine, real_shaped_lengths  # noqa: E402
from bench_real import _settings, run_child  # noqa: E402

RUNS = {f"{impl}-{mode}": {"impl": impl_name, "mode": mode}
        for mode in ("lora", "full") for impl, impl_name in (("pa", "prefalign"), ("trl", "trl"))}
DATASET = "vlm_pairs"
SIZES = ((224, 224), (320, 240), (336, 448), (448, 336), (512, 384), (640, 480))
MAX_PIXELS, MIN_PIXELS = 640 * 480, 32 * 32  # both tools' processor: no image above 640 x 480 is downscaled
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the language model's (the tower's are qkv / proj)
# name -> (text config, vision config): Qwen2-VL-2B-Instruct's config.json for "2b"
SHAPES = {
    "small": (dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, mrope_section=[16, 8, 8], tie_word_embeddings=False),
              dict(depth=4, embed_dim=256, hidden_size=256, num_heads=4)),
    "2b": (dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                num_attention_heads=12, num_key_value_heads=2, mrope_section=[16, 24, 24], tie_word_embeddings=True),
           dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    p.add_argument("--shape", default="small", choices=SHAPES)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--bf16", action="store_true", help="bf16 weights for both tools (a GPU's setting)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each child")
    p.add_argument("--trl-python", default="/work/venvs/trl/bin/python")
    p.add_argument("--json-out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [r for r in args.runs.split(",") if r not in RUNS]
    if unknown:
        p.error(f"--runs: unknown {unknown}; known: {', '.join(RUNS)}")
    return args


# -- the shared workload (this python) -----------------------------------------------------------
def qwen2_vl_model(tokenizer, shape: str):
    """A random Qwen2VLForConditionalGeneration of `shape` (SHAPES) for `tokenizer`'s vision token ids."""
    import transformers as t

    text, vision = SHAPES[shape]
    text = dict(text)
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": text.pop("mrope_section")}
    tie = text.pop("tie_word_embeddings")
    text = {"vocab_size": len(tokenizer), **text, "max_position_embeddings": 32768, "rope_parameters": rope,
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in dict(
        image_token_id="<|image_pad|>", video_token_id="<|video_pad|>", vision_start_token_id="<|vision_start|>",
        vision_end_token_id="<|vision_end|>").items()}
    config = t.Qwen2VLConfig(text_config=text, vision_config=dict(**vision, mlp_ratio=4, patch_size=14,
                                                                  spatial_merge_size=2, temporal_patch_size=2),
                             tie_word_embeddings=tie, **ids)
    return t.Qwen2VLForConditionalGeneration(config)


def build_model(folder: Path, shape: str, bf16: bool) -> str:
    """The model folder both tools load: weights, tokenizer, image processor (mm_helpers.save_vlm)."""
    import torch
    import transformers as t
    from mm_helpers import save_vlm, vlm_tokenizer

    tokenizer = vlm_tokenizer("qwen2_vl")
    torch.manual_seed(0)
    model = qwen2_vl_model(tokenizer, shape)
    if bf16:
        model = model.to(torch.bfloat16)
    images = t.Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, merge_size=2)
    return save_vlm(folder, "qwen2_vl", model, tokenizer, images, t.Qwen2VLProcessor, {})


def image_pairs(n: int, seed: int = 0) -> list[dict]:
    """`n` pairs as plain data: `turns` (user texts with their image counts, assistant answers between),
    chosen, rejected and the images' sizes; lengths in words long-tailed (bench_dpo.real_shaped_lengths)."""
    from mm_helpers import WORDS

    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, k)))

    pairs = []
    for total in real_shaped_lengths(rng, n, median=60, p90=200, cap=600, floor=12):
        sizes = [rng.choice(SIZES) for _ in range(rng.randint(1, 3))]
        users = rng.randint(1, 3)
        where = sorted(rng.randrange(users) for _ in sizes)
        chosen, rejected = (max(2, round(total * rng.uniform(0.15, 0.4))) for _ in range(2))
        prompt_words = max(2 * users, total - (chosen + rejected) // 2)
        share = [rng.random() + 0.2 for _ in range(2 * users - 1)]
        turns = [(words(round(prompt_words * w / sum(share))), where.count(i // 2) if i % 2 == 0 else None)
                 for i, w in enumerate(share)]
        pairs.append({"turns": turns, "chosen": words(chosen), "rejected": words(rejected), "sizes": sizes})
    return pairs


def prepare(args, workdir: Path) -> dict:
    """The model folder, the images (PNG), the LF dataset folder and TRL's rows; the prompt images' counts."""
    from mm_helpers import draw_image

    model = build_model(workdir / "model", args.shape, args.bf16)
    data_dir = workdir / "data"
    (data_dir / "images").mkdir(parents=True)
    trained = args.steps * args.batch_size * args.grad_accum
    lf_rows, trl_rows = [], []
    pairs = image_pairs(trained)
    for n, pair in enumerate(pairs):
        paths = []
        for k, size in enumerate(pair["sizes"]):
            paths.append(f"images/{n:04d}_{k}.png")
            draw_image(n * 10 + k, size).save(data_dir / paths[-1])
        conversation, prompt = [], []
        for i, (text, images) in enumerate(pair["turns"]):
            user = i % 2 == 0
            conversation.append({"from": "human" if user else "gpt", "value": "<image>" * (images or 0) + text})
            parts = [{"type": "image", "text": None}] * (images or 0) + [{"type": "text", "text": text}]
            prompt.append({"role": "user" if user else "assistant", "content": parts})
        lf_rows.append({"conversations": conversation, "chosen": {"from": "gpt", "value": pair["chosen"]},
                        "rejected": {"from": "gpt", "value": pair["rejected"]}, "images": paths})
        trl_rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": pair["chosen"]}],
                         "rejected": [{"role": "assistant", "content": pair["rejected"]}],
                         "images": [str(data_dir / path) for path in paths]})
    (data_dir / f"{DATASET}.json").write_text(json.dumps(lf_rows))
    entry = {"file_name": f"{DATASET}.json", "ranking": True, "formatting": "sharegpt",
             "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}}
    (data_dir / "dataset_info.json").write_text(json.dumps({DATASET: entry}))
    (workdir / "trl.json").write_text(json.dumps(trl_rows))
    return {"model": model, "data_dir": str(data_dir), "trl_data": str(workdir / "trl.json"), "pairs": trained,
            "images": sum(len(p["sizes"]) for p in pairs), "image_sizes": sorted({s for p in pairs for s in p["sizes"]})}


# -- one run (in its own python) -------------------------------------------------------------------
@contextlib.contextmanager
def tower_counter():
    """Counts every Qwen2-VL vision tower forward in this process (calls, images, patches) while open."""
    import torch
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel as Tower

    counts = {"tower_calls": 0, "images_encoded": 0, "patches_encoded": 0}

    def hook(module, args, kwargs, output):
        if type(module) is Tower:
            counts["tower_calls"] += 1
            counts["images_encoded"] += len(kwargs.get("grid_thw", args[1] if len(args) > 1 else ()))
            counts["patches_encoded"] += int((args[0] if args else kwargs["hidden_states"]).shape[0])

    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    try:
        yield counts
    finally:
        handle.remove()


def _shared_settings(spec: dict) -> dict:
    return {**_settings(spec), "bf16": spec["bf16"], "train_sampling_strategy": "sequential",
            "gradient_checkpointing": False}


def run_prefalign(spec, out, clock):
    from prefalign.config import build_config
    from prefalign.train.workflow import build_trainer

    lora = dict(lora_rank=8, lora_alpha=16, lora_dropout=0.0, lora_target=",".join(LORA_TARGETS))
    trainer = build_trainer(build_config({
        "model_name_or_path": spec["model"], "stage": "dpo", "finetuning_type": spec["mode"], **lora,
        "dataset": DATASET, "dataset_dir": spec["data_dir"], "template": "qwen2_vl", "cutoff_len": spec["max_length"],
        "image_max_pixels": MAX_PIXELS, "image_min_pixels": MIN_PIXELS, "pref_beta": 0.1, "pref_loss": "sigmoid",
        "output_dir": out, "overwrite_output_dir": True, **_shared_settings(spec)}))
    trainer.add_callback(clock)
    with tower_counter() as counts:
        trainer.train()
    return counts


def run_trl(spec, out, clock):
    import datasets
    import torch
    from mm_helpers import load_processor
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText
    from trl import DPOConfig, DPOTrainer

    train = datasets.Dataset.from_list(json.loads(Path(spec["trl_data"]).read_text()))
    train = train.cast_column("images", datasets.Sequence(datasets.Image()))
    processor = load_processor(spec["model"])
    model = AutoModelForImageTextToText.from_pretrained(spec["model"],
                                                        dtype=torch.bfloat16 if spec["bf16"] else torch.float32)
    if spec["mode"] == "full":  # as prefalign's defaults: the tower and its merger stay frozen
        for name, param in model.named_parameters():
            if ".visual." in f".{name}":
                param.requires_grad_(False)
    config = DPOConfig(output_dir=out, beta=0.1, loss_type=["sigmoid"], max_length=spec["max_length"],
                       precompute_ref_log_probs=False, **_shared_settings(spec))
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=LORA_TARGETS) if spec["mode"] == "lora" else None
    trainer = DPOTrainer(model=model, args=config, train_dataset=train, processing_class=processor, peft_config=peft,
                         callbacks=[clock])
    with tower_counter() as counts:
        trainer.train()
    return counts


def child_main(spec: dict) -> None:
    from bench_real import child_main as run_one

    run_one(spec, {"prefalign": run_prefalign, "trl": run_trl})


# -- the parent ------------------------------------------------------------------------------------
def report(args, prepared: dict, results: dict) -> str:
    lines = [f"Qwen2-VL-shaped ({args.shape}: text {SHAPES[args.shape][0]['num_hidden_layers']} x "
             f"{SHAPES[args.shape][0]['hidden_size']}, tower {SHAPES[args.shape][1]['depth']} x "
             f"{SHAPES[args.shape][1]['embed_dim']}), {prepared['pairs']} pairs with {prepared['images']} images "
             f"(sizes {', '.join(f'{w}x{h}' for w, h in prepared['image_sizes'])}); batch {args.batch_size} x "
             f"accumulation {args.grad_accum}, {args.steps} steps, {'bf16' if args.bf16 else 'fp32'}, threads "
             f"{sorted({r['threads'] for r in results.values()})}",
             f"machine: {machine()}", "",
             "| run | pairs/s | peak RSS MiB | peak GPU MiB | tower calls / step | tower encodings per pair | losses "
             "| max loss diff vs TRL |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    for name, r in results.items():
        trl = results.get(f"trl-{RUNS[name]['mode']}")
        diff = max(abs(a - b) for a, b in zip(r["losses"], trl["losses"])) if trl and trl is not r else None
        gpu = f"{r['peak_gpu_mib']:.0f}" if r.get("peak_gpu_mib") else "-"
        lines.append(f"| {name} | {r['pairs_per_s']:.3f} | {r['peak_rss_mib']:.0f} | {gpu} | "
                     f"{r['tower_calls'] / args.steps:g} | {r['images_encoded'] / prepared['images']:.2f} | "
                     f"{', '.join(f'{x:.6f}' for x in r['losses'])} | {'-' if diff is None else f'{diff:.1e}'} |")
    lines += ["", "| ratio prefalign / TRL | speed | peak RSS | tower encodings |", "|---|---:|---:|---:|"]
    for mode in ("lora", "full"):
        pa, trl = results.get(f"pa-{mode}"), results.get(f"trl-{mode}")
        if pa and trl:
            lines.append(f"| {mode} | {pa['pairs_per_s'] / trl['pairs_per_s']:.2f}x | "
                         f"{pa['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x | "
                         f"{pa['images_encoded'] / trl['images_encoded']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    import torch

    if SHAPES[args.shape][0]["hidden_size"] > 1024 and not torch.cuda.is_available():
        print(f"bench_vlm.py --shape {args.shape}: skipped (torch sees no CUDA device; a 2B model is a GPU's work)")
        return None
    pythons = {"prefalign": sys.executable, "trl": args.trl_python}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        prepared = prepare(args, workdir)
        common = {**{k: prepared[k] for k in ("model", "data_dir", "trl_data")}, "steps": args.steps,
                  "batch_size": args.batch_size, "grad_accum": args.grad_accum, "lr": args.lr,
                  "threads": args.threads, "bf16": args.bf16, "max_length": 8192}
        results = {}
        for name in args.runs.split(","):
            spec = {**common, **RUNS[name], "name": name, "cache_dir": str(workdir / f"cache-{name}")}
            module = "trl" if spec["impl"] == "trl" else "transformers"
            if subprocess.run([pythons[spec["impl"]], "-c", f"import {module}"], capture_output=True).returncode:
                print(f"{name}: skipped ({pythons[spec['impl']]} cannot import {module})", flush=True)
                continue
            started = time.perf_counter()
            results[name] = r = run_child(pythons[spec["impl"]], spec, script=__file__)
            print(f"{name}: {r['pairs_per_s']:.3f} pairs/s, peak RSS {r['peak_rss_mib']:.0f} MiB, tower "
                  f"{r['tower_calls']} calls / {r['images_encoded']} images, losses "
                  f"{[round(x, 6) for x in r['losses']]} ({time.perf_counter() - started:.0f} s)", flush=True)
        text = report(args, prepared, results)
        print("\n" + text)
        first = {name: r["losses"][0] for name, r in results.items() if r["losses"]}
        if any(abs(loss - math.log(2)) > 1e-3 for loss in first.values()):
            print(f"warning: a first-step loss is not ln 2 (policy == reference): {first}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({"args": vars(args), "prepared": prepared,
                                                       "results": results, "table": text}, indent=2))


if __name__ == "__main__":
    main()
