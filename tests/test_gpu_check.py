"""benchmarks/gpu_check.sh cannot run here (no GPU); its dry run checks the script on the CPU."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_trains_prefalign_and_trl_from_the_same_start(tmp_path):
    pytest.importorskip("trl", reason="the TRL comparison needs trl (pip install -e .[bench])")
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--runs", "sdpa-full,trl-full",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    lines = {m.group(1): m for m in re.finditer(r"^(\S+)\s+(\d+) tokens/s .* losses \[([-\d.]+)\]", run.stdout, re.M)}
    assert set(lines) == {"sdpa-full", "trl-full"}, run.stdout
    for match in lines.values():  # the same random model and pairs: both start at ln 2
        assert int(match.group(2)) > 0 and float(match.group(3)) == pytest.approx(math.log(2), abs=1e-3)


def test_gpu_check_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0


def test_vlm_comparison_at_the_2b_shape_skips_cleanly_without_a_gpu():
    """gpu_check.sh runs bench_vlm.py at Qwen2-VL-2B's shape; on a machine without CUDA it says so and exits 0."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the comparison would run")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_vlm.py"), "--shape", "2b", "--bf16"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == ("bench_vlm.py --shape 2b: skipped (torch sees no CUDA device; a 2B model is a "
                                  "GPU's work)")
