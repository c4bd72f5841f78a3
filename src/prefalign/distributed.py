"""What a multi-process run (torchrun, accelerate launch, deepspeed) needs beyond one process.

Every process runs the same command. The rules, in one place:
  - shared work (building the demo model, encoding the data) is done by the main process of each
    node first; the others wait, then read its cache (`TrainingArguments.main_process_first`);
  - one process, the world's main one, writes the outputs and prints the summaries;
  - collective work (`prefalign eval`'s scoring, the reference precompute) is split by rank, and
    the pieces are gathered back in data order.
`prefalign train/eval --nproc N` starts `torchrun` for the user (`launch`).
"""

from __future__ import annotations

import os
import sys

import torch


def full_shape(param) -> torch.Size:
    """`param`'s shape as a whole, also when DeepSpeed ZeRO-3 partitions it: then each process holds an
    empty tensor (shape (0,)) and the whole shape is kept in `ds_shape`."""
    return torch.Size(getattr(param, "ds_shape", param.shape))


def partitioned(param) -> bool:
    """True for a parameter partitioned by DeepSpeed ZeRO-3 (its data is gathered only around a forward)."""
    return hasattr(param, "ds_shape")


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


def mean_across_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all processes (itself with one process); every process must call it."""
    if world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
        value = value / world_size()
    return value


def gather_objects(obj) -> list:
    """Every process's `obj`, in rank order (on every process); `[obj]` in a single process."""
    if world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def launch(nproc: int, argv: list[str]) -> int:
    """Run `prefalign ARGV` in `nproc` processes on this machine (torchrun's own machinery); the exit code.

    `--standalone` picks a free rendezvous port; several machines use torchrun's own flags
    (`--nnodes`, `--node_rank`, `--rdzv_endpoint`), see the README. A failed process has printed
    its own one-line error; torchrun's traceback about it is replaced by one line. A signal to this
    launcher (SIGTERM from `kill` or a scheduler, SIGINT) is passed by torchrun to every process,
    which checkpoint and exit (the main one prints the resume command); the launcher then exits
    with 128 + the signal number, as a single process does, without torchrun's traceback.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "prefalign", *argv]))
    except SignalException as exc:  # raised by torchrun's handler once the processes have been stopped
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        codes = [failure.exitcode for failure in exc.failures.values()]
        if all(code > 128 for code in codes):  # 128 + a signal it handled: stopped, not failed (the main
            return min(codes)                  # process printed how to resume); a killed one has -signal
        rank, failure = min(exc.failures.items())
        print(f"prefalign: {len(exc.failures)} of {nproc} processes failed (first: rank {rank}, exit code "
              f"{failure.exitcode}); their messages are above", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def launcher_processes() -> tuple[int, bool]:
    """(processes on this machine, True if the run spans several machines) under a launcher; (1, False) without.

    What a command that repeats this run needs: `--nproc N` on one machine; on several, each
    machine's launcher again.
    """
    if not under_launcher():
        return 1, False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return local, local != world


def _has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or bool(mps and mps.is_available())
            or bool(xpu and xpu.is_available()))


def under_launcher() -> bool:
    """True inside a process started by torchrun / accelerate launch / deepspeed."""
    return "LOCAL_RANK" in os.environ


def cpu_launch_arguments(train_values: dict) -> dict:
    """The training arguments of a run on a machine without a GPU, one process or many: the one rule.

    `use_cpu: true` unless the config says otherwise: transformers refuses `bf16: true` without an
    accelerator unless told the run is on the CPU (it then trains under CPU autocast), in one
    process as under a launcher. Under a launcher it is also what makes the run a real one:
    accelerate (1.x) only finds a CPU communication backend when told the run is on the CPU;
    otherwise it counts one process, and every process trains alone on the same batches.
      - plain data parallelism: `use_cpu` alone (gloo; the data is sharded, gradients all-reduced);
      - DeepSpeed (its CPU accelerator): the shared process state is set up first, through
        DeepSpeed with gloo, and the training arguments are told to use it; without that,
        transformers fills DeepSpeed's `train_batch_size` for one process and DeepSpeed refuses it.
        (DeepSpeed still trains with its partitioned engine, on its CPU accelerator.)
    On a machine with an accelerator the values are returned as they are.
    """
    if _has_accelerator():
        return train_values
    train_values = {"use_cpu": True, **train_values}
    if not under_launcher() or not train_values.get("deepspeed"):
        return train_values
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a state left by an earlier run of this process
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # read by PartialState to initialise through DeepSpeed
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    accelerator_config = dict(train_values.get("accelerator_config") or {})
    accelerator_config["use_configured_state"] = True
    return {**train_values, "accelerator_config": accelerator_config}
