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
    """`n` optimizer steps by hand (the Trainer's step: micro-batches, backward, AdamW), their times and losses.

    Each phase runs in a `torch.profiler.record_function` range (free outside a profiler), so a
    profile can say how long each took: forward (policy and loss, the reference inside it),
    backward, optimizer.
    """
    import torch
    from torch.profiler import record_function

    loader = iter(trainer.get_train_dataloader())
    if trainer.optimizer is None:
        trainer.create_optimizer_and_scheduler(num_training_steps=n + 8)
    times, losses = [], []
    for _ in range(n):
        start = time.perf_counter()
        total = 0.0
        for _ in range(trainer.args.gradient_accumulation_steps):
            batch = trainer._prepare_inputs(next(loader))
            with record_function(REGIONS[0]):
                loss = trainer.batch_loss(trainer.model, batch)[0] / trainer.args.gradient_accumulation_steps
            with record_function(REGIONS[2]):
                loss.backward()
            total += float(loss.detach())
        with record_function(REGIONS[3]):
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(total)
        torch.manual_seed(0)
    return times, losses


# the phases of a step (record_function ranges): the reference forward runs inside the first
REGIONS = ("phase: forward + loss", "phase: reference forward", "phase: backward", "phase: optimizer")


def _timed_reference(trainer):
    """Put the reference's forward in its own record_function range (an instance attribute: this trainer only)."""
    from torch.profiler import record_function

    reference = trainer.reference
    original = reference.logps

    def logps(*args, **kwargs):
        with record_function(REGIONS[1]):
            return original(*args, **kwargs)

    reference.logps = logps


def op_class(name: str, shapes) -> str:
    """Which part of the model an operator belongs to, from its name and (for matmuls) its input shapes.

    SmolLM2: hidden 576, KV width 192, MLP 1,536, vocabulary 49,152 (the fused head's tiles: 2,048
    columns), LoRA rank 8; a matmul is named by the weight dimensions among its inputs' dimensions.
    """
    if "scaled_dot_product" in name or "_flash_attention" in name:
        return "attention (sdpa, per span)"
    if name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"):
        from prefalign.modeling.logprobs import VOCAB_BLOCK

        dims = {d for shape in shapes for d in shape} if shapes else set()
        if dims & {49152, VOCAB_BLOCK["cpu"]}:  # the whole head, or the fused kernel's tiles of it
            return "LM head (fused log-softmax)"
        if 8 in dims:
            return "LoRA matmuls (r 8)"
        if 1536 in dims:
            return "MLP matmuls (gate, up, down)"
        if 576 in dims or 192 in dims:
            return "attention projections (q, k, v, o)"
        return "other matmuls"
    return "elementwise and the rest (norms, rotary, SiLU*mul, copies, adds)"


def profile(mode: str, workdir: Path) -> str:
    """One profiled step of `mode` after a warm-up step: the top operators, by model part, by phase."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    trainer = trainer_for(mode, workdir, 4)
    _timed_reference(trainer)
    steps_of(trainer, 1)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        times, _ = steps_of(trainer, 1)
    ops = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ops)
    table = ops.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=48)
    parts: dict[str, float] = {}
    for e in prof.key_averages(group_by_input_shape=True):
        if not e.key.startswith("phase: "):
            part = op_class(e.key, e.input_shapes)
            parts[part] = parts.get(part, 0.0) + e.self_cpu_time_total
    phases = {e.key: e.cpu_time_total for e in ops if e.key in REGIONS}
    lines = [f"### {mode}: one step {times[0]:.1f} s under the profiler (self CPU {total / 1e6:.1f} s)", "",
             "| part of the model | self CPU s | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v / 1e6:.2f} | {v / total:.1%} |" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])]
    lines += ["", "| phase (ranges nest: the reference runs inside forward + loss) | s | share |", "|---|---:|---:|"]
    lines += [f"| {k[len('phase: '):]} | {phases.get(k, 0) / 1e6:.2f} | {phases.get(k, 0) / total:.1%} |"
              for k in REGIONS]
    lines += ["", "Top operators by self CPU time:", "", "```", table.strip(), "```", ""]
    return "\n".join(lines)


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
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--md-out", default=None, help="also write the profile tables to this markdown file")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            if args.variant:
                compare(args.variant, mode, Path(tmp), args.rounds)
            else:
                sections.append(profile(mode, Path(tmp)))
                print(sections[-1], flush=True)
    if args.md_out and sections:
        Path(args.md_out).write_text("\n".join(sections))


if __name__ == "__main__":
    main()
