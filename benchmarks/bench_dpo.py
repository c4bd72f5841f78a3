"""prefalign vs TRL's DPOTrainer, side by side, on one synthetic DPO workload.

One invocation builds the workload once (a random Llama saved to disk, a word-level tokenizer so
token counts are exact, random preference pairs as JSON), then trains every selected run in a
fresh subprocess, so that each run's peak RSS is its own and no run warms another's caches. Every
run uses the same model file, data, batch size, accumulation, steps, learning rate, loss and
precision; the runs differ only in the trainer and prefalign's own speed options.

    python benchmarks/bench_dpo.py                       # the default workload, all runs
    python benchmarks/bench_dpo.py --proportioned        # 12 layers, hidden 512, intermediate 1408
    python benchmarks/bench_dpo.py --prefix-workload     # prompt 384 / responses 64, prefix sharing on vs off
    python benchmarks/bench_dpo.py --runs trl-lora,pa-lora-fast --steps 2   # a quick look
    python benchmarks/bench_dpo.py --real-shaped a --cutoff-len 1024   # long-tailed multi-turn chats,
                                            # vocabulary 151,936 tied, Qwen2 4 x 256 (the head dominates)
    python benchmarks/bench_dpo.py --real-shaped b --cutoff-len 1024   # the same data, 12 x 512, vocab 32k

Real-shaped workloads (`--real-shaped`): conversations of 1-7 user turns (half with a system turn)
whose lengths in tokens are log-normal with median 600 and p90 1,600, capped at 4,000, then
truncated at `--cutoff-len` by each trainer's own rule; the chat template is ChatML, given to both
trainers as the tokenizer's own. There prefalign runs with packing and prefix sharing off and on.

Printed per run: loop pairs/s (from the Trainer's `on_train_begin` to `on_train_end`), end-to-end
pairs/s (from before the trainer is built, so data encoding, model loading and any reference
precompute count, to the end of training), peak RSS (`resource.getrusage` in the child), and the
logged losses (the same model, data order and loss, so the implementations must agree at step 0
and stay close after). Then the ratios prefalign / TRL.

TRL is a benchmark-only dependency (`pip install -e .[bench]`); prefalign never imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2; word i is the token "w{i}"

# name -> what differs between runs (everything else is the shared workload and settings)
RUNS = {
    "trl-lora": {"impl": "trl", "mode": "lora"},
    "trl-full": {"impl": "trl", "mode": "full"},
    "pa-lora-plain": {"impl": "prefalign", "mode": "lora"},
    "pa-lora-precompute": {"impl": "prefalign", "mode": "lora", "precompute": True},
    "pa-lora-prefix": {"impl": "prefalign", "mode": "lora", "prefix_sharing": True},
    "pa-lora-fast": {"impl": "prefalign", "mode": "lora", "precompute": True, "prefix_sharing": True},
    "pa-full-plain": {"impl": "prefalign", "mode": "full"},
    "pa-full-precompute": {"impl": "prefalign", "mode": "full", "precompute": True},
    "pa-full-prefix": {"impl": "prefalign", "mode": "full", "prefix_sharing": True},
    "pa-full-fast": {"impl": "prefalign", "mode": "full", "precompute": True, "prefix_sharing": True},
    "pa-full-gc": {"impl": "prefalign", "mode": "full", "gradient_checkpointing": True},
    # the least memory: no reference model in memory, one prompt per pair, activations recomputed
    "pa-full-lowmem": {"impl": "prefalign", "mode": "full", "precompute": True, "prefix_sharing": True,
                       "gradient_checkpointing": True},
    "pa-lora-packed": {"impl": "prefalign", "mode": "lora", "packing": True},
    "pa-lora-packed-prefix": {"impl": "prefalign", "mode": "lora", "packing": True, "prefix_sharing": True},
    "pa-full-packed": {"impl": "prefalign", "mode": "full", "packing": True},
    "pa-full-packed-prefix": {"impl": "prefalign", "mode": "full", "packing": True, "prefix_sharing": True},
    # `prefalign eval`'s scoring vs the training forward, same layout and pairs (no training)
    "eval-padded": {"impl": "prefalign-eval", "mode": "lora"},
    "eval-packed-prefix": {"impl": "prefalign-eval", "mode": "lora", "packing": True, "prefix_sharing": True},
}
DEFAULT_RUNS = list(RUNS)
PROPORTIONED_RUNS = ["trl-lora", "trl-full", "pa-lora-prefix", "pa-lora-fast", "pa-full-prefix", "pa-full-fast"]
PREFIX_RUNS = ["pa-lora-plain", "pa-lora-prefix", "pa-full-plain", "pa-full-prefix"]
REAL_RUNS = ["trl-lora", "pa-lora-plain", "pa-lora-prefix", "pa-lora-packed", "pa-lora-packed-prefix",
             "trl-full", "pa-full-plain", "pa-full-prefix", "pa-full-packed", "pa-full-packed-prefix"]
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>"]
ROLE_WORDS = ["system", "user", "assistant"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # workload
    p.add_argument("--pairs", type=int, default=256, help="preference pairs in the data set")
    p.add_argument("--prompt-len", type=int, default=192, help="prompt tokens per pair")
    p.add_argument("--response-len", type=int, default=64, help="tokens per response (eos included)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default 2.75 x hidden)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default hidden / 64)")
    # presets
    p.add_argument("--proportioned", action="store_true", help="12 layers, hidden 512, intermediate 1408")
    p.add_argument("--prefix-workload", action="store_true",
                   help="prompt 384 / responses 64; prefalign with prefix sharing on vs off")
    p.add_argument("--real-shaped", choices=("a", "b"), default=None,
                   help="long-tailed multi-turn chats; a: Qwen2 4 x 256, vocab 151,936 tied; b: 12 x 512, vocab 32k")
    p.add_argument("--cutoff-len", type=int, default=None, help="cutoff_len / max_length (real-shaped: 1024)")
    # training (identical for every run)
    p.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="run TRL with its own default (gradient_checkpointing=True); default: off, like prefalign")
    # harness
    p.add_argument("--runs", default=None, help=f"comma-separated subset of {', '.join(RUNS)}")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each child (default: torch's)")
    p.add_argument("--workdir", default=None, help="where the workload is built (default: a temp dir)")
    p.add_argument("--json-out", default=None, help="also write the results as JSON here")
    p.add_argument("--profile", action="store_true",
                   help="run each child under torch.profiler and print its top operators (slower; for diagnosis)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.proportioned:
        args.layers, args.hidden, args.intermediate = 12, 512, 1408
    if args.prefix_workload:
        args.prompt_len, args.response_len = 384, 64
    if args.real_shaped == "a":
        args.layers, args.hidden, args.vocab = 4, 256, 151936
    elif args.real_shaped == "b":
        args.layers, args.hidden, args.intermediate, args.vocab = 12, 512, 1408, 32000
    if args.real_shaped:
        args.cutoff_len = args.cutoff_len or 1024
        if "--batch-size" not in " ".join(argv if argv is not None else sys.argv):
            args.batch_size = 2
    args.intermediate = args.intermediate or int(2.75 * args.hidden)
    args.heads = args.heads or max(1, args.hidden // 64)
    if args.runs is None:
        args.runs = ",".join(REAL_RUNS if args.real_shaped else PROPORTIONED_RUNS if args.proportioned
                             else PREFIX_RUNS if args.prefix_workload else DEFAULT_RUNS)
    unknown = [r for r in args.runs.split(",") if r not in RUNS]
    if unknown:
        p.error(f"--runs: unknown {unknown}; known: {', '.join(RUNS)}")
    return args


# -- the workload --------------------------------------------------------------------------------
def build_workload(args, workdir: Path) -> dict:
    """A random Llama + word-level tokenizer in workdir/model, random pairs in workdir/pairs.json."""
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    fixed = SPECIALS + (CHAT_SPECIALS + ROLE_WORDS if args.real_shaped else [])
    vocab = {tok: i for i, tok in enumerate(fixed)}
    vocab.update({f"w{i}": i for i in range(len(fixed), args.vocab)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Words are split at whitespace and then into "w<digits>" tokens, so text joined without a
    # space (e.g. a reply glued to its prompt by a template) still encodes to the same tokens.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"w\d+"), behavior="isolated")]
    )
    positions = max(args.prompt_len + 2 * args.response_len, 2 * (args.cutoff_len or 0)) + 64
    if args.real_shaped:  # ChatML: the markup tokens are split out before the words
        from prefalign.data.templates import CHATML

        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                            unk_token="<unk>", padding_side="right", model_max_length=positions,
                                            additional_special_tokens=CHAT_SPECIALS)
        tokenizer.chat_template = CHATML.jinja
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                            unk_token="<unk>", padding_side="right", model_max_length=positions)
    shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads, max_position_embeddings=positions,
                 bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=0, dtype="float32")
    torch.manual_seed(0)
    if args.real_shaped == "a":
        model = qwen2_as_llama(**shape, num_key_value_heads=max(1, args.heads // 2))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape, num_key_value_heads=args.heads, tie_word_embeddings=False))
    model_dir = workdir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    rng = random.Random(0)
    if args.real_shaped:
        pairs = real_shaped_pairs(rng, args.pairs, len(fixed), args.vocab)
        data_path = workdir / "pairs.json"
        data_path.write_text(json.dumps(pairs))
        ids = tokenizer(tokenizer.apply_chat_template(pairs[0]["prompt"] + pairs[0]["chosen"], tokenize=False))
        assert tokenizer.unk_token_id not in ids["input_ids"], "the tokenizer must not split words"
        trained = args.steps * args.batch_size * args.grad_accum  # sequential sampling: the first pairs
        return {"model": str(model_dir), "data": str(data_path),
                "stats": pair_token_stats(tokenizer, pairs, args.cutoff_len, trained)}

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(len(SPECIALS), args.vocab)}" for _ in range(n))

    # Responses end with the eos token, written in the data (both trainers then count exactly
    # response_len tokens: LLaMA-Factory's `empty` template adds none, TRL adds it only where missing).
    pairs = [{"prompt": words(args.prompt_len),
              "chosen": " " + words(args.response_len - 1) + "</s>",
              "rejected": " " + words(args.response_len - 1) + "</s>"} for _ in range(args.pairs)]
    data_path = workdir / "pairs.json"
    data_path.write_text(json.dumps(pairs))
    ids = tokenizer(pairs[0]["prompt"] + pairs[0]["chosen"])["input_ids"]
    assert len(ids) == args.prompt_len + args.response_len and 2 not in ids, "the tokenizer must not split words"
    return {"model": str(model_dir), "data": str(data_path)}


# -- the real-shaped workload --------------------------------------------------------------------
def qwen2_as_llama(**config):
    """A random model of Qwen2's architecture (grouped-query attention, tied embeddings, attention biases)
    as a Llama config: transformers 5 gives a `qwen2` config its BPE tokenizer class, which drops a
    word-level vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{"tie_word_embeddings": True, **config}, attention_bias=True))


