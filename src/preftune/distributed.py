"""The process group of a launched run (``torchrun``, ``accelerate launch``): which process this
is, a decision taken by the main process for all, and the group's end at a clean exit."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any, TypeVar

import torch

_T = TypeVar("_T")


def process_group() -> tuple[int, int]:
    """(this process's rank, number of processes) of the launched group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def on_main(decide: Callable[[], _T], failure: Callable[[str], Exception]) -> _T:
    """``decide()`` run by the main process alone; every process returns its result, or raises
    its error (the others ``failure``: they would otherwise wait for a main process that has failed)."""
    rank, world = process_group()
    if world == 1:
        return decide()
    outcome: Any = None
    if rank == 0:
        try:
            outcome = ("value", decide())
        except Exception as err:
            torch.distributed.broadcast_object_list([("error", str(err))], src=0)
            raise
    box = [outcome]
    torch.distributed.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise failure(f"the main process failed: {value}")
    return value


def close_process_group() -> None:
    """End a launched run's process group once every process has finished its work: called by
    the command line after a command that succeeded, and by a script that trained through the
    Python API under a launcher, at its end (no collective can run in the process after it).

    Left to the interpreter's exit, the group is torn down in no set order with its threads
    still running, which once aborted a finished run (SIGABRT: "terminate called without an
    active exception"). The run's wrappers (DDP's reducer, FSDP's states, DeepSpeed's engines)
    hold the group; they are unreachable by now and collected first, then every process waits
    for the others and the group ends, its threads joined.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
