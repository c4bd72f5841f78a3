"""Faults as a user meets them, black-box: the command line, real signals, real files cut short.

Each test reproduces one failure mode of a long run (a rerun with new settings, a checkpoint cut
short, preemption, divergence, a second run into the same output_dir) and checks that the result
is either right or a one-line error, never a silent wrong result. Signals and concurrent runs
use real subprocesses; the rest calls the CLI's `main(argv)` in-process (a subprocess costs ~10 s
of imports), reading its exit status and what it prints.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT

from prefalign.config import load_config
from prefalign.train.checkpoints import MARKER
from prefalign.train.lock import LOCK_NAME
from prefalign.train.workflow import run_train

QUICKSTART = "examples/quickstart.yaml"


def overrides(model_dir, out, **extra):
    """The quickstart on the session's tiny model: 16 pairs, batch 4 (4 steps an epoch), no final evaluation."""
    values = {"model_name_or_path": model_dir, "build_demo_model": "false", "output_dir": out, "max_samples": 16,
              "cutoff_len": 96, "per_device_train_batch_size": 4, "eval_dataset": "", "plot_loss": "false",
              "logging_steps": 1, "disable_tqdm": "true", "overwrite_output_dir": "false", "max_steps": 6,
              "warmup_ratio": 0, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


class Run:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys, caplog, monkeypatch):
    """`prefalign ARGS` in this process: exit status, stdout, and stderr with the log lines it shows."""
    import logging

    from prefalign.cli import main

    monkeypatch.chdir(ROOT)

    def run(*args):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            code = main([str(a) for a in args])
        captured = capsys.readouterr()
        logged = "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records)
        return Run(code, captured.out, captured.err + "\n" + logged)

    return run


def start(*args, stderr_path):
    """A CLI run in the background; its stdout is read line by line by `wait_for_step`."""
    return subprocess.Popen([sys.executable, "-m", "prefalign", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=open(stderr_path, "w"), text=True, env=env())


def wait_for_step(proc, step: int) -> None:
    """Block until the run has logged optimizer step `step` (the Trainer prints each log dict)."""
    seen = 0
    for line in proc.stdout:
        if "'loss'" in line:
            seen += 1
            if seen >= step:
                return
    raise AssertionError(f"the run ended before step {step} (exit {proc.wait()})")


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("prefalign train:")]


