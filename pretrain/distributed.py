"""Everything that knows about ranks: process-group start-up under any launcher, collectives.

Launchers and what they leave in the environment:
- ``deepspeed`` (single node or ``--hostfile``) and ``torchrun``: RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT.
- SLURM (``srun`` one task per GPU): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the sbatch
  script exports MASTER_ADDR/MASTER_PORT (see ``launch/slurm/pretrain.sbatch``).
- nothing (a plain ``vidrec pretrain`` for debugging): a world of one on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
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

    _environment_from_slurm()
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
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
