"""Where a CPU step's peak RSS comes from: RSS and glibc's own accounting at every decoder layer.

One prefalign step on bench_memory's long pair (the real model, LF demo texts filling `cutoff_len`),
with a forward pre-hook and a backward hook on every decoder layer that record the process's RSS,
glibc's bytes in use (`mallinfo2`: uordblks + hblkhd) and its footprint (arena + hblkhd). When the
footprint grows faster than the bytes in use, freed blocks are kept in glibc's heap (fragmentation),
which no change to the tensors saves; allocator settings (GLIBC_TUNABLES) act on it.

    python benchmarks/trace_memory.py --cutoff-len 2048 --mode lora
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4194304 python benchmarks/trace_memory.py
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_memory  # noqa: E402
import bench_real  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cutoff-len", type=int, default=2048)
    p.add_argument("--mode", default="lora", choices=("lora", "full"))
    p.add_argument("--cache", default=None)
    args = p.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from real_model import smollm2_dir

    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    marks = []

    def mark(name: str) -> None:
        info = libc.mallinfo2()
        rss = next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))
        marks.append((time.perf_counter(), name, rss, (info.uordblks + info.hblkhd) / 2**20,
                      (info.arena + info.hblkhd) / 2**20))

    model = smollm2_dir(args.cache)
    work = Path(tempfile.mkdtemp())
    data_dir, _ = bench_memory.write_long_pair(AutoTokenizer.from_pretrained(model), args.cache, args.cutoff_len, work)
    os.environ["PREFALIGN_CACHE"] = str(work / "cache")
    spec = {"model": str(model), "data_dir": str(data_dir), "mode": args.mode, "cutoff_len": args.cutoff_len,
            "steps": 1, "batch_size": 1, "grad_accum": 1, "lr": 5e-5}  # bench_memory's settings
    trainer = bench_real.prefalign_trainer(spec, str(work / "out"))
    for name, layer in trainer.model.named_modules():
        if re.search(r"layers\.\d+$", name):
            index = name.rsplit(".", 1)[1]
            layer.register_forward_pre_hook(lambda *_, i=index: mark(f"layer {i} forward"))
            layer.register_full_backward_hook(lambda *_, i=index: mark(f"layer {i} backward"))
    mark("start")
    trainer.train()
    mark("end")
    t0 = marks[0][0]
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}; MiB\n")
    print("| s | at | RSS | glibc in use | glibc footprint |\n|---:|---|---:|---:|---:|")
    for t, name, rss, used, footprint in marks:
        print(f"| {t - t0:.1f} | {name} | {rss:.0f} | {used:.0f} | {footprint:.0f} |")
    print(f"\npeak RSS at the marks {max(m[2] for m in marks):.0f} MiB; "
          f"largest footprint - in use {max(m[4] - m[3] for m in marks):.0f} MiB")


if __name__ == "__main__":
    main()
