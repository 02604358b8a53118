"""Process group up and down, the rank's device, and agreement between ranks.

Run as a plain process this is a world of one; under torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT in the environment) it joins the process group: NCCL on GPUs, gloo on CPU.
GAN_DEVICE=cuda on a machine whose GPU cannot be used stops before any work (DeviceError) rather
than train on the CPU or fail later with a traceback.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from job.infra import watchdog
from job.infra.errors import DeviceError

log = logging.getLogger(__name__)
# how a collective reports that a peer process is gone or silent: gloo raises a plain
# RuntimeError for some of them; NCCL's watchdog and communicator errors name NCCL
_PEER_GONE = (
    "Connection closed by peer",
    "Connection reset",
    "Connection refused",
    "Connection timed out",
    "Broken pipe",
    "Timed out waiting",
    "Connect timeout",
    "Socket Timeout",
    "No route to host",
    "Network is unreachable",
    "NCCL communicator",
    "NCCL error",
    "ncclRemoteError",
    "ncclSystemError",
    "Watchdog caught collective operation timeout",
    "Some NCCL operations have failed or timed out",
)
_joined = False  # this process joined a process group (setup): it ends through leave()


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


@dataclass(frozen=True)
class CudaFacts:
    """What this machine says about CUDA, as plain values (cuda_problem judges them)."""

    torch_cuda: str | None  # torch.version.cuda: the CUDA torch is built for; None: CPU-only
    driver_cuda: int | None  # cuDriverGetVersion: 12040 for CUDA 12.4; None: no NVIDIA driver
    available: bool  # torch.cuda.is_available()
    device_count: int
    local_rank: int
    capability: tuple[int, int] | None  # of this rank's GPU
    arch_list: tuple[str, ...]  # torch.cuda.get_arch_list(): sm_80, sm_90a, compute_90...
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES


def cuda_problem(f: CudaFacts) -> str | None:
    """Why this rank cannot train on its GPU, or None when it can."""
    if f.torch_cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    if f.driver_cuda is None:
        return (
            "no NVIDIA driver: libcuda.so.1 cannot be loaded (does the pod request nvidia.com/gpu "
            "and run with the NVIDIA container runtime?)"
        )
    driver = f"{f.driver_cuda // 1000}.{f.driver_cuda % 1000 // 10}"
    if f.driver_cuda // 1000 < int(f.torch_cuda.split(".")[0]):
        return (
            f"the NVIDIA driver supports CUDA {driver}, torch is built for CUDA {f.torch_cuda}: "
            f"update the driver, or use a torch built for CUDA {driver}"
        )
    if not f.available or f.device_count == 0:
        return (
            f"torch.cuda.is_available() is false: the driver (CUDA {driver}) sees no usable GPU "
            f"(CUDA_VISIBLE_DEVICES={f.visible_devices if f.visible_devices is not None else 'unset'})"
        )
    if f.local_rank >= f.device_count:
        return (
            f"local rank {f.local_rank} has no GPU of its own: {f.device_count} visible; start at "
            f"most {f.device_count} processes per node (GAN_NPROC_PER_NODE, --nproc-per-node)"
        )
    if f.capability and f.arch_list and not has_kernels_for(f.capability, f.arch_list):
        major, minor = f.capability
        return (
            f"GPU {f.local_rank} has compute capability {major}.{minor}; this torch has kernels "
            f"for {' '.join(f.arch_list)} only: use a torch build that supports the GPU"
        )
    return None


def has_kernels_for(capability: tuple[int, int], arch_list: tuple[str, ...]) -> bool:
    """Whether code built for arch_list runs on a GPU of this compute capability: sm_XY runs
    on X.Y and later minors of X (sm_XYa on X.Y only), compute_XY (PTX) on X.Y and later."""
    device = capability[0] * 10 + capability[1]
    for arch in arch_list:
        kind, _, code = arch.partition("_")
        exact = code.endswith("a")
        cc = int(code.rstrip("af"))
        if kind == "compute" and device >= cc:
            return True
        later_minor = device // 10 == cc // 10 and device > cc
        if kind == "sm" and (device == cc or later_minor and not exact):
            return True
    return False


def cuda_facts(local_rank: int) -> CudaFacts:
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    return CudaFacts(
        torch_cuda=torch.version.cuda,
        driver_cuda=_driver_cuda_version(),
        available=available,
        device_count=count,
        local_rank=local_rank,
        capability=torch.cuda.get_device_capability(local_rank) if local_rank < count else None,
        arch_list=tuple(torch.cuda.get_arch_list()),
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )


def _driver_cuda_version() -> int | None:
    """The CUDA version the installed NVIDIA driver supports; needs no GPU and no cuInit."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value


