# DRAFT (H3), to be exported from the notebook
"""draft"""

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class World:
    """Where this process stands among the processes of a (possibly) distributed run.

    rank: this process's number, 0 .. world_size - 1; rank 0 writes files and prints.
    local_rank: its number on this machine, which picks its GPU.
    owns_group: whether `init_distributed` started the process group (and must end it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group that torchrun describes in the environment, if any.

    torchrun sets WORLD_SIZE, RANK and LOCAL_RANK for every process it starts; without them
    this is a run of one process. On CUDA each process takes the GPU of its local rank.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size == 1:
        return World(), device
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":  # one GPU per process
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(rank, world_size, local_rank, owns), device


def close_distributed(world: World) -> None:
    """Leave the process group, if `init_distributed` joined it."""
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """The model wrapped so that backward() averages the gradients of all processes."""
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """DDP's `no_sync()` when `skip` (an inner micro-batch: keep the gradient local for now)."""
    if skip and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def sum_over_ranks(value: Tensor, world: World) -> Tensor:
    """`value` added up over all processes (the same result on every one)."""
    if world.world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def gather(obj: object, world: World) -> list:
    """Every process's `obj`, in rank order (picklable Python objects)."""
    if world.world_size == 1:
        return [obj]
    objects = [None] * world.world_size
    dist.all_gather_object(objects, obj)
    return objects


@dataclass
class StopFlag:
    """Set by a signal handler, read by the loop: the signal that asked the run to stop."""

    signal: int | None = None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """While inside, SIGINT and SIGTERM ask the loop to stop after its step; a second
    Ctrl-C stops at once (KeyboardInterrupt). Only the main thread can handle signals."""
    stop = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum: int, frame: object) -> None:
        if signum == signal.SIGINT and stop.signal == signal.SIGINT:
            raise KeyboardInterrupt
        stop.signal = stop.signal or signum

    old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
