"""A full disk is a one-line error naming what could not be written, not a traceback."""

import subprocess
import sys

import pytest
from helpers import EXAMPLES


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: enough for the first small files of a run, not for the model."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
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
