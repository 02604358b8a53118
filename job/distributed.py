"""Process group up and down, the rank's device, and agreement between ranks.

Run as a plain process this is a world of one; under torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT in the environment) it joins the process group: NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(setting: str, local_rank: int) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """The device, with the GPU's name and memory."""
    if device.type != "cuda":
        return str(device)
    props = torch.cuda.get_device_properties(device)
    return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"


def setup(device_setting: str) -> World:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_setting, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return World(rank, world_size, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def any_rank_each(flags: list[bool], world: World) -> list[bool]:
    """Each flag true on every rank when it is true on any: one collective for all of them."""
    if not world.distributed:
        return flags
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def mean_over_ranks(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= world.world_size
    return values


def gather_objects(obj, world: World) -> list:
    """obj from every rank, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, world: World):
    """Rank 0's obj, on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def torchrun_options(
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "gan-job",
    rdzv_timeout_seconds: int = 900,
) -> list[str]:
    """torchrun's options for nproc_per_node workers here; with nnodes > 1, one agent per node
    meets the others at node 0's c10d store.

    read_timeout is what bounds a node's wait for node 0's store to come up: left at its 60 s
    default, a pod that starts minutes before pod 0 gives up whatever join_timeout says. There
    are no in-place restarts: a lost node breaks the store or the collectives, and the workload
    (JobSet, TrainJob) restarts the whole group, which resumes from the newest checkpoint.
    """
    if nnodes == 1:
        return ["--standalone", f"--nproc-per-node={nproc_per_node}"]
    is_host = "true" if node_rank == 0 else "false"
    timeout = rdzv_timeout_seconds
    return [
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rdzv_endpoint}",
        f"--rdzv-id={rdzv_id}",
        f"--rdzv-conf=is_host={is_host},join_timeout={timeout},read_timeout={timeout}",
        "--max-restarts=0",
    ]


def torchrun_argv(options: list[str]) -> list[str]:
    """The command that re-runs this job under torchrun with these options."""
    return [sys.executable, "-m", "torch.distributed.run", *options, "-m", "job"]


def rendezvous_failed(error_file: str) -> bool:
    """Whether torchrun's agent stopped on a rendezvous error (a node that never came, or node
    0's store gone with its pod), going by the error file torchrun writes on its own failure."""
    try:
        with open(error_file) as f:
            message = json.load(f)["message"]["message"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return message.startswith("Rendezvous")
