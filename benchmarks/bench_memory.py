"""Peak memory against sequence length on the real model: prefalign (defaults, and with the
long-sequence knob) and TRL (without gradient checkpointing, and with it: DPOConfig's default) side by side.

One pair per point whose prompt + each reply fill `cutoff_len` (LF dpo_en_demo texts joined
until the length is reached; benchmarks/real_model.py's SmolLM2-135M-Instruct), one optimizer step
of batch 1, fp32, LoRA (r 8 on q, k, v, o) or full; peak RSS of each run's own process. On a CPU the
knob is `gradient_checkpointing: true` (activations recomputed per layer in the backward); on a GPU
also `activation_offload: true` (saved activations kept in host memory; `--offload`).

    python benchmarks/bench_memory.py --lengths 512,1024,2048        # minutes on a CPU
    python benchmarks/bench_memory.py --lengths 512,1024,2048,4096,8192 --mode full
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_real  # noqa: E402


def long_rows(tokenizer, data_dir: Path, length: int) -> list[dict]:
    """One LF sharegpt ranking row: a user turn of ~0.6 x `length` tokens, replies of ~0.3 x `length`
    each (prompt + the system message + reply < `length`), cut from the demo's texts in file order."""
    from real_model import DEMO

    rows = json.loads((data_dir / f"{DEMO}.json").read_text())
    texts = [m["value"] for r in rows for m in r["conversations"]]
    replies = [r[side]["value"] for r in rows for side in ("chosen", "rejected")]

    def take(pool: list[str], tokens: int) -> str:
        ids = tokenizer("\n".join(pool), add_special_tokens=False)["input_ids"]
        while len(ids) < tokens:
            ids = ids + ids
        return tokenizer.decode(ids[:tokens])

    prompt, reply = int(0.6 * length), int(0.3 * length)
    return [{"conversations": [{"from": "human", "value": take(texts, prompt)}],
             "chosen": {"from": "gpt", "value": take(replies, reply)},
             "rejected": {"from": "gpt", "value": take(replies[1:], reply)}}]


def write_long_pair(tokenizer, cache, length: int, work: Path) -> tuple[Path, list[dict]]:
    """`long_rows` as a dataset folder under `work` (the rows and their `dataset_info.json`): (folder, rows)."""
    from real_model import DEMO, lf_data_dir

    data_dir = work / "data"
    data_dir.mkdir(parents=True)
    rows = long_rows(tokenizer, lf_data_dir(cache), length)
    (data_dir / f"{bench_real.DATASET}.json").write_text(json.dumps(rows))
    info = json.loads((lf_data_dir(cache) / "dataset_info.json").read_text())[DEMO]
    (data_dir / "dataset_info.json").write_text(
        json.dumps({bench_real.DATASET: {**info, "file_name": f"{bench_real.DATASET}.json"}}))
    return data_dir, rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="512,1024,2048,4096,8192")
    p.add_argument("--mode", default="lora", choices=("lora", "full"))
    p.add_argument("--offload", action="store_true", help="also prefalign with activation_offload (a GPU knob)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--trl-python", default="/work/venvs/trl/bin/python")
    p.add_argument("--trl-up-to", type=int, default=None,
                   help="run TRL only up to this cutoff_len (beyond it TRL's peak would pass the machine's RAM: the "
                        "point is recorded as not run)")
    p.add_argument("--cache", default=None)
    p.add_argument("--trl-gc-up-to", type=int, default=None,
                   help="run TRL with gradient_checkpointing (its own default) only up to this cutoff_len")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from real_model import smollm2_dir

    model = smollm2_dir(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(model)
    variants = {"prefalign": {}, "prefalign + gradient_checkpointing": {"gradient_checkpointing": True}}
    if args.offload:
        variants["prefalign + activation_offload"] = {"activation_offload": True}
    runs = {name: ("prefalign", options) for name, options in variants.items()}
    runs |= {"trl": ("trl", {}), "trl + gradient_checkpointing": ("trl", {"gradient_checkpointing": True})}
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for length in (int(x) for x in args.lengths.split(",")):
            work = Path(tmp) / str(length)
            data_dir, rows = write_long_pair(tokenizer, args.cache, length, work)
            (work / "trl.json").write_text(json.dumps([bench_real.trl_record(r) for r in rows]))
            common = {"model": str(model), "data_dir": str(data_dir), "trl_data": str(work / "trl.json"), "steps": 1,
                      "batch_size": 1, "grad_accum": 1, "cutoff_len": length, "lr": 5e-5, "threads": args.threads,
                      "mode": args.mode, "cache_dir": str(work / "cache")}
            results[length] = {}
            for name, (impl, options) in runs.items():
                up_to = {"trl": args.trl_up_to, "trl + gradient_checkpointing": args.trl_gc_up_to}.get(name)
                if up_to is not None and length > up_to:  # 0: TRL not run at all
                    results[length][name] = None
                    print(f"cutoff_len {length} {name}: not run (would exceed RAM)", flush=True)
                    continue
                spec = {**common, "name": name, "impl": impl, impl: options}
                started = time.perf_counter()
                r = bench_real.run_child(args.trl_python if impl == "trl" else sys.executable, spec)
                results[length][name] = {"peak_rss_mib": r["peak_rss_mib"], "peak_gpu_mib": r.get("peak_gpu_mib"),
                                         "step_s": r["loop_s"], "loss": r["losses"][0] if r["losses"] else None}
                print(f"cutoff_len {length} {name}: peak RSS {r['peak_rss_mib']:.0f} MiB, "
                      f"{time.perf_counter() - started:.0f} s", flush=True)
                if args.json_out:
                    Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    names = list(next(iter(results.values())))
    gpu = any(v and v.get("peak_gpu_mib") for point in results.values() for v in point.values())
    unit = "peak GPU MiB" if gpu else "peak RSS MiB"
    print(f"\n{args.mode}, one pair of cutoff_len tokens, batch 1, one step; {unit} (step seconds)\n")
    print("| cutoff_len | " + " | ".join(names) + " |\n|---:|" + "---:|" * len(names))
    for length, point in results.items():
        cells = [f"{v['peak_gpu_mib' if gpu else 'peak_rss_mib']:.0f} ({v['step_s']:.0f} s)" if v else
                 "not run: would exceed RAM" for v in point.values()]
        print(f"| {length} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
