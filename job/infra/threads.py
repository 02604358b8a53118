"""How many threads a training process uses: what the container really gives it, shared by
the processes of its node.

torch and OpenMP size themselves by the host's CPUs, not by a pod's CPU limit: a pod limited to
4 CPUs on a 64-core node would start 64 threads per process and spend its quota switching
between them. The default here comes from the CPUs this process may run on (its affinity, as
`taskset` or a cpuset sets it) and the cgroup's CPU quota (cgroup v2 `cpu.max`, v1
`cpu.cfs_quota_us`/`cpu.cfs_period_us`, the way Kubernetes enforces `limits.cpu`), divided
among the node's processes (LOCAL_WORLD_SIZE).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")
MAX_LOADER_WORKERS = 4


@dataclass(frozen=True)
class Threads:
    """The thread count chosen, and why (for the start-up block)."""

    count: int
    why: str


def thread_count(
    affinity: int, quota: int | None, period: int | None, local_world_size: int
) -> int:
    """Threads per process: the CPUs it may use (its affinity, capped by quota/period CPUs,
    rounded down: a thread more than the quota is throttled) over the node's processes, at
    least 1. quota None (or <= 0): no quota."""
    cpus = float(affinity)
    if quota is not None and quota > 0 and period:
        cpus = min(cpus, quota / period)
    return max(1, math.floor(cpus / max(1, local_world_size)))


def loader_workers(threads: int) -> int:
    """DataLoader workers of an image folder: half the process's threads, 1 to 4."""
    return max(1, min(MAX_LOADER_WORKERS, threads // 2))


def affinity() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cgroup_quota(
    proc_cgroup: str | None = None, root: Path = CGROUP_ROOT
) -> tuple[int, int] | None:
    """The tightest CPU quota (quota, period in µs) of this process's cgroup and its
    ancestors, v2 or v1; None when there is none. proc_cgroup: /proc/self/cgroup's text."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    found = [q for folder in _cpu_folders(proc_cgroup, root) if (q := _quota_in(folder))]
    return min(found, key=lambda q: q[0] / q[1]) if found else None


def _cpu_folders(proc_cgroup: str, root: Path) -> list[Path]:
    """The cgroup folders that may hold this process's CPU quota: its own and each ancestor,
    under every mount where the cpu controller (v1) or the unified hierarchy (v2) can be."""
    folders = []
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            mounts = [root, root / "unified"]
        elif "cpu" in controllers.split(","):
            mounts = [root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"]
        else:
            continue
        parts = [p for p in path.strip().split("/") if p]
        for mount in mounts:
            folders += [mount.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]
    return folders


def _quota_in(folder: Path) -> tuple[int, int] | None:
    try:
        if (folder / "cpu.max").is_file():  # v2: "max 100000" or "200000 100000"
            quota, period = (folder / "cpu.max").read_text().split()
            return None if quota == "max" else (int(quota), int(period))
        if (folder / "cpu.cfs_quota_us").is_file():  # v1: -1 is no quota
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
            return (quota, period) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None
    return None


def choose(setting: int | None, local_world_size: int) -> Threads:
    """GAN_NUM_THREADS, else OMP_NUM_THREADS from the environment, else the derived count
    (gan-job's launcher sets OMP_NUM_THREADS to that for torchrun, which would set 1)."""
    cpus, quota = affinity(), cgroup_quota()
    count = thread_count(cpus, *(quota or (None, None)), local_world_size)
    limit = f"cgroup quota {quota[0] / quota[1]:g} CPUs" if quota else "no cgroup CPU quota"
    derived = Threads(
        count, f"{cpus} CPUs in its affinity, {limit}, {local_world_size} process(es) here"
    )
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if setting:
        return Threads(setting, "GAN_NUM_THREADS")
    if omp.isdigit() and int(omp) not in (0, count):
        return Threads(int(omp), "OMP_NUM_THREADS")
    return derived


def apply(setting: int | None, local_world_size: int) -> Threads:
    """Sets torch's intra-op thread count for this process; returns it and why."""
    threads = choose(setting, local_world_size)
    torch.set_num_threads(threads.count)
    return threads