def real_shaped_lengths(rng: random.Random, n: int, median: int = 600, p90: int = 1600, cap: int = 4000,
                        floor: int = 60) -> list[int]:
    """Tokens per pair, log-normal: median `median`, 90th percentile `p90` (z = 1.2816), in [floor, cap]."""
    sigma = math.log(p90 / median) / 1.2816
    return [min(cap, max(floor, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def real_shaped_pairs(rng: random.Random, n: int, first_word: int, vocab: int) -> list[dict]:
    """TRL's conversational preference records: prompt messages (1-7 user turns, a system turn in half),
    one assistant message each for chosen and rejected. A pair's length (prompt + the mean of its
    replies, ChatML markup included: 3 tokens a message, 2 for the reply's header) follows
    `real_shaped_lengths`; replies take 15-40 % of it each."""

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(first_word, vocab)}" for _ in range(max(1, k)))

    records = []
    for total in real_shaped_lengths(rng, n):
        chosen, rejected = (max(4, round(total * rng.uniform(0.15, 0.4))) for _ in range(2))
        turns, system = rng.randint(1, 7), rng.random() < 0.5
        roles = (["system"] if system else []) + ["user", "assistant"] * (turns - 1) + ["user"]
        budget = max(len(roles) * 4, total - (chosen + rejected) // 2 - 2 - 3 * len(roles))
        weights = [rng.random() + 0.2 for _ in roles]
        sizes = [max(1, round(budget * w / sum(weights))) for w in weights]
        records.append({
            "prompt": [{"role": role, "content": words(k)} for role, k in zip(roles, sizes)],
            "chosen": [{"role": "assistant", "content": words(chosen - 1)}],
            "rejected": [{"role": "assistant", "content": words(rejected - 1)}],
        })
    return records


def pair_token_stats(tokenizer, records: list[dict], cutoff: int, trained: int | None = None) -> dict:
    """Token counts of the pairs: `pair_tokens` = prompt+chosen + prompt+rejected with each sequence cut
    at `cutoff` (what an unshared, unpadded layout computes), over all pairs and over the first
    `trained` (the pairs the runs train on; the tokens/s of every run count these), and percentiles
    of the pair length (prompt + longer reply) before truncation."""
    cut, lengths = [], []
    for r in records:
        sides = [len(tokenizer(tokenizer.apply_chat_template(r["prompt"] + r[side], tokenize=False))["input_ids"])
                 for side in ("chosen", "rejected")]
        cut.append(sum(min(cutoff, n) for n in sides))
        lengths.append(max(sides))
    lengths.sort()
    used = cut[:trained] if trained else cut
    return {"mean_pair_tokens": sum(cut) / len(cut), "trained_pair_tokens": sum(used) / len(used),
            "trained_pairs": len(used), "p50_pair": lengths[len(lengths) // 2],
            "p90_pair": lengths[int(0.9 * len(lengths))], "max_pair": lengths[-1],
            "truncated_share": sum(n > cutoff for n in lengths) / len(lengths)}


# -- one run, in a child process -----------------------------------------------------------------
def _clock_callback():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin = self.end = None
            self.cpu_begin = self.cpu_end = None  # process CPU time (all threads): what a loaded machine does not inflate
            self.step_ends: list[float] = []
            self.losses: list[float] = []
            self.throughput: list[dict] = []  # prefalign's throughput/* logs

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin, self.cpu_begin = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
            if logs and "throughput/mfu" in logs:
                self.throughput.append({k: v for k, v in logs.items() if k.startswith("throughput/")})

        def on_train_end(self, args, state, control, **kwargs):
            self.end, self.cpu_end = time.perf_counter(), time.process_time()

    return Clock()


def _train_settings(spec: dict) -> dict:
    return dict(
        per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=spec["grad_accum"],
        max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="linear", warmup_steps=0,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
        # the same pairs in the same order for every trainer: on long-tailed lengths two random
        # orders give the runs different work (the real-shaped steps vary 4-46 s with the pairs drawn)
        train_sampling_strategy="sequential",
    )


def _prefalign_config(spec: dict, out_dir: str):
    from prefalign.config import build_config

    return build_config({
        "model_name_or_path": spec["model"], "stage": "dpo", "finetuning_type": spec["mode"],
        "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target": "q_proj,k_proj,v_proj,o_proj",
        "dataset": spec["data"], "template": spec["template"], "cutoff_len": spec["cutoff_len"],
        "pref_beta": spec["beta"], "pref_loss": "sigmoid", "output_dir": out_dir, "overwrite_output_dir": True,
        "precompute_ref_log_probs": bool(spec.get("precompute")), "prefix_sharing": bool(spec.get("prefix_sharing")),
        "packing": bool(spec.get("packing")),
        "gradient_checkpointing": bool(spec.get("gradient_checkpointing")),
        **_train_settings(spec),
    })


def run_prefalign(spec: dict, out_dir: str, clock) -> None:
    from prefalign.train.workflow import build_trainer

    trainer = build_trainer(_prefalign_config(spec, out_dir))
    trainer.add_callback(clock)
    trainer.train()


def eval_check(spec: dict, out_dir: str) -> dict:
    """`prefalign eval`'s scoring against the training forward (the loss, autograd recording, no
    backward) of the same layout, on the same pairs: pairs/s of each, best of 2 rounds after a
    warm-up round (the first calls of each path pay one-time costs)."""
    from torch.utils.data import DataLoader

    from prefalign.scoring import Scorer
    from prefalign.train.workflow import build_trainer

    config = _prefalign_config(spec, out_dir)
    trainer = build_trainer(config)
    pairs = trainer.train_dataset.select(range(spec["batch_size"] * spec["grad_accum"] * spec["steps"]))
    scorer = Scorer(trainer.model, trainer.reference, config.objective, config.finetuning.logits_chunk_size)
    best = {"train_forward": float("inf"), "eval": float("inf")}
    for round_ in range(3):
        start = time.perf_counter()
        for batch in DataLoader(pairs, batch_size=spec["batch_size"], collate_fn=trainer.data_collator):
            trainer.batch_loss(trainer.model, trainer._prepare_inputs(batch))
        train_forward = time.perf_counter() - start
        start = time.perf_counter()
        scorer.score(pairs, trainer.data_collator, batch_size=spec["batch_size"], device=trainer.args.device,
                     split="train")
        if round_:
            best["train_forward"] = min(best["train_forward"], train_forward)
            best["eval"] = min(best["eval"], time.perf_counter() - start)
    import torch

    return {**{f"{k}_pairs_per_s": len(pairs) / v for k, v in best.items()}, "threads": torch.get_num_threads()}


def run_trl(spec: dict, out_dir: str, clock) -> None:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    pairs = json.loads(Path(spec["data"]).read_text())
    train = datasets.Dataset.from_list(pairs)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    config = DPOConfig(
        output_dir=out_dir, beta=spec["beta"], loss_type=["sigmoid"], max_length=spec["trl_max_length"], bf16=False, fp16=False,
        gradient_checkpointing=bool(spec.get("trl_gradient_checkpointing")), precompute_ref_log_probs=False,
        **_train_settings(spec),
    )
    peft_config = None
    if spec["mode"] == "lora":
        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = DPOTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock])
    trainer.train()


def child_main(spec: dict) -> None:
    import resource

    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    os.environ["PREFALIGN_CACHE"] = spec["cache_dir"]  # fresh caches: end-to-end includes all preparation
    clock = _clock_callback()
    if spec["impl"] == "prefalign-eval":
        with tempfile.TemporaryDirectory() as out_dir:
            print("RESULT " + json.dumps(eval_check(spec, out_dir)), flush=True)
        return
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        if spec.get("profile"):
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], record_shapes=bool(spec.get("profile_shapes"))) as prof:
                (run_trl if spec["impl"] == "trl" else run_prefalign)(spec, out_dir, clock)
            table = prof.key_averages(group_by_input_shape=bool(spec.get("profile_shapes"))).table(
                sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60, max_shapes_column_width=80)
            print("PROFILE " + json.dumps(table), flush=True)
        else:
            (run_trl if spec["impl"] == "trl" else run_prefalign)(spec, out_dir, clock)
        end = time.perf_counter()
    pairs = spec["steps"] * spec["batch_size"] * spec["grad_accum"]
    per_step = spec["batch_size"] * spec["grad_accum"]
    steady = None
    if len(clock.step_ends) > 2:  # steps 2.. (the first step pays one-time warm-up)
        steady = per_step * (len(clock.step_ends) - 1) / (clock.step_ends[-1] - clock.step_ends[0])
    result = {
        "loop_pairs_per_s": pairs / (clock.end - clock.begin),
        "steady_pairs_per_s": steady,
        "e2e_pairs_per_s": pairs / (end - start),
        "loop_s": clock.end - clock.begin,
        "setup_s": clock.begin - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "losses": clock.losses,
        "step_s": [round(b - a, 3) for a, b in zip([clock.begin] + clock.step_ends, clock.step_ends)],
        "threads": torch.get_num_threads(),
    }
    later = clock.throughput[1:] or clock.throughput  # the first step pays one-time warm-up
    for key in ("padding_fraction", "mfu", "tokens_per_second"):
        values = [t[f"throughput/{key}"] for t in later]
        result[key] = sum(values) / len(values) if values else None
    print("RESULT " + json.dumps(result), flush=True)