def pick_device(setting: str, local_rank: int) -> torch.device:
    """cuda:<local rank> or cpu; GAN_DEVICE=cuda without a usable GPU raises DeviceError."""
    if setting == "cpu":
        return torch.device("cpu")
    facts = cuda_facts(local_rank)
    problem = cuda_problem(facts)
    if problem and (setting == "cuda" or facts.available):  # auto: not some ranks on the CPU
        raise DeviceError(f"GAN_DEVICE={setting}: {problem}; or set GAN_DEVICE=cpu")
    if problem:
        if facts.driver_cuda is not None:  # a GPU machine: say why its GPU is not used
            log.warning("GAN_DEVICE=auto: training on the CPU: %s", problem)
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def describe_device(device: torch.device) -> str:
    if device.type != "cuda":
        return f"{device.type} ({torch.get_num_threads()} threads)"
    p = torch.cuda.get_device_properties(device)
    return (
        f"{device} ({p.name}, {p.total_memory / 2**30:.1f} GiB, "
        f"compute capability {p.major}.{p.minor}, CUDA {torch.version.cuda})"
    )


def local_world_size() -> int:
    """The processes of this node (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def setup(device_setting: str, timeout_seconds: float = 600.0) -> World:
    """Join the process group, if any: its collectives give up after timeout_seconds (torch's
    default is 30 minutes on gloo, 10 on NCCL)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_setting, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            timeout=timedelta(seconds=timeout_seconds),
            device_id=device if device.type == "cuda" else None,
        )
        global _joined
        _joined = True
        watchdog.beat("process group joined")
    log.info("rank %d of world size %d on %s", rank, world_size, describe_device(device))
    return World(rank, world_size, local_rank, device)


def peer_lost(exc: BaseException) -> bool:
    """Whether exc is a collective that failed because another process of the job is gone."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, (RuntimeError, OSError)) and any(s in str(exc) for s in _PEER_GONE)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> int:
    """End a process that joined a process group with status code, without Python's interpreter
    shutdown; in any other process, return code.

    A gloo worker thread releases a collective's tensors after the collective has returned, and
    that takes the GIL. One still waiting for it when the interpreter shuts down is ended inside a
    noexcept destructor: the rank aborts (SIGABRT, "terminate called without an active
    exception") after its work is done, and torchrun fails the whole job. destroy_process_group
    does not wait for those threads. Everything the job writes is closed before this is called.
    """
    if not _joined:
        return code
    teardown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def any_rank_each(flags: list[bool], world: World) -> list[bool]:
    """Each flag true on every rank when it is true on any: one collective for all of them."""
    return [v > 0 for v in max_over_ranks(flags, world)]


def max_over_ranks(values: list[float], world: World) -> list[float]:
    """Each value's maximum over the ranks (booleans count as 0 or 1): one collective."""
    if not world.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def mean_over_ranks(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= world.world_size
    return values


def sum_over_ranks(values: torch.Tensor, world: World) -> torch.Tensor:
    """values summed element-wise over the ranks, on every rank: one collective."""
    if world.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_objects(obj, world: World) -> list:
    """obj from every rank, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def differing(values: dict[str, str], label: int, world: World) -> dict[str, dict[str, list[int]]]:
    """The values that are not the same on every rank, as {name: {value: labels holding it}}
    (label: the rank's node, say). One all-gather of a digest when every rank agrees; of the
    values themselves only when they do not."""
    if not world.distributed:
        return {}
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
    if len(set(gather_objects(digest, world))) == 1:
        return {}
    return value_holders(gather_objects((label, values), world))


def value_holders(held: list[tuple[int, dict[str, str]]]) -> dict[str, dict[str, list[int]]]:
    """For each name whose value is not the same in every (label, values) pair: each value and
    the sorted labels that hold it, lowest label first (a name missing from a pair counts as the
    value "<unset>")."""
    names = sorted({name for _, values in held for name in values})
    out = {}
    for name in names:
        holders: dict[str, set[int]] = {}
        for label, values in held:
            holders.setdefault(values.get(name, "<unset>"), set()).add(label)
        if len(holders) > 1:
            ordered = sorted(holders.items(), key=lambda item: min(item[1]))
            out[name] = {value: sorted(labels) for value, labels in ordered}
    return out


def post(key: str, value: str, world: World) -> None:
    """Set key to value on the process group's store (the rendezvous TCPStore), for the other
    ranks' posted(): a message that needs no collective, so no peer waits in one."""
    if world.distributed:
        dist.distributed_c10d._get_default_store().set(key, value)


def posted(key: str, world: World) -> str | None:
    """key's value on the process group's store, or None while no rank has posted it; never
    blocks (a store gone with its node raises, as a lost peer)."""
    if not world.distributed:
        return None
    store = dist.distributed_c10d._get_default_store()
    return store.get(key).decode() if store.check([key]) else None


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
