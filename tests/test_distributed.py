"""Several processes (torchrun, gloo on the CPU): DDP, DeepSpeed ZeRO-2 and ZeRO-3 equal one process.

Every multi-process run here has a one-process twin with the same global batch (2 processes x 2
pairs == 1 process x 4 pairs; the distributed sampler hands ranks consecutive slices of the same
seeded order). Plain SGD keeps updates linear in the gradients, so the only difference is the fp32
summation order of the gradient all-reduce: losses and weights agree to 1e-5 (absolute), while a
training step moves them by more than 100x that. Launches are few (each costs ~15 s of start-up
here): one launch runs several configs in turn (multiproc_runner.py).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import EXAMPLES, config_for

from prefalign.train.workflow import run_train

pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent
TOL = 1e-5
# The runs: SGD, 3 steps of a global batch of 4 pairs, the train pairs in the report (no eval split).
COMMON = dict(max_steps=3, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", warmup_steps=0,
              logging_steps=1, max_samples=16)
Z2, Z3 = str(EXAMPLES / "deepspeed" / "ds_z2_config.json"), str(EXAMPLES / "deepspeed" / "ds_z3_config.json")
ADDED = "capital"  # add_tokens: a word of the demo pairs ("The capital of Colombia"), a new token of its own
SPECIAL = "<|tool|>"  # add_special_tokens: a token the pairs never use


def _argv(command, model_dir, out, **overrides):
    values = {"model_name_or_path": str(model_dir), "dataset": "demo_train", "dataset_dir": str(EXAMPLES / "data"),
              "cutoff_len": 96, "output_dir": str(out), "per_device_train_batch_size": 2, "save_strategy": "no",
              "overwrite_output_dir": True, "seed": 0, "disable_tqdm": True, "report_to": "none",
              **COMMON, **overrides}
    return [command, "-", *[f"{k}={v}" for k, v in values.items()]]


def _launch(runs: list[list[str]], tmp_path) -> subprocess.CompletedProcess:
    """`runs` in 2 processes of one torchrun launch; the config file argument `-` is an empty YAML."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    runs = [[str(empty) if a == "-" else a for a in argv] for argv in runs]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(TESTS / "multiproc_runner.py"), json.dumps(runs)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def _losses(out):
    state = json.loads((Path(out) / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def _reference_logps(out):
    """The reference log-probs of the report's pairs, computed by the run's reference after training."""
    pairs = json.loads((Path(out) / "report_samples.json").read_text())["pairs"]
    return [(p["index"], p["reference_chosen_logps"], p["reference_rejected_logps"]) for p in pairs]


def _weights(out):
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(Path(out) / "adapter_model.safetensors")


def _single(model_dir, out, **overrides):
    """The one-process twin: 4 pairs per step."""
    run_train(config_for(model_dir, out, **{**COMMON, "per_device_train_batch_size": 4, **overrides}))
    return out


def _assert_same_run(multi, single, *, full):
    assert _losses(multi) == pytest.approx(_losses(single), abs=TOL)
    assert len(_losses(multi)) == 3
    # the reference never changed: after training it gives the initial model's log-probs, as in one process
    for (i, c, r), (j, c1, r1) in zip(_reference_logps(multi), _reference_logps(single)):
        assert i == j and c == pytest.approx(c1, abs=1e-4) and r == pytest.approx(r1, abs=1e-4)
    # the saved model (ZeRO-3: consolidated) loads with from_pretrained and equals the twin's; an adapter likewise
    a, b = (_weights(multi), _weights(single)) if full else (_adapter(multi), _adapter(single))
    if not full:  # with modules_to_save (a resized vocabulary) peft's one-process save adds the base's untrained
        # rows (`original_module`), which the base model holds anyway; ZeRO-3's consolidated save leaves them out,
        # and both adapters export to the same weights (to 1.5e-7, measured)
        b = {k: v for k, v in b.items() if ".original_module." not in k or k in a}
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=TOL), name


def test_ddp_one_writer_equals_one_process(tiny_model_dir, tmp_path):
    """`prefalign train --nproc 2`: one process's losses and weights; one summary, report and model card."""
    out = tmp_path / "ddp"
    (tmp_path / "empty.yaml").write_text("{}\n")
    argv = _argv("train", tiny_model_dir, out, finetuning_type="full", val_size=4, plot_loss=True)
    argv[1] = str(tmp_path / "empty.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFALIGN_CACHE": str(tmp_path / "cache")}  # nothing cached
    train = subprocess.run([sys.executable, "-m", "prefalign", *argv, "--nproc", "2"], capture_output=True,
                           text=True, env=env, timeout=900)
    assert train.returncode == 0, train.stderr[-4000:]
    # the data was encoded once, by the main process (12 train + 4 held-out pairs); the other read its cache
    assert re.findall(r"Encoding pairs: 100%\|[^|]*\| (\d+)/", train.stderr) == ["12", "4"]
    assert train.stdout.count("The aligned model and its results are in") == 1
    assert train.stdout.count("demo_train: 16 pairs") == 1  # the data summary, printed once
    for name in ("report.html", "README.md", "data_summary.json", "run_config.yaml", "training_loss.png"):
        assert (out / name).is_file(), name
    _assert_same_run(out, _single(tiny_model_dir, tmp_path / "one", finetuning_type="full", val_size=4), full=True)


@pytest.mark.extended  # a 2-process launch and a 1-process run
def test_bf16_without_a_gpu_trains_alike_in_one_process_and_in_two(tiny_model_dir, tmp_path):
    """`bf16: true` on a machine without a GPU, no `use_cpu` written (transformers alone refuses that):
    one process and `--nproc 2` (DDP) both train under bf16 autocast, to the losses of the fp32 run
    within bf16 rounding (2e-3; each step moves the loss by more), and to each other's."""
    if torch.cuda.is_available():
        pytest.skip("the rule under test is for machines without a GPU")
    (tmp_path / "empty.yaml").write_text("{}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    losses = {}
    for name, nproc, batch in (("one", [], 4), ("two", ["--nproc", "2"], 2)):
        argv = _argv("train", tiny_model_dir, tmp_path / name, finetuning_type="full", bf16=True,
                     per_device_train_batch_size=batch)
        argv[1] = str(tmp_path / "empty.yaml")
        run = subprocess.run([sys.executable, "-m", "prefalign", *argv, *nproc], capture_output=True, text=True,
                             env=env, timeout=900)
        assert run.returncode == 0, run.stderr[-4000:]
        losses[name] = _losses(tmp_path / name)
    fp32 = _losses(_single(tiny_model_dir, tmp_path / "fp32", finetuning_type="full"))
    assert len(fp32) == 3 and abs(fp32[2] - fp32[0]) > 2e-2  # training moves the loss far beyond the tolerance
    assert losses["one"] == pytest.approx(fp32, abs=2e-3)
    assert losses["two"] == pytest.approx(losses["one"], abs=2e-3)
    assert losses["one"][1:] != fp32[1:]  # it did run in bf16: not the fp32 numbers


# One launch for the rest: a sharded eval, then FSDP2 and DeepSpeed runs (name -> overrides).
DEEPSPEED_RUNS = {
    "fsdp2-full": dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2}, finetuning_type="full"),  # FSDP first:
    # it runs on the plain CPU process state, which the DeepSpeed runs after it replace
    "z2-lora": dict(deepspeed=Z2),
    "z2-full": dict(deepspeed=Z2, finetuning_type="full"),
    "z3-full": dict(deepspeed=Z3, finetuning_type="full"),  # frozen-copy reference
    "z3-lora": dict(deepspeed=Z3),  # adapter-disabled
    "z3-sft": dict(deepspeed=Z3, adapter_name_or_path="{sft}"),  # sft-adapter
    "z3-separate": dict(deepspeed=Z3, finetuning_type="full", ref_model="{model}", ref_model_adapters="{sft}"),
    "z3-lora-precomputed": dict(deepspeed=Z3, precompute_ref_log_probs=True),  # 8 pairs per rank
    "z3-full-vocab": dict(deepspeed=Z3, finetuning_type="full", add_tokens=ADDED),  # ZeRO-3 resizes the embeddings
    "z3-lora-vocab": dict(deepspeed=Z3, add_tokens=ADDED, add_special_tokens=SPECIAL),  # + the LoRA init after it
}
# Launched with them, checked apart: bf16 ZeRO-3 (16-bit weights in the engine, so not equal to 1e-5)
BF16_RUN = {"z3-full-bf16": dict(deepspeed=Z3, finetuning_type="full", bf16=True)}
# The one-process twin of each (the precomputed reference equals the live one).
TWINS = {"fsdp2-full": "full", "z2-lora": "lora", "z2-full": "full", "z3-full": "full", "z3-lora": "lora", "z3-sft": "sft",
         "z3-separate": "separate", "z3-lora-precomputed": "lora", "z3-full-vocab": "vocab",
         "z3-lora-vocab": "lora-vocab"}


