"""Where a prefalign training step's time goes on the real model: torch.profiler by operator.

One LoRA step and one full step (batch 2 x accumulation 2, prefalign defaults) of
SmolLM2-135M-Instruct on LF's demo rows (benchmarks/bench_real.py's workload), after one
warm-up step; the operators sorted by self CPU time. `--variant` tries one change against the
default in the same process, interleaved (A B A B), and prints both step times and losses:

    python benchmarks/profile_real.py                        # the profile tables
    python benchmarks/profile_real.py --variant threads1     # torch.set_num_threads(1) vs the default
    python benchmarks/profile_real.py --variant inference    # reference forward under torch.inference_mode
    python benchmarks/profile_real.py --variant compile      # torch.compile of RMSNorm / rotary / SiLU-MLP
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def trainer_for(mode: str, workdir: Path, steps: int):
    import bench_real
    from prefalign.config import build_config
    from prefalign.train.workflow import build_trainer

    args = bench_real.parse_args(["--steps", str(steps)])
    prepared = bench_real.prepare(args, workdir)
    return build_trainer(build_config({
        "model_name_or_path": prepared["model"], "stage": "dpo", "finetuning_type": mode, **bench_real.LORA,
        "dataset": bench_real.DATASET, "dataset_dir": prepared["data_dir"], "template": "smollm2", "cutoff_len": 512,
        "pref_beta": 0.1, "pref_loss": "sigmoid", "output_dir": str(workdir / f"out-{mode}"),
        "overwrite_output_dir": True, "train_sampling_strategy": "sequential",
        **bench_real._settings({"batch_size": 2, "grad_accum": 2, "steps": steps, "lr": 5e-5})}))


def steps_of(trainer, n: int):
    """`n` optimizer steps by hand (the Trainer's step: micro-batches, backward, AdamW), their times and losses."""
    import torch

    loader = iter(trainer.get_train_dataloader())
    if trainer.optimizer is None:
        trainer.create_optimizer_and_scheduler(num_training_steps=n + 8)
    times, losses = [], []
    for _ in range(n):
        start = time.perf_counter()
        total = 0.0
        for _ in range(trainer.args.gradient_accumulation_steps):
            batch = trainer._prepare_inputs(next(loader))
            loss = trainer.batch_loss(trainer.model, batch)[0] / trainer.args.gradient_accumulation_steps
            loss.backward()
            total += float(loss)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(total)
        torch.manual_seed(0)
    return times, losses


def profile(mode: str, workdir: Path) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    trainer = trainer_for(mode, workdir, 4)
    steps_of(trainer, 1)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        times, _ = steps_of(trainer, 1)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48)
    return f"### {mode}: one step {times[0]:.1f} s (under the profiler)\n\n```\n{table}\n```\n"


@contextlib.contextmanager
def variant(name: str, trainer):
    """The change `name` applied to `trainer` for the duration of the block."""
    import torch

    if name == "threads1":
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)
    elif name == "inference":
        from prefalign import reference as reference_module

        reference = trainer.reference
        original = type(reference).logps

        def logps(self, batch, split="train"):
            with torch.inference_mode():
                out = original.__wrapped__(self, batch, split) if hasattr(original, "__wrapped__") else original(
                    self, batch, split)
            return None if out is None else type(out)(**{k: (v.clone() if torch.is_tensor(v) else v)
                                                         for k, v in vars(out).items()})

        type(reference).logps = logps
        try:
            yield
        finally:
            type(reference).logps = original
            del reference_module
    elif name == "compile":
        from transformers.models.llama import modeling_llama as llama

        saved = {k: getattr(llama, k) for k in ("apply_rotary_pos_emb",)}
        llama.apply_rotary_pos_emb = torch.compile(llama.apply_rotary_pos_emb, dynamic=True)
        norms = [m for m in trainer.model.modules() if type(m).__name__ == "LlamaRMSNorm"]
        mlps = [m for m in trainer.model.modules() if type(m).__name__ == "LlamaMLP"]
        forwards = [(m, m.forward) for m in norms + mlps]
        for m, f in forwards:
            m.forward = torch.compile(f, dynamic=True)
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(llama, k, v)
            for m, f in forwards:
                m.forward = f
    else:
        raise SystemExit(f"unknown variant {name}")


def compare(name: str, mode: str, workdir: Path, rounds: int) -> None:
    """Default vs `name`, interleaved on fresh trainers (the same steps), best step time of each."""
    import torch

    best, losses = {"default": [], name: []}, {}
    for _ in range(rounds):
        for which in ("default", name):
            torch.manual_seed(0)
            trainer = trainer_for(mode, workdir, 4)
            with variant(which, trainer) if which != "default" else contextlib.nullcontext():
                times, step_losses = steps_of(trainer, 2)
            best[which].append(min(times[1:] or times))
            losses[which] = step_losses
    for which, times in best.items():
        print(f"{mode} {which}: best step {min(times):.2f} s of {[round(t, 2) for t in times]}; losses {losses[which]}")
    diff = max(abs(a - b) for a, b in zip(losses["default"], losses[name]))
    print(f"{mode}: {name} / default step time {min(best[name]) / min(best['default']):.3f}; max loss diff {diff:.1e}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default=None, choices=("threads1", "inference", "compile"))
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            if args.variant:
                compare(args.variant, mode, Path(tmp), args.rounds)
            else:
                print(profile(mode, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
