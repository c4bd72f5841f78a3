"""prefalign's stage: kto against TRL's KTOTrainer: the per-step losses of one short run, side by side.

Run it from a venv that has TRL (prefalign never imports TRL):

    /work/venvs/trl/bin/python benchmarks/kto_trl_parity.py [--loss kto|apo_zero_unpaired] [--steps 8]

The same random Llama (bench_dpo's word-level tokenizer: every word is one token, so both trainers
see the same ids), the same unpaired rows (prompt, completion, label; half desirable) in the same
order, full tuning, fp32, AdamW at a learning rate large enough for the losses to move, sequential
sampling, seed 0. Both trainers pair each example with the previous example's completion as its
KL completion; TRL does this within each chunk of one per-device batch and prefalign over the
whole dataset, which is the same pairing when the dataset is one batch, so the run is one batch
of `--batch` rows trained for `--steps` epochs (a fresh z_ref, rewards and losses at every step).

Prints both loss lists and the largest absolute difference; exits 1 if it exceeds `--tolerance`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(workdir: Path, batch: int) -> tuple[str, str]:
    import bench_dpo

    args = bench_dpo.parse_args(["--vocab", "512", "--hidden", "64", "--intermediate", "128", "--layers", "2",
                                 "--heads", "4", "--prompt-len", "24", "--response-len", "12", "--pairs", "1"])
    paths = bench_dpo.build_workload(args, workdir)
    rng = random.Random(1)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(len(bench_dpo.SPECIALS), args.vocab)}" for _ in range(n))

    rows = [{"prompt": words(rng.randint(8, 24)), "completion": " " + words(rng.randint(3, 11)),
             "label": i % 3 != 2} for i in range(batch)]
    data = workdir / "kto.json"
    data.write_text(json.dumps(rows))
    return paths["model"], str(data)


def settings(args) -> dict:
    return dict(per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, max_steps=args.steps,
                learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                save_strategy="no", report_to="none", seed=0, disable_tqdm=True, dataloader_num_workers=0,
                train_sampling_strategy="sequential", bf16=False, fp16=False)


def losses_of(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def run_trl(model_dir: str, data: str, out: str, args) -> list[float]:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = KTOConfig(output_dir=out, beta=args.beta, loss_type=args.loss, desirable_weight=args.chosen_weight,
                       undesirable_weight=args.rejected_weight, max_length=None, gradient_checkpointing=False,
                       precompute_ref_log_probs=False, **settings(args))
    trainer = KTOTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(json.loads(Path(data).read_text())))
    trainer.train()
    return losses_of(trainer)


def run_prefalign(model_dir: str, data: str, out: str, args) -> list[float]:
    from prefalign.config import build_config
    from prefalign.train.workflow import build_trainer

    config = build_config({
        "model_name_or_path": model_dir, "stage": "kto", "finetuning_type": "full", "pref_loss": args.loss,
        "dataset": data, "template": "empty", "cutoff_len": 512, "pref_beta": args.beta,
        "kto_chosen_weight": args.chosen_weight, "kto_rejected_weight": args.rejected_weight,
        "output_dir": out, "overwrite_output_dir": True, **settings(args),
    })
    trainer = build_trainer(config)
    trainer.train()
    return losses_of(trainer)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loss", default="kto", choices=["kto", "apo_zero_unpaired"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--chosen-weight", type=float, default=1.0)
    p.add_argument("--rejected-weight", type=float, default=1.33)
    p.add_argument("--tolerance", type=float, default=1e-5)
    args = p.parse_args(argv)
    import os

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PREFALIGN_CACHE"] = str(Path(tmp) / "cache")
        model_dir, data = build(Path(tmp), args.batch)
        trl = run_trl(model_dir, data, str(Path(tmp) / "trl"), args)
        ours = run_prefalign(model_dir, data, str(Path(tmp) / "prefalign"), args)
    diff = max(abs(a - b) for a, b in zip(trl, ours))
    print(json.dumps({"loss": args.loss, "trl": trl, "prefalign": ours, "max_abs_diff": diff}))
    return 0 if len(trl) == len(ours) == args.steps and diff <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
