"""prefalign's stage: kto vs TRL's KTOTrainer: examples/s and peak RSS on one real-shaped KTO workload.

The workload is bench_dpo's real-shaped one (multi-turn ChatML conversations whose lengths are
log-normal, median 600 tokens and p90 1,600, cut at `--cutoff-len`; a word-level tokenizer, so both
trainers see the same tokens), unpaired as TRL does (each pair a desirable chosen and an undesirable
rejected example), on a random 4 x 256 Llama with a 32k vocabulary. Every run trains in its own
subprocess, the same examples in the same order (sequential sampling), the same batch, accumulation,
steps, learning rate, β and fp32, one torch thread by default; runs differ only in the trainer and
prefalign's speed options.

    python benchmarks/bench_kto.py --json-out benchmarks/results/kto_real_shaped.json
    python benchmarks/bench_kto.py --runs trl-lora,pa-lora-plain --steps 2      # a quick look

Printed per run: loop examples/s (Trainer `on_train_begin` .. `on_train_end`), end-to-end
examples/s (from before the trainer is built: data preparation and model loading count), peak RSS
of the child, and the first and last logged losses (step 1 is 0.5 for both: policy = reference).
TRL is a benchmark-only dependency; prefalign never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dpo  # noqa: E402  (the workload, the clock and the machine line are bench_dpo's)

RUNS = {
    "trl-lora": {"impl": "trl", "mode": "lora"},
    "pa-lora-plain": {"impl": "prefalign", "mode": "lora"},
    "pa-lora-prefix": {"impl": "prefalign", "mode": "lora", "prefix_sharing": True},
    "pa-lora-packed-prefix": {"impl": "prefalign", "mode": "lora", "packing": True, "prefix_sharing": True},
    "trl-full": {"impl": "trl", "mode": "full"},
    "pa-full-plain": {"impl": "prefalign", "mode": "full"},
    "pa-full-packed-prefix": {"impl": "prefalign", "mode": "full", "packing": True, "prefix_sharing": True},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=64, help="preference pairs, unpaired into twice as many examples")
    p.add_argument("--cutoff-len", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole list this many times, interleaved (A B A B), so that every run sees the "
                        "same machine load; each run's median round is reported")
    p.add_argument("--json-out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(args, workdir: Path) -> dict:
    """bench_dpo's real-shaped pairs and model (resized), and the same pairs as TRL unpairs them."""
    shape = bench_dpo.parse_args(["--real-shaped", "b", "--pairs", str(args.pairs), "--cutoff-len", str(args.cutoff_len),
                                  "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
                                  "--steps", str(args.steps)])
    shape.layers, shape.hidden = args.layers, args.hidden
    shape.intermediate, shape.heads = int(2.75 * args.hidden), max(1, args.hidden // 64)
    paths = bench_dpo.build_workload(shape, workdir)
    pairs = json.loads(Path(paths["data"]).read_text())
    # TRL's unpair_preference_dataset: every chosen reply (desirable), then every rejected one
    rows = ([{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in pairs]
            + [{"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in pairs])
    data = workdir / "kto.json"
    data.write_text(json.dumps(rows))
    return {"model": paths["model"], "data": str(data), "shape": f"{shape.layers} x {shape.hidden}, vocab {shape.vocab}"}


def settings(spec: dict) -> dict:
    return dict(per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=spec["grad_accum"],
                max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="linear", warmup_steps=0,
                logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
                dataloader_num_workers=0, train_sampling_strategy="sequential", bf16=False, fp16=False)


LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def run_trl(spec: dict, out_dir: str, clock) -> None:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    config = KTOConfig(output_dir=out_dir, beta=spec["beta"], max_length=spec["cutoff_len"],
                       gradient_checkpointing=False, precompute_ref_log_probs=False, **settings(spec))
    peft_config = LoraConfig(task_type="CAUSAL_LM", **LORA) if spec["mode"] == "lora" else None
    trainer = KTOTrainer(model=model, args=config, processing_class=tokenizer, peft_config=peft_config,
                         train_dataset=datasets.Dataset.from_list(json.loads(Path(spec["data"]).read_text())),
                         callbacks=[clock])
    trainer.train()


def run_prefalign(spec: dict, out_dir: str, clock) -> None:
    from prefalign.config import build_config
    from prefalign.train.workflow import build_trainer

    config = build_config({
        "model_name_or_path": spec["model"], "stage": "kto", "finetuning_type": spec["mode"], "lora_rank": 8,
        "lora_alpha": 16, "lora_dropout": 0.0, "lora_target": "q_proj,k_proj,v_proj,o_proj", "dataset": spec["data"],
        "cutoff_len": spec["cutoff_len"], "pref_beta": spec["beta"], "output_dir": out_dir,
        "overwrite_output_dir": True, "prefix_sharing": bool(spec.get("prefix_sharing")),
        "packing": bool(spec.get("packing")), **settings(spec),
    })
    trainer = build_trainer(config)
    trainer.add_callback(clock)
    trainer.train()


def child_main(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    os.environ["PREFALIGN_CACHE"] = spec["cache_dir"]
    clock = bench_dpo._clock_callback()
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        (run_trl if spec["impl"] == "trl" else run_prefalign)(spec, out_dir, clock)
        end = time.perf_counter()
    examples = spec["steps"] * spec["batch_size"] * spec["grad_accum"]
    print("RESULT " + json.dumps({
        "loop_examples_per_s": examples / (clock.end - clock.begin), "e2e_examples_per_s": examples / (end - start),
        "setup_s": clock.begin - start, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "losses": clock.losses, "threads": torch.get_num_threads(),
    }), flush=True)


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"run {spec['name']} failed (exit {proc.returncode}):\n"
                       + "\n".join((proc.stdout + proc.stderr).splitlines()[-30:]))


def median_round(rounds: list[dict]) -> dict:
    """The round with the median loop examples/s (the lower middle one of an even count); peak RSS is
    the largest of the rounds (it is a property of the run, not of the load)."""
    ordered = sorted(rounds, key=lambda r: r["loop_examples_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "peak_rss_mib": max(r["peak_rss_mib"] for r in rounds),
            "rounds": len(rounds)}


def report(args, shape: str, results: dict) -> str:
    lines = [f"workload: {2 * args.pairs} KTO examples (bench_dpo real-shaped pairs, unpaired), cutoff_len "
             f"{args.cutoff_len}, Llama {shape}; batch {args.batch_size} x accumulation {args.grad_accum}, "
             f"{args.steps} steps ({args.steps * args.batch_size * args.grad_accum} examples), lr {args.lr}, "
             f"beta {args.beta}, fp32; {args.rounds} interleaved round(s), median shown; machine: {bench_dpo.machine()}", "",
             "| run | loop examples/s | end-to-end examples/s | setup s | peak RSS MiB | loss step 1 / last |",
             "|---|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        losses = f"{r['losses'][0]:.4f} / {r['losses'][-1]:.4f}" if r["losses"] else "-"
        lines.append(f"| {name} | {r['loop_examples_per_s']:.2f} | {r['e2e_examples_per_s']:.2f} | {r['setup_s']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {losses} |")
    for mode in ("lora", "full"):
        base = results.get(f"trl-{mode}")
        for name, r in results.items():
            if base and name.startswith(f"pa-{mode}"):
                lines.append(f"\n{name} / trl-{mode}: loop {r['loop_examples_per_s'] / base['loop_examples_per_s']:.2f}x, "
                             f"peak RSS {r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workload = build(args, Path(tmp))
        common = {k: workload[k] for k in ("model", "data")} | {
            "batch_size": args.batch_size, "grad_accum": args.grad_accum, "steps": args.steps, "lr": args.lr,
            "beta": args.beta, "threads": args.threads, "cutoff_len": args.cutoff_len}
        rounds: dict[str, list[dict]] = {name: [] for name in args.runs.split(",")}
        for i in range(args.rounds):
            for name in rounds:
                result = run_child({**common, **RUNS[name], "name": name, "cache_dir": f"{tmp}/cache-{name}-{i}"})
                rounds[name].append(result)
                print(f"round {i + 1} {name}: {result}", flush=True)
                if args.json_out:
                    Path(args.json_out).write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=2))
        print("\n" + report(args, workload["shape"], {name: median_round(r) for name, r in rounds.items()}))


if __name__ == "__main__":
    main()
