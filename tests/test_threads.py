"""The default thread count: what the process may really use (affinity, cgroup CPU quota)
shared by the processes of its node; and the start-up block under taskset and a real cgroup."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from job.infra.threads import Threads, cgroup_quota, choose, loader_workers, thread_count
from tests.helpers import REPO, job_env, write_idx

CPU_V1 = Path("/sys/fs/cgroup/cpu")


def test_threads_are_the_cpus_the_process_may_use_over_the_processes_of_its_node():
    assert thread_count(64, None, None, 1) == 64
    assert thread_count(64, 400_000, 100_000, 1) == 4  # a pod limited to 4 CPUs on 64 cores
    assert thread_count(64, 400_000, 100_000, 2) == 2
    assert thread_count(64, 150_000, 100_000, 1) == 1  # a second thread would be throttled
    assert thread_count(64, 50_000, 100_000, 1) == 1  # at least one
    assert thread_count(4, None, None, 8) == 1
    assert thread_count(2, 800_000, 100_000, 1) == 2  # the affinity is the tighter limit
    assert thread_count(8, -1, 100_000, 2) == 4  # v1's -1: no quota


def test_image_folders_get_half_the_threads_as_loader_workers_1_to_4():
    assert [loader_workers(n) for n in (1, 2, 3, 8, 64)] == [1, 1, 1, 4, 4]


def test_the_tightest_quota_of_the_cgroup_and_its_ancestors_is_found_in_v1_and_v2(tmp_path):
    v2 = tmp_path / "kubepods" / "pod1" / "ctr"
    v2.mkdir(parents=True)
    (tmp_path / "kubepods" / "pod1" / "cpu.max").write_text("250000 100000\n")
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota("0::/kubepods/pod1/ctr\n", tmp_path) == (250_000, 100_000)
    v1 = tmp_path / "cpu,cpuacct" / "job"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    text = "4:memory:/job\n2:cpu,cpuacct:/job\n0::/kubepods/pod1/ctr\n"
    assert cgroup_quota(text, tmp_path) == (150_000, 100_000)
    assert cgroup_quota("2:cpu,cpuacct:/elsewhere\n1:name=systemd:/\n", tmp_path) is None


def start_up(tmp_path: Path, *prefix: str) -> str:
    """The start-up block of a one-step run, started through prefix (taskset, a shell line)."""
    write_idx(tmp_path / "data", n=64)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=1, GAN_MODEL="mlp")
    del env["OMP_NUM_THREADS"]
    cmd = [*prefix, sys.executable, "-m", "job"]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def line_of(block: str, start: str) -> str:
    return next(line.strip() for line in block.splitlines() if line.strip().startswith(start))


@pytest.mark.skipif(not shutil.which("taskset"), reason="taskset (util-linux) is not installed")
def test_a_process_pinned_to_one_cpu_starts_one_thread(tmp_path):
    block = start_up(tmp_path, "taskset", "-c", "0")
    line = line_of(block, "threads:")
    assert line.startswith("threads: 1 per process (1 CPUs in its affinity"), line
    assert line_of(block, "device:").startswith("device: cpu (1 threads)")


def test_gan_num_threads_then_omp_num_threads_override_the_derived_count(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert choose(3, 1) == Threads(3, "GAN_NUM_THREADS")
    assert choose(None, 1) == Threads(5, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    derived = choose(None, 1)
    assert derived.count == thread_count(
        len(os.sched_getaffinity(0)), *(cgroup_quota() or (None, None)), 1
    )
    assert "CPUs in its affinity" in derived.why


@pytest.mark.skipif(
    os.geteuid() != 0 or not (CPU_V1 / "cgroup.procs").exists(),
    reason="needs root and the cgroup v1 cpu hierarchy at /sys/fs/cgroup/cpu",
)
def test_a_process_in_a_cgroup_with_a_one_and_a_half_cpu_quota_starts_one_thread(tmp_path):
    group = CPU_V1 / f"gan-job-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("150000")  # 1.5 CPUs: 1 thread
        enter = f'echo $$ > {group}/cgroup.procs && exec "$@"'
        line = line_of(start_up(tmp_path, "sh", "-c", enter, "sh"), "threads:")
        assert line.startswith("threads: 1 per process ("), line
        assert "cgroup quota 1.5 CPUs" in line, line
    finally:
        group.rmdir()