@pytest.fixture(scope="module")
def launched(tiny_model_dir, tmp_path_factory):
    """The eval and DeepSpeed runs in 2 processes; their output dirs by name."""
    from helpers import make_random_adapter

    pytest.importorskip("deepspeed", reason='needs DeepSpeed: pip install "prefalign[deepspeed]" (the test extra has it)')

    root = tmp_path_factory.mktemp("multi")
    sft = make_random_adapter(tiny_model_dir, root / "sft-adapter", seed=3, b_std=0.05)
    fill = {"{sft}": sft, "{model}": str(tiny_model_dir)}
    # eval with the training config's ZeRO-3 key: it still scores whole models, data-parallel
    runs = [_argv("eval", tiny_model_dir, root / "eval", adapter_name_or_path=sft, per_device_eval_batch_size=3,
                  deepspeed=Z3)]
    for name, overrides in {**DEEPSPEED_RUNS, **BF16_RUN}.items():
        runs.append(_argv("train", tiny_model_dir, root / name, **{k: fill.get(v, v) if isinstance(v, str) else v
                                                                 for k, v in overrides.items()}))
    proc = _launch(runs, root)
    return {"root": root, "sft": sft, "stdout": proc.stdout}


@pytest.fixture(scope="module")
def twins(tiny_model_dir, launched, tmp_path_factory):
    """The one-process runs, 4 pairs per step."""
    root, sft = tmp_path_factory.mktemp("twins"), launched["sft"]
    settings = {"lora": {}, "full": dict(finetuning_type="full"), "sft": dict(adapter_name_or_path=sft),
                "separate": dict(finetuning_type="full", ref_model=str(tiny_model_dir), ref_model_adapters=sft),
                "vocab": dict(finetuning_type="full", add_tokens=ADDED),
                "lora-vocab": dict(add_tokens=ADDED, add_special_tokens=SPECIAL)}
    return {name: _single(tiny_model_dir, root / name, **overrides) for name, overrides in settings.items()}


