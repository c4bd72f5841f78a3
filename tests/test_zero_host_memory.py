"""ZeRO-3 on the CPU: host memory freed by released gathers goes back to the system (glibc).

Each check runs in a fresh process (the allocator's state is per process): a 16 MiB block freed
first raises glibc's dynamic mmap threshold, as a gathered layer's release does; then 48 blocks of
4 MiB (a gathered weight each) are allocated with a 256 KiB tensor pinned after each, and freed.
With the default policy they came from the heap, where the pins keep them from being returned; with
prefalign's ZeRO-3 setting they were mapped, and are unmapped when freed.
"""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mmap threshold")

PROBE = """
import os, torch
from transformers.integrations.deepspeed import HfDeepSpeedConfig
from prefalign.modeling.zero import return_gathered_memory_on_cpu

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

stage = int(os.environ["PROBE_ZERO_STAGE"])
config = HfDeepSpeedConfig({"zero_optimization": {"stage": stage}, "train_batch_size": 1})  # as the Trainer sets it
print("set" if return_gathered_memory_on_cpu() else "unset")
first = torch.ones(4 << 20)  # 16 MiB
del first
before = rss_mb()
blocks, pins = [], []
for _ in range(48):
    blocks.append(torch.ones(1 << 20))  # 4 MiB, written
    pins.append(torch.ones(64 << 10))  # 256 KiB: from the top of the heap, right after the block
held = rss_mb() - before
blocks.clear()
print(f"{held:.0f} {rss_mb() - before:.0f}")
"""


def _probe(stage: int, **env) -> tuple[str, float, float]:
    clean = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                         env={**clean, "PROBE_ZERO_STAGE": str(stage), **env})
    assert run.returncode == 0, run.stderr[-2000:]
    state, sizes = run.stdout.split("\n")[-3:-1]
    held, left = map(float, sizes.split())
    return state, held, left


def test_zero3_on_the_cpu_returns_released_blocks_and_other_runs_keep_the_default():
    state, held, left = _probe(3)
    assert state == "set" and held > 150 and left < 0.1 * held, (held, left)
    state, held, left = _probe(2)  # the default policy: the freed blocks stay in the process
    assert state == "unset" and held > 150 and left > 0.8 * held, (held, left)


def test_a_threshold_the_user_set_is_left_alone():
    state, _, _ = _probe(3, MALLOC_MMAP_THRESHOLD_="33554432")
    assert state == "unset"
