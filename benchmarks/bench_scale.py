"""Memory of the ways to make a model fit: DDP vs DeepSpeed ZeRO-2 / ZeRO-3 (+ offload), LoRA vs QLoRA.

    python benchmarks/bench_scale.py                         # all runs, 2 processes, 2 steps
    python benchmarks/bench_scale.py --runs ddp,zero3 --steps 1
    python benchmarks/bench_scale.py --runs ddp,zero3 --hidden 1024 --intermediate 2816   # ~220M parameters

Sharding (full DPO of the proportioned model: 12 layers, hidden 512, intermediate 1408, vocabulary
32,000; ~71M parameters): each run is one `torchrun` launch of N processes on this machine (gloo
on the CPU); every process reports its own peak RSS (`resource.getrusage`) after training, and the
table shows the largest. Same data, batch, steps and seed in every run, so the logged losses of
the first steps must agree (they are printed).

Quantization (LoRA vs QLoRA, one process): the base model's weight memory as loaded
(`get_memory_footprint`: fp32 vs 4-bit NF4 with double quantization), for the whole model and for
the decoder's linear layers (what bitsandbytes quantizes; embeddings and the output head stay in
the compute dtype), and each run's peak RSS over a short training run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DS = HERE.parent / "examples" / "deepspeed"

def _released(name: str) -> dict:
    """A shipped ZeRO-3 config whose gathered weights are freed after each use (the shipped ones keep up
    to 1e9 parameters gathered: all of a model this small, as they would be a fraction of a 7B one's)."""
    config = json.loads((DS / name).read_text())
    config["zero_optimization"].update(stage3_max_live_parameters=1e6, stage3_max_reuse_distance=0,
                                       stage3_prefetch_bucket_size=1e6)
    return config


SHARDED = {
    "ddp": {},
    "zero2": {"deepspeed": str(DS / "ds_z2_config.json")},
    "zero3": {"deepspeed": str(DS / "ds_z3_config.json")},
    "zero3-offload": {"deepspeed": str(DS / "ds_z3_offload_config.json")},
    "zero3-released": {"deepspeed": _released("ds_z3_config.json")},
}
QUANTIZED = {"lora": {}, "qlora": {"quantization_bit": 4}}
RUNS = [*SHARDED, *QUANTIZED]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--bf16", action="store_true", help="bf16: true in every run (what ZeRO-3 users run)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json-out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _values(spec: dict) -> dict:
    return {
        "model_name_or_path": spec["model"], "dataset": spec["data"], "template": "empty",
        "cutoff_len": spec["cutoff_len"], "output_dir": spec["out"], "overwrite_output_dir": True,
        "per_device_train_batch_size": 1, "max_steps": spec["steps"], "learning_rate": 1e-5, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "seed": 0, "disable_tqdm": True, "lora_target": "all",
        "bf16": spec["bf16"], **spec["overrides"],
    }


def child(spec: dict) -> None:
    """One process of one run: train, then write this process's peak RSS and the logged losses."""
    from prefalign.config import build_config
    from prefalign.distributed import rank
    from prefalign.train.workflow import build_trainer

    config = build_config(_values(spec))
    baseline_mb = _rss_mb()  # the libraries imported and the process group up; nothing loaded yet
    trainer = build_trainer(config)
    base_bytes = None
    if spec.get("footprint"):
        base_bytes = {"all": trainer.model.get_memory_footprint(), "decoder_linear": _decoder_linear_bytes(trainer.model)}
    loaded_peak_mb = _peak_mb()  # models, data and reference loaded, before the first step
    seconds = trainer.train().metrics["train_runtime"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    Path(spec["out"], f"memory-{rank()}.json").write_text(json.dumps(
        {"rank": rank(), "peak_rss_mb": _peak_mb(), "loaded_peak_rss_mb": loaded_peak_mb, "baseline_rss_mb": baseline_mb,
         "final_rss_mb": _rss_mb(), "train_seconds": seconds, "losses": losses, "base_bytes": base_bytes}))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _decoder_linear_bytes(model) -> int:
    """Bytes of the decoder layers' linear weights (+ their quantization state), without LoRA weights."""
    total = 0
    for name, module in model.named_modules():
        if ".layers." in name and not any(t in name for t in ("lora_", "base_layer")) and hasattr(module, "weight") \
                and module.weight is not None and module.weight.dim() == 2:
            weight = getattr(module, "base_layer", module).weight
            total += weight.numel() * weight.element_size()
            state = getattr(weight, "quant_state", None)
            if state is not None:
                total += state.absmax.numel() * state.absmax.element_size()
    return total


def launch(name: str, spec: dict, nproc: int) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return []
    return [json.loads(p.read_text()) for p in sorted(Path(spec["out"]).glob("memory-*.json"))]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    sys.path.insert(0, str(HERE))
    from bench_dpo import build_workload
    from bench_dpo import parse_args as workload_args

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="prefalign-scale-"))
    # bench_dpo's own arguments, so every field its workload builder reads has its default
    shape = workload_args(["--vocab", "32000", "--layers", str(args.layers), "--hidden", str(args.hidden),
                           "--intermediate", str(args.intermediate), "--pairs", str(args.pairs),
                           "--prompt-len", str(args.prompt_len), "--response-len", str(args.response_len)])
    workload = build_workload(shape, workdir)
    common = {**workload, "cutoff_len": args.prompt_len + args.response_len, "steps": args.steps, "bf16": args.bf16}
    results = {}
    for name in args.runs.split(","):
        sharded = name in SHARDED
        overrides = {"finetuning_type": "full", **SHARDED[name]} if sharded else {"finetuning_type": "lora",
                                                                                     **QUANTIZED[name]}
        spec = {**common, "out": str(workdir / name), "overrides": overrides, "footprint": not sharded}
        results[name] = launch(name, spec, args.nproc if sharded else 1)
        rows = results[name] or [{"peak_rss_mb": float("nan"), "loaded_peak_rss_mb": float("nan"),
                                  "final_rss_mb": float("nan"), "baseline_rss_mb": float("nan"), "train_seconds": float("nan"),
                                  "losses": []}]
        top = max(rows, key=lambda r: r["peak_rss_mb"])
        print(f"{name:<15} peak RSS per process {top['peak_rss_mb']:6.0f} MB (libraries alone: "
              f"{top['baseline_rss_mb']:5.0f} MB; before step 1: {top['loaded_peak_rss_mb']:6.0f} MB; "
              f"after training: {top['final_rss_mb']:6.0f} MB; {top['train_seconds']:5.1f} s)   "
              f"losses {[round(x, 5) for x in rows[0]['losses']]}", flush=True)
    _summary(results)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


def _summary(results: dict) -> None:
    def peak(name):
        return max(r["peak_rss_mb"] for r in results[name]) if results.get(name) else None

    def above_libraries(name):
        return max(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in results[name])

    if peak("ddp"):
        for name in ("zero2", "zero3", "zero3-offload", "zero3-released"):
            if peak(name):
                print(f"{name} / ddp peak RSS per process: {peak(name) / peak('ddp'):.2f}; above the libraries' "
                      f"own: {above_libraries(name) / above_libraries('ddp'):.2f}")
    if results.get("lora") and results.get("qlora"):
        lora, qlora = results["lora"][0]["base_bytes"], results["qlora"][0]["base_bytes"]
        for part in ("all", "decoder_linear"):
            print(f"qlora / lora base-weight bytes ({part}): {qlora[part] / lora[part]:.3f} "
                  f"({qlora[part] / 2**20:.1f} MiB vs {lora[part] / 2**20:.1f} MiB)")
        print(f"qlora / lora peak RSS: {peak('qlora') / peak('lora'):.2f}")


if __name__ == "__main__":
    main()
