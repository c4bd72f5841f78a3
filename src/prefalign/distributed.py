"""What a multi-process run (torchrun, accelerate launch, deepspeed) needs beyond one process.

Every process runs the same command. The rules, in one place:
  - shared work (building the demo model, encoding the data) is done by the main process of each
    node first; the others wait, then read its cache (`TrainingArguments.main_process_first`);
  - one process, the world's main one, writes the outputs and prints the summaries;
  - collective work (`prefalign eval`'s scoring, the reference precompute) is split by rank, and
    the pieces are gathered back in data order.
`prefalign train/eval --nproc N` starts `torchrun` for the user (`launch_command`).
"""

from __future__ import annotations

import os
import sys

import torch


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in the one process that writes outputs and prints summaries."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def gather_objects(obj) -> list:
    """Every process's `obj`, in rank order (on every process); `[obj]` in a single process."""
    if world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command that runs `prefalign ARGV` in `nproc` processes on this machine.

    `--standalone` picks a free rendezvous port; several machines use torchrun's own flags
    (`--nnodes`, `--node_rank`, `--rdzv_endpoint`), see the README.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "prefalign", *argv]


def under_launcher() -> bool:
    """True inside a process started by torchrun / accelerate launch / deepspeed."""
    return "LOCAL_RANK" in os.environ


def prepare_deepspeed_state(train_values: dict) -> dict:
    """Make DeepSpeed see every process when there is no GPU (the CPU accelerator, gloo).

    Without a GPU, accelerate (1.x) finds no communication backend for a DeepSpeed run and counts
    one process, so transformers fills DeepSpeed's `train_batch_size` for one process and DeepSpeed
    refuses it. Here the shared process state is set up first, with gloo, and the returned
    training arguments are told to use it. On a GPU they are returned as they are: accelerate
    picks nccl itself.
    """
    if not train_values.get("deepspeed") or not under_launcher() or torch.cuda.is_available():
        return train_values
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # read by PartialState to initialise through DeepSpeed
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    accelerator_config = dict(train_values.get("accelerator_config") or {})
    accelerator_config["use_configured_state"] = True
    return {**train_values, "accelerator_config": accelerator_config}
