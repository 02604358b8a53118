"""Nodes of one run that would not train together (issue 42), each as a real gan-job launcher on
127.0.0.1 meeting the other at a c10d rendezvous: nodes that would resume from different
checkpoints, and nodes started with a different dataset, which never met."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from s3server import free_ports

from tests.helpers import REPO, job_env, write_idx

RDZV_TIMEOUT = 120  # s: both nodes start together, so meeting takes a fraction of it


@pytest.fixture
def nodes():
    """start(cwd, env) runs a gan-job launcher; what is still running at the end is killed,
    torchrun's workers too (they run in sessions of their own)."""
    started: list[subprocess.Popen] = []

    def start(cwd: Path, env: dict[str, str]) -> subprocess.Popen:
        env = env | {"PYTHONPATH": str(REPO)}
        started.append(
            subprocess.Popen(
                [sys.executable, "-m", "job"],
                env=env,
                cwd=cwd,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
        return started[-1]

    yield start
    for proc in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            for p in [*psutil.Process(proc.pid).children(recursive=True), proc]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(signal.SIGKILL)


def two_node_env(tmp: Path, rank: int, port: int, **settings: object) -> dict[str, str]:
    return job_env(tmp, GAN_DEVICE="cpu", GAN_NNODES=2, GAN_NODE_RANK=rank, GAN_NPROC_PER_NODE=1,
                   GAN_RDZV_ENDPOINT=f"127.0.0.1:{port}", GAN_RDZV_TIMEOUT_SECONDS=RDZV_TIMEOUT,
                   GAN_STALL_TIMEOUT_SECONDS=60, **settings)  # fmt: skip


def outputs_of(jobs: list[subprocess.Popen], timeout: float) -> list[str]:
    try:
        return [job.communicate(timeout=timeout)[0] for job in jobs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"a node still running after {timeout} s")


def files_under(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()
    }


def test_nodes_that_would_resume_from_different_checkpoints_exit_2_naming_each_start(
    tmp_path, nodes
):
    """Two pods, each with its artifacts on a disk of its own under one GAN_ARTIFACT_URI=runs:
    node 0 had a checkpoint, node 1 none. Once rank 0 resumed at its step and rank 1 started
    at 0; they trained out of step and stored a checkpoint mixed from both, on every restart."""
    write_idx(tmp_path / "data", n=256)
    folders = [tmp_path / f"node{rank}" for rank in (0, 1)]
    for folder in folders:
        folder.mkdir()
    settings = dict(GAN_DATASET="mnist", GAN_RUN_ID="ag", GAN_ARTIFACT_URI="runs")
    first = nodes(folders[0], job_env(tmp_path, GAN_MAX_STEPS=10, GAN_CHECKPOINT_EVERY=10,
                                      GAN_DEVICE="cpu", **settings))  # fmt: skip
    assert outputs_of([first], 300) and first.returncode == 0
    before = [files_under(folder) for folder in folders]
    assert "runs/ag/checkpoints/step-00000010/COMPLETE.json" in before[0]

    port = free_ports(1)[0]
    jobs = [
        nodes(folder, two_node_env(tmp_path, rank, port, GAN_MAX_STEPS=40, **settings))
        for rank, folder in enumerate(folders)
    ]
    outputs = outputs_of(jobs, 300)
    assert [job.returncode for job in jobs] == [2, 2], outputs
    for output in outputs:
        assert "the nodes would start from different checkpoints" in output
        assert f"step 10 of {folders[0] / 'runs' / 'ag'} (marker " in output
        assert f"a fresh start in {folders[1] / 'runs' / 'ag'}" in output
        assert not re.search(r"step \d+/40", output) and "unexpected failure" not in output
    assert [files_under(folder) for folder in folders] == before


def test_nodes_started_with_different_datasets_meet_and_exit_2_naming_it(tmp_path, nodes):
    """The run id (<dataset>-<model> by default) was the rendezvous id: nodes started with a
    different dataset, run id, model or conditioning never met, and both exited 10 naming
    nothing after GAN_RDZV_TIMEOUT_SECONDS (900 s by default)."""
    write_idx(tmp_path / "data", n=256)
    port = free_ports(1)[0]
    t0 = time.monotonic()
    jobs = [
        nodes(REPO, two_node_env(tmp_path, rank, port, GAN_DATASET=dataset, GAN_MAX_STEPS=40))
        for rank, dataset in enumerate(("mnist", "fashion-mnist"))
    ]
    outputs = outputs_of(jobs, RDZV_TIMEOUT + 120)
    assert [job.returncode for job in jobs] == [2, 2], outputs
    assert time.monotonic() - t0 < RDZV_TIMEOUT, outputs
    for output in outputs:
        assert (
            'GAN_DATASET differs between the nodes: "mnist" on node 0, "fashion-mnist" on node 1'
            in output
        )
        assert not re.search(r"step \d+/40", output)
