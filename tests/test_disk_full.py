"""A full disk is a one-line error naming what could not be written, not a traceback; nothing is lost.

Black-box: the CLI in a subprocess, writing onto a real small filesystem (a tmpfs, where this machine
lets the tests mount one) or under a real file-size limit (`ulimit -f`: writes past it fail with EFBIG).
"""

import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from helpers import EXAMPLES, ROOT
from safetensors.torch import load

from prefalign.config import load_config
from prefalign.train.checkpoints import MARKER
from prefalign.train.workflow import run_train

QUICKSTART = EXAMPLES / "quickstart.yaml"


def _mount(folder, size) -> None:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: enough for the first small files of a run, not for the model."""
    mount = tmp_path / "small"
    _mount(mount, "64k")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_full_disk_is_a_clean_error(tiny_model_dir, full_disk, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "prefalign", "train", str(EXAMPLES / "lora_dpo.yaml"), f"model_name_or_path={tiny_model_dir}",
         "build_demo_model=false", f"dataset_dir={EXAMPLES / 'data'}", f"output_dir={full_disk / 'run'}",
         "finetuning_type=full", "max_samples=8", "max_steps=1", "val_size=0", "eval_strategy=no"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("prefalign train: error:")]
    assert len(errors) == 1
    assert "no space left on device" in errors[0].lower() and str(full_disk) in errors[0]


def _args(model_dir, out):
    """Full tuning of the tiny model, 6 steps, a checkpoint every 2 (each ~1.2 MB: weights 0.34, Adam 0.7)."""
    values = {"model_name_or_path": model_dir, "build_demo_model": "false", "output_dir": out, "max_samples": 16,
              "cutoff_len": 96, "per_device_train_batch_size": 4, "eval_dataset": "", "plot_loss": "false",
              "logging_steps": 1, "disable_tqdm": "true", "overwrite_output_dir": "false", "max_steps": 6,
              "warmup_ratio": 0, "save_strategy": "steps", "save_steps": 2}
    return [f"{k}={v}" for k, v in values.items()]


def _train(args, **popen):
    return subprocess.run([sys.executable, "-m", "prefalign", "train", str(QUICKSTART), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


def _the_error(run) -> str:
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    [line] = [text for text in run.stderr.splitlines() if text.startswith("prefalign train: error:")]
    return line


# tmpfs sizes (4 KiB pages) where checkpoint-2 fits and checkpoint-4 does not: 2 MiB runs out in
# torch.save's optimizer.pt (torch's zip writer: a RuntimeError), 1300 KiB in model.safetensors
# (safetensors' own error, "os error 28")
@pytest.mark.slow
@pytest.mark.parametrize(("size", "said"), [
    ("2m", "torch.save could not finish its file (a full disk or a file-size limit)"),
    ("1300k", "no space left on device"),
])
def test_a_disk_that_fills_during_a_checkpoint_keeps_the_last_complete_one_and_resumes_from_it(
        tiny_model_dir, tmp_path, size, said):
    whole = tmp_path / "whole"  # as the interrupted run, in a process of one thread (the bytes depend on it)
    assert _train(_args(tiny_model_dir, whole)).returncode == 0

    disk = tmp_path / "disk"
    _mount(disk, size)
    try:
        out = disk / "run"
        line = _the_error(_train(_args(tiny_model_dir, out)))
        assert f"error: {said} while writing to {out / 'checkpoint-4'} (" in line
        free = float(line.split(" MiB free there); free some space")[0].rsplit("(", 1)[1])
        assert free < 0.2  # of the 1.3-2 MiB disk
        assert (out / "checkpoint-2" / MARKER).is_file() and not (out / "checkpoint-4" / MARKER).exists()
        for name in ("model.safetensors", "optimizer.pt", "scheduler.pt"):
            assert (out / "checkpoint-2" / name).read_bytes() == (whole / "checkpoint-2" / name).read_bytes(), name

        subprocess.run(["mount", "-o", "remount,size=32m", str(disk)], check=True)  # room now, the files kept
        resumed = _train(_args(tiny_model_dir, out))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "Skipping incomplete checkpoints: checkpoint-4" in resumed.stderr
        assert f"Resuming from {out / 'checkpoint-2'}" in resumed.stderr
        # read, not memory-mapped: a mapped file would keep the tmpfs busy at its umount
        trained, expected = (load((d / "model.safetensors").read_bytes()) for d in (out, whole))
        assert trained.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.allclose(trained[name], value, atol=1e-6), name
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], capture_output=True)


def _file_size_limit(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
@pytest.mark.parametrize(("limit", "said"), [
    (300_000, "a file too large for this disk or for the file-size limit"),  # model.safetensors: 343 kB
    (500_000, "torch.save could not finish its file (a full disk or a file-size limit)"),  # optimizer.pt: 699 kB
])
def test_a_file_size_limit_during_a_checkpoint_is_one_line(tiny_model_dir, tmp_path, limit, said):
    out = tmp_path / "run"
    line = _the_error(_train(_args(tiny_model_dir, out), preexec_fn=_file_size_limit(limit)))
    assert f"error: {said} while writing to {out / 'checkpoint-2'} (" in line and "MiB free there)" in line
    assert "raise the limit (ulimit -f)" in line
    assert not (out / "checkpoint-2" / MARKER).exists()