def losses(out) -> dict[int, float]:
    state = json.loads((Path(out) / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def snapshot(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def weights(out) -> dict[str, torch.Tensor]:
    out = Path(out)
    return load_file(out / ("adapter_model.safetensors" if (out / "adapter_model.safetensors").is_file()
                            else "model.safetensors"))


# -- 1. a rerun with other settings, a rerun with the same ones ------------------------------------------------
@pytest.mark.slow
def test_rerun_with_new_settings_is_refused_and_the_same_rerun_changes_nothing(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = overrides(tiny_model_dir, out, max_steps=4, save_strategy="steps", save_steps=2)
    run_train(load_config(ROOT / QUICKSTART, args))
    before = snapshot(out)

    changed = cli("train", QUICKSTART, *args, "pref_loss=ipo", "pref_beta=0.5", "learning_rate=5e-5",
                  "model_max_length=4096")  # the length rope_scaling's factor comes from
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    [line] = error_lines(changed.stderr)
    assert "finished run with other settings" in line and "overwrite_output_dir: true" in line
    for key in ("pref_loss (['sigmoid'] -> ['ipo'])", "pref_beta (0.1 -> 0.5)", "learning_rate (0.001 -> 5e-05)",
                "model_max_length (96 -> 4096)"):  # unset, it is cutoff_len (LF's rule)
        assert key in line
    assert snapshot(out) == before  # run_config.yaml, the model card, everything: untouched

    same = cli("train", QUICKSTART, *args)
    assert same.returncode == 0, same.stderr[-2000:]
    assert "already holds this run, finished at step 4 with the same settings; nothing to do" in same.stdout
    assert snapshot(out) == before


# -- 2. checkpoints cut short ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_checkpoint_cut_short_is_skipped_and_refused(cli, tiny_model_dir, tmp_path):
    """Checkpoints 2 and 4 exist, 4 was cut short (a kill while saving): auto-resume takes 2 and says so."""
    from helpers import StopAfter

    from prefalign.train.workflow import build_trainer

    args = overrides(tiny_model_dir, tmp_path / "whole", save_strategy="steps", save_steps=2)
    run_train(load_config(ROOT / QUICKSTART, args))
    out = tmp_path / "run"
    trainer = build_trainer(load_config(ROOT / QUICKSTART, overrides(tiny_model_dir, out, save_strategy="steps",
                                                                     save_steps=2)))
    trainer.add_callback(StopAfter(4))
    trainer.train()
    cut = out / "checkpoint-4" / "model.safetensors"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])

    explicit = cli("train", QUICKSTART, *overrides(tiny_model_dir, out, save_strategy="steps", save_steps=2),
                   f"resume_from_checkpoint={out / 'checkpoint-4'}")
    assert explicit.returncode == 2 and "Traceback" not in explicit.stderr
    [line] = error_lines(explicit.stderr)
    assert "checkpoint-4 is not a complete checkpoint (model.safetensors has" in line
    assert f"the newest complete one is {out / 'checkpoint-2'}" in line

    auto = cli("train", QUICKSTART, *overrides(tiny_model_dir, out, save_strategy="steps", save_steps=2))
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "Skipping incomplete checkpoints: checkpoint-4 (model.safetensors has" in auto.stderr
    assert f"Resuming from {out / 'checkpoint-2'}" in auto.stderr
    whole, resumed = losses(tmp_path / "whole"), losses(out)
    assert sorted(resumed) == list(range(1, 7))
    assert all(resumed[s] == pytest.approx(whole[s], abs=1e-6) for s in range(3, 7))
    for name, value in weights(tmp_path / "whole").items():
        assert torch.allclose(weights(out)[name], value, atol=1e-6), name

    # the final model cut short: the run is not taken for finished, it resumes from its last checkpoint
    final = out / "model.safetensors"
    final.write_bytes(final.read_bytes()[:100])
    again = cli("train", QUICKSTART, *overrides(tiny_model_dir, out, save_strategy="steps", save_steps=2))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Resuming from {out / 'checkpoint-6'}" in again.stderr
    assert all(torch.allclose(weights(out)[n], v, atol=1e-6) for n, v in weights(tmp_path / "whole").items())


# -- 3. preemption and Ctrl-C ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_sigterm_saves_a_checkpoint_and_the_resumed_run_equals_the_uninterrupted_one(cli, tiny_model_dir, tmp_path,
                                                                                    finetuning_type):
    """SIGTERM mid-epoch under save_strategy "no", with precompute_ref_log_probs and prefix_sharing on."""
    common = dict(finetuning_type=finetuning_type, precompute_ref_log_probs="true", prefix_sharing="true",
                  max_steps=10, save_strategy="no", pref_ftx=0.3)
    whole = tmp_path / "whole"
    whole_metrics = run_train(load_config(ROOT / QUICKSTART, overrides(tiny_model_dir, whole, **common)))

    out = tmp_path / "run"
    proc = start("train", QUICKSTART, *overrides(tiny_model_dir, out, **common), stderr_path=tmp_path / "err")
    wait_for_step(proc, 2)
    proc.send_signal(signal.SIGTERM)
    proc.stdout.read()
    assert proc.wait(timeout=300) == 143
    stderr = (tmp_path / "err").read_text()
    assert "Traceback" not in stderr
    [line] = error_lines(stderr)
    assert "interrupted by SIGTERM after step" in line and "resume with: prefalign train" in line
    step = int(line.split("after step ")[1].split(";")[0])
    assert 2 <= step < 10  # mid-epoch for steps 2, 3, 5, ... (4 steps an epoch)
    assert (out / f"checkpoint-{step}" / MARKER).is_file() and not (out / "model.safetensors").exists()

    command = shlex.split(line.split("resume with: ")[1])
    assert command[:3] == ["prefalign", "train", QUICKSTART]
    resumed = cli(*command[1:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(out) == pytest.approx(losses(whole), abs=1e-6) and sorted(losses(out)) == list(range(1, 11))
    for name, value in weights(whole).items():
        assert torch.allclose(weights(out)[name], value, atol=1e-6), name
    # whole-run train_loss and runtime, not the resumed part's
    results = json.loads((out / "train_results.json").read_text())
    assert results["train_loss"] == pytest.approx(whole_metrics["train_loss"], abs=1e-6)
    assert results["train_loss"] == pytest.approx(sum(losses(whole).values()) / 10, abs=1e-6)
    assert f"| train_loss | {results['train_loss']:.4g} |" in (out / "README.md").read_text()
    session = json.loads((out / f"checkpoint-{step}" / MARKER).read_text())["totals"]["runtime_s"]
    assert results["train_runtime"] > session > 0


QLORA_CHECKPOINTED = dict(finetuning_type="lora", quantization_bit=4, max_steps=6, save_strategy="steps",
                          save_steps=3, learning_rate=1e-2, gradient_accumulation_steps=4)  # ~0.5 s a step


def cli_subprocess(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefalign", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env(), timeout=300)


@pytest.fixture(scope="module")
def qlora_whole_run(llama64_model_dir, tmp_path_factory):
    """The uninterrupted QLoRA run, a subprocess like the interrupted ones (the same threads, the same kernels)."""
    pytest.importorskip("bitsandbytes", reason='QLoRA needs bitsandbytes: pip install "prefalign[qlora]"')
    out = tmp_path_factory.mktemp("qlora") / "whole"
    run = cli_subprocess("train", QUICKSTART, *overrides(llama64_model_dir, out, **QLORA_CHECKPOINTED))
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_qlora_interrupted_resumes_to_the_uninterrupted_adapter_bit_for_bit(llama64_model_dir, qlora_whole_run,
                                                                           tmp_path, signum):
    """QLoRA, SIGKILL once checkpoint-3 is complete (or SIGTERM after step 2: it saves where it stops, exit 143),
    the same command again: the losses and adapter of the uninterrupted run, bit for bit.

    On an AVX512-BF16 CPU bitsandbytes repacked the 4-bit weights at the reference's first forward and
    unpacked them at every checkpoint save, so the resumed run took other kernels (1.4e-3 apart)."""
    out = tmp_path / "run"
    args = overrides(llama64_model_dir, out, **QLORA_CHECKPOINTED)
    proc = start("train", QUICKSTART, *args, stderr_path=tmp_path / "err")
    try:
        wait_for_step(proc, 3 if signum == signal.SIGKILL else 2)
        while signum == signal.SIGKILL and not (out / "checkpoint-3" / MARKER).is_file() and proc.poll() is None:
            time.sleep(0.002)
        proc.send_signal(signum)
        proc.stdout.read()
        assert proc.wait(timeout=120) == (-signal.SIGKILL if signum == signal.SIGKILL else 143)
    finally:
        proc.kill()
    assert not (out / "checkpoint-6").exists() and not (out / "adapter_model.safetensors").exists()  # mid-run
    if signum == signal.SIGTERM:
        [line] = error_lines((tmp_path / "err").read_text())
        assert "interrupted by SIGTERM after step" in line
    resumed = cli_subprocess("train", QUICKSTART, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr
    assert losses(out) == losses(qlora_whole_run) and sorted(losses(out)) == list(range(1, 7))
    expected = weights(qlora_whole_run)
    assert expected.keys() == weights(out).keys()
    for name, value in expected.items():
        assert torch.equal(weights(out)[name], value), name


# -- 4. divergence ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_divergence_halts_at_the_step_and_saves_no_final_model(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run = cli("train", QUICKSTART, *overrides(tiny_model_dir, out, learning_rate=1e6, max_grad_norm=0,
                                              save_strategy="steps", save_steps=1, max_steps=8))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    [line] = error_lines(run.stderr)
    step = int(line.split("error: step ")[1].split(":")[0])
    assert "is nan" in line or "is inf" in line
    assert f"the last good checkpoint is {out / f'checkpoint-{step - 1}'}" in line
    assert not (out / "model.safetensors").exists() and not (out / MARKER).exists()
    assert not (out / f"checkpoint-{step}").exists()
    state = json.loads((out / f"checkpoint-{step - 1}" / "trainer_state.json").read_text())
    logged = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(logged) == step - 1 and all(0 < v < float("inf") for v in logged)  # never NaN, never 0
    assert all(torch.isfinite(t).all() for t in weights(out / f"checkpoint-{step - 1}").values())


@pytest.mark.slow
def test_the_divergence_error_is_the_last_line_after_the_progress_bars(tiny_model_dir, tmp_path):
    """With tqdm's bars on (a terminal's default), the error starts a line of its own and no bar is redrawn after it."""
    run = subprocess.run([sys.executable, "-m", "prefalign", "train", QUICKSTART,
                          *overrides(tiny_model_dir, tmp_path / "run", learning_rate=1e6, max_grad_norm=0,
                                     save_strategy="steps", save_steps=1, max_steps=8, disable_tqdm="false")],
                         cwd=ROOT, capture_output=True, text=True, env=env(), timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "it/s]" in run.stderr  # the training bar was drawn
    assert run.stderr.endswith("\n")
    last = run.stderr[:-1].split("\n")[-1]  # a bar draws with "\r"; only "\n" starts a line
    assert last.startswith("prefalign train: error: step ") and "the gradient norm is nan" in last, last[-300:]


@pytest.mark.slow
def test_a_run_that_does_not_learn_ends_with_a_warning(cli, tiny_model_dir, tmp_path):
    """lr 1e-30 cannot move fp32 weights: every pair's loss stays ln 2, exactly, as at step 0."""
    run = cli("train", QUICKSTART, *overrides(tiny_model_dir, tmp_path / "run", learning_rate=1e-30, pref_ftx=0,
                                              max_steps=10))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "This run did not learn: the loss stayed at its first value 0.693147 for all 10 steps" in run.stderr


# -- 5. one run per output_dir ------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_run_into_a_busy_output_dir_is_refused_and_a_stale_lock_taken_over(cli, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    first = start("train", QUICKSTART, *overrides(tiny_model_dir, out, max_steps=100000), stderr_path=tmp_path / "e1")
    try:
        wait_for_step(first, 1)
        second = cli("train", QUICKSTART, *overrides(tiny_model_dir, out, max_steps=2))
        assert second.returncode == 2 and "Traceback" not in second.stderr
        [line] = error_lines(second.stderr)
        assert f"{out} is in use by another run (process {first.pid} on " in line
        # a second signal stops at once, saving nothing: the lock file stays behind, its holder dead
        first.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        while "SIGINT received" not in (tmp_path / "e1").read_text() and time.monotonic() < deadline:
            time.sleep(0.001)
        first.send_signal(signal.SIGINT)
        first.stdout.read()
        assert first.wait(timeout=120) == 130
    finally:
        first.kill()
    assert "second signal (SIGINT): stopping now, without saving" in (tmp_path / "e1").read_text()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid

    third = cli("train", QUICKSTART, *overrides(tiny_model_dir, out, max_steps=1, overwrite_output_dir="true"))
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"taking over the stale lock {out / LOCK_NAME} of a run that ended without releasing it (process " \
           f"{first.pid} on " in third.stderr
    assert not (out / LOCK_NAME).exists()


# -- 6. config mistakes: one line each, before anything is loaded ---------------------------------------------
def test_config_mistakes_are_one_line_errors_before_loading(cli, tiny_model_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    run = cli("train", QUICKSTART, *overrides(tmp_path / "no-model", tmp_path / "file" / "out", learning_rate=0,
                                              per_device_train_batch_size=0, max_steps=-5))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "Encoding" not in run.stderr + run.stdout  # nothing was loaded
    problems = run.stderr
    assert "learning_rate: 0.0 trains nothing" in problems
    assert "per_device_train_batch_size: 0 must be at least 1" in problems
    assert "max_steps: -5 must be a positive number of steps" in problems
    assert f"model_name_or_path: no such directory {str(tmp_path / 'no-model')!r}" in problems
    assert f"output_dir: {str(tmp_path / 'file' / 'out')!r} is under {str(tmp_path / 'file')!r}, which is a file" \
        in problems

    negative = cli("train", QUICKSTART, *overrides(tiny_model_dir, tmp_path / "out", learning_rate=-1))
    assert negative.returncode == 2 and "learning_rate: -1.0 is negative" in negative.stderr


def test_a_typo_in_the_demo_model_path_builds_no_second_model(cli, tmp_path):
    demo = tmp_path / "models" / "prefalign-tiny-demo"
    demo.mkdir(parents=True)
    (demo / "config.json").write_text("{}")
    (demo / "prefalign_demo.json").write_text("{}")
    run = cli("train", QUICKSTART, f"model_name_or_path={tmp_path / 'models' / 'prefalign-tiny-dmo'}",
              f"output_dir={tmp_path / 'out'}")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"did you mean {str(demo)!r}?" in run.stderr and "second demo model" in run.stderr
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["prefalign-tiny-demo"]


def test_model_code_refused_without_trust_remote_code_is_one_line(cli, tiny_model_dir, tmp_path):
    import shutil

    model = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="custom_llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                       "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n")
    run = cli("train", QUICKSTART, *overrides(model, tmp_path / "out"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    [line] = error_lines(run.stderr)
    assert "ships its own model code, which runs only with trust_remote_code: true" in line


@pytest.mark.slow
def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tiny_model_dir, tmp_path):
    """Two gloo processes; SIGTERM reaches rank 1 only; both stop after the same step and one checkpoint is saved."""
    import re

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
         "-m", "prefalign", "train", QUICKSTART,
         *overrides(tiny_model_dir, out, max_steps=100000, per_device_train_batch_size=2)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=open(tmp_path / "err", "w"), text=True, env=env())
    try:
        wait_for_step(proc, 4)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        rank1 = next(int(p) for p in workers if b"RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes())
        os.kill(rank1, signal.SIGTERM)
        proc.stdout.read()
        assert proc.wait(timeout=300) != 0
    finally:
        proc.kill()
    stderr = (tmp_path / "err").read_text()
    assert stderr.count("prefalign: SIGTERM received") == 1  # rank 1 only
    # rank 0, told by rank 1 through the per-step all-reduce (torchrun may kill rank 1 before it prints)
    [step] = re.findall(r"prefalign train: interrupted by a signal to another process of this run after step (\d+)",
                        stderr)
    assert all(s == step for s in re.findall(r"interrupted by SIGTERM after step (\d+)", stderr))
    assert (out / f"checkpoint-{step}" / MARKER).is_file()
    assert "[rank1]: Traceback" not in stderr and "[rank0]: Traceback" not in stderr


@pytest.mark.slow
@pytest.mark.extended  # three 2-process ZeRO-3 launches
def test_sigterm_to_the_nproc_launcher_exits_143_with_one_resume_command_that_ends_on_the_whole_run(
        tiny_model_dir, tmp_path):
    """`prefalign train --nproc 2 deepspeed=<ZeRO-3>` and SIGTERM to that command (what `kill PID` or a scheduler
    sends): torchrun passes it to both processes, which checkpoint their shards; the launcher exits 143 with no
    traceback, one line says how to resume (with `--nproc 2`), and that command ends on the uninterrupted
    2-process run's weights. (Plain DDP under a launcher: the hand-started launcher test below.)"""
    pytest.importorskip("deepspeed", reason='needs DeepSpeed: pip install "prefalign[deepspeed]"')
    common = dict(max_steps=20, per_device_train_batch_size=2, save_strategy="no",
                  deepspeed=ROOT / "examples" / "deepspeed" / "ds_z3_config.json")
    whole = tmp_path / "whole"
    done = subprocess.run([sys.executable, "-m", "prefalign", "train", QUICKSTART,
                           *overrides(tiny_model_dir, whole, **common), "--nproc", "2"],
                          cwd=ROOT, capture_output=True, text=True, env=env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "run"
    proc = start("train", QUICKSTART, *overrides(tiny_model_dir, out, **common), "--nproc", "2",
                 stderr_path=tmp_path / "err")
    try:
        wait_for_step(proc, 2)
        proc.send_signal(signal.SIGTERM)
        proc.stdout.read()
        assert proc.wait(timeout=300) == 143
    finally:
        proc.kill()
    stderr = (tmp_path / "err").read_text()
    assert "Traceback" not in stderr and "SignalException" not in stderr
    assert stderr.count("prefalign: SIGTERM received") == 2  # passed on to both processes
    [line] = [text for text in stderr.splitlines() if "resume with:" in text]
    assert line.startswith("prefalign train: interrupted by SIGTERM after step ")
    step = int(line.split("after step ")[1].split(";")[0])
    assert 2 <= step < 20 and (out / f"checkpoint-{step}" / MARKER).is_file()
    command = shlex.split(line.split("resume with: ")[1])
    assert command[:3] == ["prefalign", "train", QUICKSTART] and command[-2:] == ["--nproc", "2"]

    resumed = subprocess.run([sys.executable, "-m", "prefalign", *command[1:]], cwd=ROOT, capture_output=True,
                             text=True, env=env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(losses(out)) == list(range(1, 21))
    assert losses(out) == pytest.approx(losses(whole), abs=1e-6)
    for name, value in weights(whole).items():
        assert torch.allclose(weights(out)[name], value, atol=1e-6), name


HAND_STARTED = {
    # torchrun's agent re-raises the signal as SignalException after stopping the processes: its own traceback
    # and exit status 1 (prefalign does not run in that process)
    "torchrun": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], None),
    # accelerate's CPU flag (`--cpu --num_processes 2`) starts one process (several need mpirun); `--multi_gpu`
    # starts torchrun's processes, which train on the CPU with gloo; accelerate exits 128 + signal itself
    "accelerate": ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--main_process_port", "0"], 143),
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(HAND_STARTED))
def test_sigterm_to_a_hand_started_launcher_checkpoints_every_rank_and_prints_a_resume_command_with_nproc(
        tiny_model_dir, tmp_path, launcher):
    """`torchrun --nproc_per_node 2 -m prefalign train ...` / `accelerate launch --multi_gpu --num_processes 2 -m
    prefalign train ...` and SIGTERM to the launcher only: both ranks get it from the launcher, stop after the same
    step and save one complete checkpoint; the main rank's one line resumes with `--nproc 2`; no rank traceback."""
    launch, exit_code = HAND_STARTED[launcher]
    out = tmp_path / "run"
    proc = subprocess.Popen([*launch, "-m", "prefalign", "train", QUICKSTART,
                             *overrides(tiny_model_dir, out, max_steps=100000, per_device_train_batch_size=2)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=open(tmp_path / "err", "w"), text=True, env=env())
    try:
        wait_for_step(proc, 2)
        proc.send_signal(signal.SIGTERM)
        proc.stdout.read()
        code = proc.wait(timeout=300)
    finally:
        proc.kill()
    stderr = (tmp_path / "err").read_text()
    assert code != 0 and (exit_code is None or code == exit_code), (code, stderr[-3000:])
    assert stderr.count("prefalign: SIGTERM received") == 2  # passed on to both ranks
    [line] = [text for text in stderr.splitlines() if "resume with:" in text]
    assert line.startswith("prefalign train: interrupted by SIGTERM after step ")
    step = int(line.split("after step ")[1].split(";")[0])
    assert (out / f"checkpoint-{step}" / MARKER).is_file() and not (out / "model.safetensors").exists()
    command = shlex.split(line.split("resume with: ")[1])
    assert command[:3] == ["prefalign", "train", QUICKSTART] and command[-2:] == ["--nproc", "2"]
    # the only traceback is the launcher's own (torchrun's SignalException), none from prefalign's processes
    tracebacks = stderr.split("Traceback (most recent call last):")[1:]
    assert all("SignalException: Process" in t and "prefalign" not in t.split("SignalException")[0]
               for t in tracebacks), stderr[-3000:]
    assert exit_code is None or not tracebacks
