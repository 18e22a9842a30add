"""Everything that knows about ranks: process-group start-up under any launcher, collectives.

Launchers and what they leave in the environment:
- ``deepspeed`` (single node or ``--hostfile``) and ``torchrun``: RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT.
- SLURM (``srun`` one task per GPU): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the sbatch
  script exports MASTER_ADDR/MASTER_PORT (see ``launch/slurm/pretrain.sbatch``).
- nothing (a plain ``vidrec pretrain`` for debugging): a world of one on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import socket
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one process that writes shared files and talks to MLflow."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment_from_slurm() -> None:
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError(
            "running under SLURM without MASTER_ADDR: export it in the sbatch script "
            "(see launch/slurm/pretrain.sbatch)"
        )
    os.environ.setdefault("MASTER_PORT", "29500")


def init_distributed() -> World:
    """Start (or join) the process group and pick this rank's device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed's ZeRO and CPU communication call torch.distributed.all_gather_into_tensor and
    # reduce_scatter_tensor, which torch 2.13 deprecates with a FutureWarning per process; the
    # calls are inside DeepSpeed (none in vidrec), so there is nothing for a user to change.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is depr",
        category=FutureWarning,
    )
    _environment_from_slurm()
    if int(os.environ.get("RANK", 0)) != 0:
        # DeepSpeed's logger has its own handler: INFO from rank 0 only, as for vidrec's own.
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    if not dist.is_initialized():
        # DeepSpeed print()s "deepspeed_shm_comm_op built successfully" on every rank at each
        # start: a debug line, not one line per rank in the job's log.
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
        for line in printed.getvalue().splitlines():
            log.debug("deepspeed: %s", line)
        _unlink_shm_buffer(dist.get_rank())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    world = World(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
    )
    log.info("rank %d/%d (local %d) on %s", world.rank, world.world_size, local_rank, device)
    return world


def ranks_per_node(environ: Mapping[str, str], world_size: int) -> int:
    """Ranks (GPUs) on this node, as the launcher says: LOCAL_WORLD_SIZE (torchrun,
    accelerate), LOCAL_SIZE (deepspeed), SLURM_NTASKS_PER_NODE or the first count of
    SLURM_TASKS_PER_NODE ("8(x4)"); else the whole world (a plain process: 1)."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        count = re.match(r"\d+", environ.get(name, ""))
        if count:
            return int(count.group())
    return world_size


def cores_on_node(environ: Mapping[str, str]) -> int:
    """CPU cores this node gives the job: SLURM_CPUS_ON_NODE under SLURM (where each task is
    bound to its own share, so this process sees only that), else the cores this process
    may run on (a container's or taskset's limit included)."""
    if environ.get("SLURM_CPUS_ON_NODE", "").isdigit():
        return int(environ["SLURM_CPUS_ON_NODE"])
    return len(os.sched_getaffinity(0))


def shm_buffer_path(rank: int) -> Path:
    """The shared-memory segment DeepSpeed's CPU all-reduce creates for ``rank`` of this job
    (named by user, master address and port, rank: see its ``shm.cpp``)."""
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}"


def _unlink_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU backend (all ranks on one machine) maps one ~66 MB segment per rank in
    the RAM-backed /dev/shm and never unlinks it: every job left ~130 MB behind. Once every
    rank has passed initialisation (the barrier), each has mapped every segment, so each rank
    removes its own name now: the memory lives on while the job's processes have it mapped and
    is freed when they end, however they end (SIGKILL included). Other jobs' segments differ
    by port and are never touched."""
    dist.barrier()  # on every rank, segment or not (another backend, several machines)
    shm_buffer_path(rank).unlink(missing_ok=True)


def shutdown() -> None:
    """End the process group through DeepSpeed, which also forgets the groups it cached: a
    process that starts a new group afterwards (one test module after another) would otherwise
    be handed the dead ones ("Group ... is not registered")."""
    import deepspeed.comm

    if deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()
    elif dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (pickled: for small results, not tensors of a step)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank: every rank takes the same branch."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum of each value over ranks (one all-reduce for all of them)."""
    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist(), strict=True))


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average of each value over ranks (one all-reduce for all of them)."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return {key: value / world_size for key, value in sum_over_ranks(values, device).items()}


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
