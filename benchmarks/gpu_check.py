"""One-GPU check: bf16 DPO with sdpa (and flash-attention 2 if installed), QLoRA, DeepSpeed ZeRO-3,
and prefalign against TRL's DPOTrainer, on a random model shaped like Qwen2.5-0.5B.

    bash benchmarks/gpu_check.sh            # what to run on a GPU machine (installs what it can)
    python benchmarks/gpu_check.py --dry-run   # on a CPU: a tiny model, one step of one run

Each run trains in its own subprocess (its own peak GPU memory), same data, batch, steps and
seed, and prints: tokens/s (two sequences of prompt + response per pair, over the training loop),
peak GPU memory (`torch.cuda.max_memory_allocated`), and an MFU estimate: 8 x N FLOPs per token
(6N for the policy's forward and backward, 2N for the reference forward; N = the weights a token
is multiplied by: the layers' projections and the output head, ~494M here) over `--peak-tflops` (default 989, bf16 dense on an H100/H200 SXM).
A run whose package is missing (flash-attn, bitsandbytes, deepspeed, trl) is skipped with its
reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Qwen2.5-0.5B's shape (its config.json): 24 layers, hidden 896, MLP 4864, 14 heads, 2 KV heads.
QWEN05 = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)
TINY = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)
# name -> (trainer, settings, the package it needs)
RUNS = {
    "sdpa-full": ("prefalign", {"finetuning_type": "full", "flash_attn": "sdpa"}, None),
    "fa2-full": ("prefalign", {"finetuning_type": "full", "flash_attn": "fa2"}, "flash_attn"),
    "sdpa-lora": ("prefalign", {"finetuning_type": "lora", "flash_attn": "sdpa"}, None),
    "qlora": ("prefalign", {"finetuning_type": "lora", "flash_attn": "sdpa", "quantization_bit": 4}, "bitsandbytes"),
    "zero3-full": ("prefalign", {"finetuning_type": "full", "flash_attn": "sdpa",
                                 "deepspeed": str(ROOT / "examples" / "deepspeed" / "ds_z3_config.json")}, "deepspeed"),
    "trl-full": ("trl", {"finetuning_type": "full"}, "trl"),
    "trl-lora": ("trl", {"finetuning_type": "lora"}, "trl"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=None, help=f"comma-separated subset of {', '.join(RUNS)} (default: all)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=128)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--dry-run", action="store_true", help="on the CPU: tiny model, fp32, 1 step (default run: sdpa-full)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        args.runs = args.runs or "sdpa-full"
        args.steps, args.batch_size, args.prompt_len, args.response_len = 1, 2, 16, 8
    args.runs = args.runs or ",".join(RUNS)
    unknown = [r for r in args.runs.split(",") if r not in RUNS]
    if unknown:
        p.error(f"--runs: unknown {unknown}; known: {', '.join(RUNS)}")
    return args


def build_workload(args, workdir: Path, shape: dict) -> dict:
    """bench_dpo's word-level tokenizer and random pairs, with a random model of Qwen2's `shape`."""
    import torch

    sys.path.insert(0, str(HERE))
    from bench_dpo import build_workload as tokenizer_and_pairs
    from bench_dpo import qwen2_as_llama

    small = argparse.Namespace(vocab=shape["vocab_size"], layers=1, hidden=64, intermediate=128, heads=1,
                               pairs=max(64, args.batch_size * args.steps), prompt_len=args.prompt_len,
                               response_len=args.response_len, real_shaped=None, cutoff_len=None)
    workload = tokenizer_and_pairs(small, workdir)
    torch.manual_seed(0)
    model = qwen2_as_llama(**shape, max_position_embeddings=4096, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    model.to(torch.bfloat16).save_pretrained(workload["model"])  # replaces the small one
    return workload


def _values(spec: dict) -> dict:
    return {
        "model_name_or_path": spec["model"], "dataset": spec["data"], "template": "empty",
        "cutoff_len": spec["prompt_len"] + spec["response_len"], "output_dir": spec["out"],
        "overwrite_output_dir": True, "per_device_train_batch_size": spec["batch_size"], "max_steps": spec["steps"],
        "learning_rate": 1e-6, "logging_steps": 1, "save_strategy": "no", "report_to": "none", "seed": 0,
        "disable_tqdm": True, "bf16": spec["bf16"], "lora_target": "all", **spec["settings"],
    }


def child(spec: dict) -> None:
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        begin = end = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

    clock = Clock()
    if spec["trainer"] == "prefalign":
        from prefalign.config import build_config
        from prefalign.train.workflow import build_trainer

        trainer = build_trainer(build_config(_values(spec)))
    else:
        trainer = _trl_trainer(spec)
    trainer.add_callback(clock)
    trainer.train()
    params = matmul_params(spec["shape"])
    tokens = spec["steps"] * spec["batch_size"] * 2 * (spec["prompt_len"] + spec["response_len"])
    seconds = clock.end - clock.begin
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(spec["out"], "gpu_check.json").write_text(json.dumps({
        "tokens_per_s": tokens / seconds, "peak_gib": peak, "params": params,
        "mfu": 8 * params * tokens / seconds / (spec["peak_tflops"] * 1e12), "losses": losses}))


def matmul_params(shape: dict) -> int:
    """Weights a token's forward multiplies by: every layer's projections and the output head."""
    h, kv = shape["hidden_size"], shape["hidden_size"] // shape["num_attention_heads"] * shape["num_key_value_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * shape["intermediate_size"]
    return shape["num_hidden_layers"] * layer + shape["vocab_size"] * h


def _trl_trainer(spec: dict):
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    values = _values(spec)
    train = datasets.Dataset.from_list(json.loads(Path(spec["data"]).read_text()))
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16 if spec["bf16"] else torch.float32,
                                                 attn_implementation="sdpa")
    config = DPOConfig(output_dir=spec["out"], beta=0.1, loss_type=["sigmoid"], max_length=None, bf16=spec["bf16"],
                       per_device_train_batch_size=spec["batch_size"], max_steps=spec["steps"], learning_rate=1e-6,
                       logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True)
    peft = LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM", target_modules="all-linear") \
        if values["finetuning_type"] == "lora" else None
    return DPOTrainer(model=model, args=config, train_dataset=train,
                      processing_class=AutoTokenizer.from_pretrained(spec["model"]), peft_config=peft)


def run(name: str, spec: dict) -> dict | None:
    cmd = [str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if "deepspeed" in spec["settings"] else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, *launcher, *cmd], capture_output=True, text=True, env=env)
    if proc.returncode:
        print(f"{name:<11} FAILED (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(Path(spec["out"], "gpu_check.json").read_text())


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; run with --dry-run to check the script on a CPU")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="prefalign-gpu-check-"))
    shape = TINY if args.dry_run else QWEN05
    workload = {**build_workload(args, workdir, shape), "shape": shape}
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (dry run)'}; "
          f"{args.steps} steps x {args.batch_size} pairs, prompt {args.prompt_len} + response {args.response_len}",
          flush=True)
    for name in args.runs.split(","):
        trainer, settings, package = RUNS[name]
        if package and importlib.util.find_spec(package) is None:
            print(f"{name:<11} skipped: {package} is not installed", flush=True)
            continue
        spec = {**workload, "trainer": trainer, "settings": settings, "out": str(workdir / name),
                "steps": args.steps, "batch_size": args.batch_size, "prompt_len": args.prompt_len,
                "response_len": args.response_len, "bf16": not args.dry_run, "peak_tflops": args.peak_tflops}
        Path(spec["out"]).mkdir(parents=True, exist_ok=True)
        result = run(name, spec)
        if result:
            print(f"{name:<11} {result['tokens_per_s']:10.0f} tokens/s   peak {result['peak_gib']:6.2f} GiB   "
                  f"MFU {100 * result['mfu']:5.1f}%   losses {[round(x, 4) for x in result['losses'][:3]]}", flush=True)


if __name__ == "__main__":
    main()
