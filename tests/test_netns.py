"""Two nodes on two real network hosts: a network namespace each, joined by a veth pair whose
addresses exist only inside them. Each node is a real gan-job launcher with the JobSet's
environment (GAN_NNODES=2, node 0 hosting the rendezvous). Unlike 127.0.0.1, where a dead
process always has a live host to reset its connections, a link set down leaves every
connection silent: only the process group's timeout and the watchdog end the wait.
Needs root (CI runs as root); skipped, saying so, elsewhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, job_env, write_idx
from tests.test_multinode import complete_steps, manifest_env

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="network namespaces need root and iproute2's ip (CI runs as root)",
)
PORT = 29500
STALL = 10  # GAN_STALL_TIMEOUT_SECONDS of these runs
# after the cut: the stall timeout, torchrun's fixed 30 s to stop a node's other processes, exiting
BOUND = STALL + 30 + 15


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Link:
    """Namespaces a and b joined by veth ends va (10.213.N.1) and vb (10.213.N.2)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns = (f"gj-{tag}-a", f"gj-{tag}-b")
        self.ends = (f"gj{tag}a", f"gj{tag}b")
        net = int(tag, 16) % 250 + 1
        self.addresses = (f"10.213.{net}.1", f"10.213.{net}.2")
        self.hosts = (f"gj-{tag}-node-0", f"gj-{tag}-node-1")  # torchrun ranks nodes by name

    def create(self) -> None:
        hosts = "".join(f"{a} {h}\n" for a, h in zip(self.addresses, self.hosts, strict=True))
        for ns in self.ns:  # ip netns exec mounts /etc/netns/NS/hosts on /etc/hosts
            Path("/etc/netns", ns).mkdir(parents=True, exist_ok=True)
            Path("/etc/netns", ns, "hosts").write_text(f"127.0.0.1 localhost\n{hosts}")
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", self.ends[0], "netns", self.ns[0], "type", "veth",
           "peer", "name", self.ends[1], "netns", self.ns[1])  # fmt: skip
        for ns, end, address in zip(self.ns, self.ends, self.addresses, strict=True):
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", end)
            ip("-n", ns, "link", "set", end, "up")

    def cut(self) -> None:
        ip("-n", self.ns[0], "link", "set", self.ends[0], "down")

    def restore(self) -> None:
        ip("-n", self.ns[0], "link", "set", self.ends[0], "up")

    def remove(self) -> None:
        for ns in self.ns:  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns", ns), ignore_errors=True)


@pytest.fixture
def link() -> Iterator[Link]:
    link = Link()
    try:
        link.create()
        yield link
    finally:
        link.remove()


class Node:
    """One pod: gan-job in its namespace, in a session of its own (killed as a whole)."""

    def __init__(self, tmp: Path, link: Link, index: int, **settings: object):
        settings = {"GAN_STALL_TIMEOUT_SECONDS": STALL, **settings}
        env = job_env(tmp, GAN_DATASET="mnist", GAN_RUN_ID="net", GAN_CHECKPOINT_EVERY=10,
                      GAN_LOG_EVERY=10, GAN_GRACE_SECONDS=3, GAN_RUN_LEASE_SECONDS=4,
                      **settings)  # fmt: skip
        env |= manifest_env(index, PORT)
        env |= {k: str(v) for k, v in settings.items()}
        env |= {"GAN_RDZV_ENDPOINT": f"{link.addresses[0]}:{PORT}", "PYTHONPATH": str(REPO),
                "PYTHONUNBUFFERED": "1", "GAN_RDZV_TIMEOUT_SECONDS": "60"}  # fmt: skip
        self.log = tmp / f"node{index}-{time.monotonic_ns()}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", link.ns[index], "unshare", "--uts", "sh", "-c",
                 f'hostname {link.hosts[index]} && exec "$0" -m job', sys.executable],
                env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def wait_for(what: str, nodes: list[Node], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while what not in nodes[0].output():
        running = all(n.proc.poll() is None for n in nodes)
        assert running and time.monotonic() < deadline, [n.output()[-3000:] for n in nodes]
        time.sleep(0.3)


def exit_codes(nodes: list[Node], timeout: float) -> tuple[list[int], float]:
    """Each node's exit status, and the seconds until the last one ended."""
    t0 = time.monotonic()
    try:
        codes = [n.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0))) for n in nodes]
    except subprocess.TimeoutExpired:
        raise AssertionError([n.output()[-3000:] for n in nodes]) from None
    return codes, time.monotonic() - t0


def pair(tmp: Path, link: Link, **settings: object) -> list[Node]:
    return [Node(tmp, link, i, **settings) for i in (0, 1)]


def test_a_cut_link_ends_both_nodes_with_10_and_the_restarted_pair_resumes(tmp_path, link):
    write_idx(tmp_path / "data", n=512)
    nodes = pair(tmp_path, link, GAN_MAX_STEPS=100000)
    try:
        wait_for("step 30/", nodes)
        link.cut()
        codes, seconds = exit_codes(nodes, timeout=BOUND + 30)
    finally:
        for n in nodes:
            n.kill()
    outputs = [n.output() for n in nodes]
    assert codes == [10, 10], outputs
    assert seconds < BOUND, outputs
    assert all("unexpected failure" not in o for o in outputs)
    steps = complete_steps(tmp_path / "runs" / "net")
    assert steps and steps[-1] >= 30
    link.restore()
    nodes = pair(tmp_path, link, GAN_MAX_STEPS=steps[-1] + 10)
    try:
        codes, _ = exit_codes(nodes, timeout=240)
    finally:
        for n in nodes:
            n.kill()
    assert codes == [0, 0], [n.output()[-3000:] for n in nodes]
    assert any(f"resumed from step {steps[-1]}" in n.output() for n in nodes)


def test_a_link_cut_for_20_seconds_and_restored_goes_on_training(tmp_path, link):
    write_idx(tmp_path / "data", n=512)
    nodes = pair(tmp_path, link, GAN_MAX_STEPS=100000, GAN_STALL_TIMEOUT_SECONDS=90)
    try:
        wait_for("step 30/", nodes)
        link.cut()
        time.sleep(20)
        before = nodes[0].output().count(" step ")
        link.restore()
        deadline = time.monotonic() + 80
        while nodes[0].output().count(" step ") < before + 3:
            assert all(n.proc.poll() is None for n in nodes), [n.output()[-3000:] for n in nodes]
            assert time.monotonic() < deadline, [n.output()[-3000:] for n in nodes]
            time.sleep(0.5)
        for n in nodes:
            n.proc.send_signal(signal.SIGTERM)
        codes, _ = exit_codes(nodes, timeout=60)
    finally:
        for n in nodes:
            n.kill()
    assert codes == [75, 75], [n.output()[-3000:] for n in nodes]
