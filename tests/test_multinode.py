"""Multi-node runs as k8s/jobset.yaml starts them: each "pod" is a process group on 127.0.0.1
running the container's command with the environment the manifest gives that pod. Only what
differs between a pod and a local process is substituted: the rendezvous host (pod 0's DNS name)
becomes 127.0.0.1 with a free port, GPUs become one CPU process, and the run itself is tiny.

GAN_TEST_RDZV_DELAY sets how long pod 1 runs before pod 0 starts (default 5 s). The issue's case,
a delay longer than torch's default 60 s store timeout, is `GAN_TEST_RDZV_DELAY=75`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from job.infra import launcher
from job.infra.errors import EXIT_STOPPED_UNSAVED, SettingsError
from job.settings import load_settings
from tests.helpers import REPO, job_env, write_idx

JOBSET = REPO / "k8s" / "jobset.yaml"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
DELAY = float(os.environ.get("GAN_TEST_RDZV_DELAY", "5"))
# torch's own read_timeout: how long a pod would wait for pod 0's store if nothing set it
TORCH_DEFAULT_STORE_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jobset_container() -> tuple[dict, dict]:
    (jobset,) = [d for d in yaml.safe_load_all(JOBSET.read_text()) if d]
    (rjob,) = jobset["spec"]["replicatedJobs"]
    (container,) = rjob["template"]["spec"]["template"]["spec"]["containers"]
    return jobset, container


def manifest_env(index: int, rdzv_port: int) -> dict[str, str]:
    """The GAN_* variables the JobSet gives pod `index`, made to run here."""
    jobset, container = jobset_container()
    env = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:  # the downward API: this pod's completion index
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == COMPLETION_INDEX, var
            env[var["name"]] = str(index)
    name = jobset["metadata"]["name"]
    pod0 = f"{name}-{jobset['spec']['replicatedJobs'][0]['name']}-0-0.{name}"
    host, port = env["GAN_RDZV_ENDPOINT"].rsplit(":", 1)
    assert host == pod0 and int(port) in {p["containerPort"] for p in container["ports"]}
    env["GAN_RDZV_ENDPOINT"] = f"127.0.0.1:{rdzv_port}"
    env.update(GAN_DEVICE="cpu", GAN_NPROC_PER_NODE="1", GAN_METRICS_PORT=str(free_port()))
    return env


class Pod:
    """One pod: the container's command in its own process group, killable as a whole."""

    def __init__(self, tmp: Path, index: int, rdzv_port: int, **settings: object):
        _, container = jobset_container()
        # no command or args: the image's ENTRYPOINT, tini -- gan-job, i.e. python -m job
        assert "command" not in container and "args" not in container
        env = job_env(tmp, **settings) | manifest_env(index, rdzv_port)
        env["PYTHONPATH"] = str(REPO)
        for key, value in settings.items():  # the test's own values win (a shorter timeout)
            env[key] = str(value)
        self.log = tmp / f"pod{index}-{time.monotonic_ns()}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "job"], env=env, cwd=REPO, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"pod still running after {timeout} s:\n{self.output()}")

    def kill(self) -> None:
        """The node is gone: every process of the pod dies at once, torchrun's workers too
        (they run in sessions of their own, outside the launcher's process group)."""
        if self.proc.poll() is None:
            pod = psutil.Process(self.proc.pid)
            for proc in [pod, *pod.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text()[-6000:]


@pytest.fixture
def pods(tmp_path):
    started: list[Pod] = []

    def start(index: int, port: int, **settings: object) -> Pod:
        started.append(Pod(tmp_path, index, port, **settings))
        return started[-1]

    yield start
    for pod in started:
        pod.kill()


def complete_steps(run: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in run.glob("checkpoints/*/COMPLETE.json"))


def test_a_multinode_run_needs_node_0s_endpoint_and_a_rank_below_the_node_count():
    with pytest.raises(SettingsError, match="GAN_NNODES=2 needs GAN_RDZV_ENDPOINT"):
        load_settings({"GAN_NNODES": "2"})
    with pytest.raises(SettingsError, match="GAN_RDZV_ENDPOINT='pod-0'"):
        load_settings({"GAN_NNODES": "2", "GAN_RDZV_ENDPOINT": "pod-0"})  # no port
    with pytest.raises(SettingsError, match="GAN_NODE_RANK=2 is not below GAN_NNODES=2"):
        load_settings({"GAN_NNODES": "2", "GAN_NODE_RANK": "2", "GAN_RDZV_ENDPOINT": "a:1"})


def test_one_node_stays_standalone_and_many_wait_for_each_other_as_long_as_set():
    assert "--standalone" in launcher.torchrun_options(8)
    options = launcher.torchrun_options(8, 4, 0, "pod-0.svc:29500", 900)
    assert (
        "--standalone" not in options and "--nnodes=4" in options and "--max-restarts=0" in options
    )
    assert "--rdzv-conf=is_host=true,join_timeout=900,read_timeout=900" in options
    options = launcher.torchrun_options(8, 4, 3, "pod-0.svc:29500", 60)
    assert "--rdzv-conf=is_host=false,join_timeout=60,read_timeout=60" in options


def test_a_pod_alone_gives_up_at_the_rendezvous_timeout_with_a_retryable_status(tmp_path, pods):
    """Pod 1 waits for pod 0's store as long as GAN_RDZV_TIMEOUT_SECONDS says, not torch's 60 s,
    and then exits 10 (retry the group), not 1."""
    write_idx(tmp_path / "data", n=64)
    started = time.monotonic()
    pod = pods(1, free_port(), GAN_DATASET="mnist", GAN_RDZV_TIMEOUT_SECONDS=3)
    code = pod.wait(TORCH_DEFAULT_STORE_TIMEOUT + 60)
    assert code == EXIT_STOPPED_UNSAVED, pod.output()
    assert time.monotonic() - started < TORCH_DEFAULT_STORE_TIMEOUT, pod.output()
    assert "broke at the rendezvous" in pod.output()


def test_pods_started_apart_meet_and_a_lost_pod_0_restarts_the_group_from_its_checkpoint(
    tmp_path, pods
):
    write_idx(tmp_path / "data", n=256)
    run = tmp_path / "runs" / "mn"
    settings = dict(GAN_DATASET="mnist", GAN_RUN_ID="mn", GAN_CHECKPOINT_EVERY=4)

    # (a) pod 1 starts first (pod 0's image is still being pulled) and waits for pod 0
    port = free_port()
    pod1 = pods(1, port, GAN_MAX_STEPS=100000, **settings)
    time.sleep(DELAY)
    assert pod1.proc.poll() is None, pod1.output()
    pod0 = pods(0, port, GAN_MAX_STEPS=100000, **settings)
    deadline = time.monotonic() + 120
    while not complete_steps(run):
        assert pod0.proc.poll() is None and pod1.proc.poll() is None, pod0.output()
        assert time.monotonic() < deadline, pod1.output()
        time.sleep(0.2)

    # (b) pod 0's node dies, and the rendezvous store with it: pod 1 exits fast, retryably
    pod0.kill()
    killed = time.monotonic()
    assert pod1.wait(60) == EXIT_STOPPED_UNSAVED, pod1.output()
    assert time.monotonic() - killed < 30
    newest = complete_steps(run)[-1]

    # the group restarts together and resumes from the newest complete checkpoint
    port = free_port()
    again = [pods(i, port, GAN_MAX_STEPS=newest + 4, **settings) for i in (0, 1)]
    for pod in again:
        assert pod.wait(180) == 0, pod.output()
        assert f"resumed from step {newest} " in pod.output()
    assert complete_steps(run)[-1] == newest + 4
