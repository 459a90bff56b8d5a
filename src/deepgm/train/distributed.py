"""Data-parallel training with torch.distributed, set up from the environment `torchrun` provides.

    torchrun --nproc_per_node=2 -m deepgm.cli train CONFIG ...            # one machine, 2 processes
    torchrun --nnodes=N --nproc_per_node=G --rdzv_backend=c10d \\
             --rdzv_endpoint=HOST:29500 --rdzv_id=RUN -m deepgm.cli train CONFIG ...   # N machines

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every process; `setup` reads them
and joins the process group: NCCL when the processes use CUDA, gloo on CPU. Without them (a plain
`python` or `deepgm` call) everything here describes a world of one and does nothing.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its global rank, the number of processes, its rank on this machine, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from None


def _device_for(device: str, local_rank: int, world_size: int) -> torch.device:
    """The device this process trains on: 'auto' picks CUDA when present; under DDP, cuda means cuda:LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and world_size > 1:
        if dev.index is not None and dev.index != local_rank:
            raise ValueError(f"device {device!r} under torchrun: each process uses cuda:LOCAL_RANK (here "
                             f"cuda:{local_rank}); set device to 'cuda' or 'auto'")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s); start at most that many processes per node (--nproc_per_node)")
        dev = torch.device("cuda", local_rank)
    return dev


def setup(device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Join the process group torchrun's environment describes (once per process) and pick this rank's device.

    A single process (no WORLD_SIZE, or WORLD_SIZE=1) gets rank 0 of 1 and no process group.
    """
    world_size = dist.get_world_size() if dist.is_initialized() else _env_int("WORLD_SIZE", 1)
    rank = dist.get_rank() if dist.is_initialized() else _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world_size > 1 else 0)
    dev = _device_for(device, local_rank, world_size)
    if world_size > 1 and not dist.is_initialized():
        missing = [name for name in _ENV if name not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: start the processes with "
                               f"torchrun (or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT yourself)")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        options = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size, **options)
        atexit.register(cleanup)
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup(timeout_s: float = 60.0) -> None:
    """Leave the process group (safe to call when there is none, and more than once).

    The ranks leave in order: every other rank first, rank 0 last. Rank 0 hosts the store the group was
    built on; if it tore the group down and exited while another rank was still inside
    destroy_process_group, that rank's gloo threads lost their peer and the process could abort (SIGABRT)
    after its work was done, turning a finished run into a failed one.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() == 1:
        dist.destroy_process_group()
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()  # held here: it outlives the group it served
    dist.barrier()
    if rank != 0:
        dist.destroy_process_group()
        store.set(f"deepgm/left/{rank}", "1")
        return
    try:
        store.wait([f"deepgm/left/{r}" for r in range(1, world)], datetime.timedelta(seconds=timeout_s))
    except RuntimeError:  # a rank that died on the way out must not hang rank 0 as well
        pass
    dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on the process that writes logs, checkpoints and pictures (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process; a no-op in a single process."""
    if world_size() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over all processes (a new tensor; the input itself in a single process)."""
    if world_size() == 1:
        return values
    out = values.detach().to(_comm_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return (out / world_size()).to(values.device)


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's `tensor` (same shape and dtype everywhere), in rank order, on tensor's device."""
    if world_size() == 1:
        return [tensor]
    local = tensor.detach().to(_comm_device(), copy=True)
    out = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(out, local)
    return [t.to(tensor.device) for t in out]


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of rank `rank`'s noise stream: `seed` itself on rank 0 at step 0 (so one process is unchanged), a
    distinct well-mixed 63-bit number for any other (rank, step) pair (splitmix64 finaliser)."""
    if rank == 0 and step == 0:
        return seed
    z = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63