def test_eval_scores_a_shard_per_process_and_writes_every_pair_once(tiny_model_dir, launched, tmp_path):
    from prefalign.config import build_config, parse_overrides
    from prefalign.evaluate import run_eval

    assert launched["stdout"].count("Per-pair scores:") == 1
    rows = [json.loads(line) for line in (launched["root"] / "eval" / "eval_pairs.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(16))  # 8 pairs per process, batches of 3; in file order
    overrides = _argv("eval", tiny_model_dir, tmp_path / "one", adapter_name_or_path=launched["sft"],
                      per_device_eval_batch_size=3)[2:]
    metrics = run_eval(build_config(parse_overrides(overrides)))
    single = [json.loads(line) for line in (tmp_path / "one" / "eval_pairs.jsonl").read_text().splitlines()]
    for a, b in zip(rows, single, strict=True):
        for key in ("policy_chosen_logps", "reference_rejected_logps", "margin", "loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    assert any(abs(r["margin"]) > 1e-3 for r in rows)  # policy != reference: the comparison means something
    results = json.loads((launched["root"] / "eval" / "eval_results.json").read_text())
    assert results["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-5)


@pytest.mark.parametrize("name", list(DEEPSPEED_RUNS))
def test_deepspeed_run_equals_one_process(name, launched, twins):
    """FSDP2; ZeRO-2 / ZeRO-3, LoRA and full, every reference strategy, precomputed or not: one process's run."""
    _assert_same_run(launched["root"] / name, twins[TWINS[name]], full=DEEPSPEED_RUNS[name].get("finetuning_type") == "full")


def test_zero3_adds_the_token_and_saves_the_resized_embeddings(tiny_model_dir, launched):
    """add_tokens under ZeRO-3 (resize_vocab turned on by it, as in LF): the runs above train what one process
    trains (test_deepspeed_run_equals_one_process[z3-full-vocab, z3-lora-vocab]: with LoRA the resize must not
    move the global generator the adapter's initial A is drawn from after it); the saved tokenizer has the
    token, after the tiny tokenizer's 1634, and the saved embedding (tied to the head) has 1635 rounded up to
    64 = 1664 rows."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    out = launched["root"] / "z3-full-vocab"
    base, saved = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(out)
    assert len(base) == 1634 and ADDED not in base.get_vocab()
    assert len(saved) == 1635 and saved.convert_tokens_to_ids(ADDED) == 1634
    assert ADDED in saved.tokenize("The capital of Colombia")  # the demo pairs use it: its row is trained
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert fh.get_slice("model.embed_tokens.weight").get_shape() == [1664, 32]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 1664
    # LoRA: the special token too (1636 tokens, still 1664 rows), the embedding saved in full beside the adapter
    out = launched["root"] / "z3-lora-vocab"
    saved = AutoTokenizer.from_pretrained(out)
    assert len(saved) == 1636 and saved.convert_tokens_to_ids([ADDED, SPECIAL]) == [1634, 1635]
    assert saved.added_tokens_decoder[1635].special and not saved.added_tokens_decoder[1634].special
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as fh:
        assert fh.get_slice("base_model.model.model.embed_tokens.modules_to_save.weight").get_shape() == [1664, 32]


def test_bf16_zero3_on_the_cpu_trains_what_fp32_one_process_trains(tiny_model_dir, launched, twins):
    """`bf16: true` with ZeRO-3 on a machine without a GPU (transformers alone refuses it there): DeepSpeed
    trains in bf16 with fp32 master weights, to the fp32 twin's losses and weights within bf16 rounding."""
    out, single = launched["root"] / "z3-full-bf16", twins["full"]
    assert _losses(out) == pytest.approx(_losses(single), abs=2e-3) and len(_losses(out)) == 3
    trained, twin = _weights(out), _weights(single)
    initial = _weights(tiny_model_dir)
    moved = max((twin[n] - initial[n]).abs().max().item() for n in twin)
    assert moved > 0.05  # the steps move weights far more than the tolerance below
    for name in twin:
        assert torch.allclose(trained[name].float(), twin[name], atol=1e-2), name


# stage: kto in 2 processes: the KL estimate z_ref is averaged across processes before its clamp (as TRL
# does), so 2 x 2 examples give the 4-example batch's z_ref, losses and per-label metrics (sums and counts).
KTO_RUNS = {"kto-ddp-lora": {}, "kto-z2-full": dict(deepspeed=Z2, finetuning_type="full"),
            "kto-z3-lora": dict(deepspeed=Z3)}
KTO = dict(stage="kto", pref_beta=1.0)  # β 1: KTO's gradients are β-scaled; the steps move the loss by > 1e-3
KTO_METRICS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl", "count/chosen",
               "count/rejected")


def _logged(out):
    return [h for h in json.loads((Path(out) / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_kto_in_two_processes_equals_one_process(tiny_model_dir, tmp_path):
    """DDP, ZeRO-2 and ZeRO-3 KTO runs (16 demo pairs split into 32 examples): each step's loss, z_ref and
    per-label means and counts equal the one-process twin's with the same global batch of 4 examples."""
    pytest.importorskip("deepspeed", reason='needs DeepSpeed: pip install "prefalign[deepspeed]" (the test extra has it)')
    _launch([_argv("train", tiny_model_dir, tmp_path / name, **KTO, **overrides)
             for name, overrides in KTO_RUNS.items()], tmp_path)
    twins = {mode: _single(tiny_model_dir, tmp_path / f"one-{mode}", **KTO, **extra)
             for mode, extra in (("lora", {}), ("full", dict(finetuning_type="full")))}
    for name, overrides in KTO_RUNS.items():
        multi, single = _logged(tmp_path / name), _logged(twins[overrides.get("finetuning_type", "lora")])
        assert len(multi) == len(single) == 3, name
        assert abs(single[2]["loss"] - single[0]["loss"]) > 100 * TOL  # the steps move the loss beyond the tolerance
        assert any(step["kl"] > 0 for step in single)  # z_ref is estimated, not clamped to 0 throughout
        assert sum(step["count/chosen"] + step["count/rejected"] for step in single) == 12  # 3 steps x 4 examples
        for a, b in zip(multi, single):
            assert a["loss"] == pytest.approx(b["loss"], abs=TOL), name
            for key in KTO_METRICS:
                assert (key in a) == (key in b), (name, key)
                if key in b:
                    # log-probs near -100 carry fp32 rounding of ~1e-5 from the all-reduced weights
                    assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-4), (name, key)


@pytest.mark.extended  # a 2-process launch and a 1-process run
def test_a_streamed_packed_ddp_run_equals_one_plain_process(tiny_model_dir, tmp_path):
    """Streamed pairs in 2 processes: each collates its own slice of the stream (no dispatch from rank 0),
    in the default packed and prefix-shared layout, and trains the one-process plain layout's losses and
    weights (measured: 0.693147, 0.595407, 0.493720 both, to 2e-7)."""
    from helpers import PLAIN

    stream = dict(streaming=True, buffer_size=1, finetuning_type="full")
    proc = _launch([_argv("train", tiny_model_dir, tmp_path / "multi", **stream)], tmp_path)
    assert "Batch layout: packing + prefix sharing" in proc.stdout + proc.stderr
    _assert_same_run(tmp_path / "multi", _single(tiny_model_dir, tmp_path / "single", **stream, **PLAIN), full=True)


def test_full_shape_reads_a_zero3_partitioned_parameter_whole():
    """DeepSpeed ZeRO-3 leaves each process an empty (0,) slice of a weight: Linear(4, 6)'s weight is
    6 x 4 = 24 numbers as a whole, as the vocabulary check and the parameter count need it."""
    script = """if True:
        import os, torch
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29541", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        import deepspeed
        from prefalign.distributed import full_shape, partitioned
        deepspeed.init_distributed(dist_backend="gloo")
        with deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3}, "train_batch_size": 1}):
            weight = torch.nn.Linear(4, 6).weight
        plain = torch.nn.Linear(4, 6).weight
        print(tuple(weight.shape), tuple(full_shape(weight)), full_shape(weight).numel(), partitioned(weight),
              tuple(full_shape(plain)), partitioned(plain))
    """
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(TESTS.parent / "src")})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[-2] == "(0,) (6, 4) 24 True (6, 4) False"