# -- the parent: build, run each in a subprocess, report -------------------------------------------
def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("PROFILE "):
            print(f"--- profile of {spec['name']} ---\n" + json.loads(line[len("PROFILE "):]), flush=True)
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    raise RuntimeError(f"run {spec['name']} failed (exit {proc.returncode}):\n{tail}")


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def report(args, results: dict[str, dict], stats: dict | None = None) -> str:
    import transformers

    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    lines = [
        (f"workload: {args.pairs} pairs, "
         + (f"real-shaped {args.real_shaped}, cutoff_len {args.cutoff_len}" if args.real_shaped
            else f"prompt {args.prompt_len}, responses {args.response_len}") + f", vocab {args.vocab}, "
         f"{args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, heads {args.heads}; "
         f"batch {args.batch_size} x accumulation {args.grad_accum}, {args.steps} steps "
         f"({args.steps * args.batch_size * args.grad_accum} pairs), lr {args.lr}, sigmoid loss, beta {args.beta}, fp32"),
        (f"machine: {machine()}; transformers {transformers.__version__}, trl {trl_version}; "
         f"torch threads in the runs: {sorted({r['threads'] for r in results.values()})}"),
        "",
        "| run | loop pairs/s | steady pairs/s | end-to-end pairs/s | setup s | peak RSS MiB | loss step 1 / last |"
        " pair tokens/s | padding | MFU |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    if stats:
        lines.insert(0, (f"real-shaped data ({args.real_shaped}): pair length (prompt + longer reply) p50 "
                         f"{stats['p50_pair']}, p90 {stats['p90_pair']}, max {stats['max_pair']}; "
                         f"{stats['truncated_share']:.0%} of pairs cut at cutoff_len {args.cutoff_len}; "
                         f"{stats['mean_pair_tokens']:.0f} tokens per pair after the cut (both sequences); "
                         f"the {stats['trained_pairs']} pairs trained on (the first, in file order): "
                         f"{stats['trained_pair_tokens']:.0f} per pair, what the pair tokens/s column counts"))

    def fmt(value, pattern):
        return pattern.format(value) if value is not None else "-"

    results = dict(results)
    evals = {name: results.pop(name) for name in list(results) if RUNS[name]["impl"] == "prefalign-eval"}
    for name, r in results.items():
        losses = r["losses"]
        loss = f"{losses[0]:.4f} / {losses[-1]:.4f}" if losses else "-"
        steady = f"{r['steady_pairs_per_s']:.2f}" if r["steady_pairs_per_s"] else "-"
        tokens = fmt(r["loop_pairs_per_s"] * stats["trained_pair_tokens"] if stats else None, "{:.0f}")
        lines.append(f"| {name} | {r['loop_pairs_per_s']:.2f} | {steady} | {r['e2e_pairs_per_s']:.2f} | "
                     f"{r['setup_s']:.1f} | {r['peak_rss_mib']:.0f} | {loss} | {tokens} | "
                     f"{fmt(r.get('padding_fraction'), '{:.1%}')} | {fmt(r.get('mfu'), '{:.1%}')} |")
    ratios = []
    for mode in ("lora", "full"):
        base = results.get(f"trl-{mode}")
        if not base:
            continue
        for name, r in results.items():
            if name.startswith(f"pa-{mode}"):
                ratios.append(f"| {name} / trl-{mode} | {r['loop_pairs_per_s'] / base['loop_pairs_per_s']:.2f}x | "
                              f"{r['e2e_pairs_per_s'] / base['e2e_pairs_per_s']:.2f}x |")
    for mode in ("lora", "full"):
        for on_name, off_name in (("prefix", "plain"), ("packed", "plain"), ("packed-prefix", "prefix"),
                                  ("packed-prefix", "plain")):
            on, off = results.get(f"pa-{mode}-{on_name}"), results.get(f"pa-{mode}-{off_name}")
            if on and off:
                ratios.append(f"| pa-{mode}-{on_name} / pa-{mode}-{off_name} | "
                              f"{on['loop_pairs_per_s'] / off['loop_pairs_per_s']:.2f}x | "
                              f"{on['e2e_pairs_per_s'] / off['e2e_pairs_per_s']:.2f}x |")
    if ratios:
        lines += ["", "| ratio | loop | end-to-end |", "|---|---:|---:|", *ratios]
    if evals:
        lines += ["", "| layout | training forward pairs/s | `prefalign eval` pairs/s |", "|---|---:|---:|"]
        lines += [f"| {name} | {r['train_forward_pairs_per_s']:.2f} | {r['eval_pairs_per_s']:.2f} |"
                  for name, r in evals.items()]
    for mode in ("lora", "full"):  # same model, data order and loss: the first logged losses must agree
        firsts = {n: r["losses"][0] for n, r in results.items() if r["losses"] and f"-{mode}" in n}
        if len(firsts) > 1:
            spread = max(firsts.values()) - min(firsts.values())
            lines.append(f"\nstep-1 loss spread across {mode} runs: {spread:.2e} (ln 2 = {math.log(2):.6f})")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"building the workload in {workdir} ...", flush=True)
        paths = build_workload(args, workdir)
        common = {
            "model": paths["model"], "data": paths["data"], "batch_size": args.batch_size, "grad_accum": args.grad_accum, "steps": args.steps,
            "lr": args.lr, "beta": args.beta, "threads": args.threads, "profile": args.profile,
            "profile_shapes": bool(os.environ.get("BENCH_PROFILE_SHAPES")),
            "cutoff_len": args.cutoff_len or args.prompt_len + args.response_len + 8,
            "trl_max_length": args.cutoff_len, "template": None if args.real_shaped else "empty",
            "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
        }
        results = {}
        for name in args.runs.split(","):
            spec = {**common, **RUNS[name], "name": name, "cache_dir": str(workdir / f"cache-{name}")}
            t0 = time.perf_counter()
            results[name] = run_child(spec)
            r = results[name]
            if args.json_out:  # after every run: a later failure loses nothing measured
                Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
            if "eval_pairs_per_s" in r:
                print(f"{name}: {r}", flush=True)
                continue
            print(f"{name}: loop {r['loop_pairs_per_s']:.2f} pairs/s, end-to-end {r['e2e_pairs_per_s']:.2f} pairs/s, "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB ({time.perf_counter() - t0:.0f} s); "
                  f"seconds per step: {r['step_s']}", flush=True)
        text = report(args, results, paths.get("stats"))
        print("\n" + text)
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
