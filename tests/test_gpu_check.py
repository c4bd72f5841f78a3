"""benchmarks/gpu_check.sh cannot run here (no GPU); its dry run checks the script on the CPU."""

import math
import os
import re
import subprocess
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
