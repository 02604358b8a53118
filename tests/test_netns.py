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
            # no name server inside: a lookup torch makes fails at once, not after 20 s
            Path("/etc/netns", ns, "resolv.conf").write_text("nameserver 127.0.0.1\n")
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        self.connect()

    def connect(self) -> None:
        ip("link", "add", self.ends[0], "netns", self.ns[0], "type", "veth",
           "peer", "name", self.ends[1], "netns", self.ns[1])  # fmt: skip
        for ns, end, address in zip(self.ns, self.ends, self.addresses, strict=True):
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", end)
            ip("-n", ns, "link", "set", end, "up")

    def cut(self) -> None:
        ip("-n", self.ns[0], "link", "set", self.ends[0], "down")

    def restore(self) -> None:
        ip("-n", self.ns[0], "link", "set", self.ends[0], "up")

    def give_up_after_retries(self, retries: int) -> None:
        """net.ipv4.tcp_retries2 in both namespaces: TCP's give-up on a silent peer (15 by
        default: about 15 minutes)."""
        for ns in self.ns:
            subprocess.run(["ip", "netns", "exec", ns, "sh", "-c",
                            f"echo {retries} > /proc/sys/net/ipv4/tcp_retries2"], check=True)  # fmt: skip

    def remove(self) -> None:
        for ns in self.ns:  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns", ns), ignore_errors=True)


class SilentLink(Link):
    """The two namespaces joined by a TUN device each and tests/tunrelay.py copying packets
    between them; cut() drops every packet without a word to either kernel."""

    relay: subprocess.Popen | None = None

    def connect(self) -> None:
        self.relay = subprocess.Popen(
            [sys.executable, str(REPO / "tests/tunrelay.py"), self.ns[0], self.ends[0],
             self.ns[1], self.ends[1]], stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.relay.stdout.readline().strip() == "ready"
        for i, (ns, end) in enumerate(zip(self.ns, self.ends, strict=True)):
            ip("-n", ns, "addr", "add", self.addresses[i], "peer", self.addresses[1 - i],
               "dev", end)  # fmt: skip
            ip("-n", ns, "link", "set", end, "up")

    def cut(self) -> None:
        self.relay.send_signal(signal.SIGUSR1)

    def restore(self) -> None:
        self.relay.send_signal(signal.SIGUSR2)

    def remove(self) -> None:
        if self.relay is not None:  # its devices go with it
            self.relay.kill()
            self.relay.wait()
        super().remove()


@pytest.fixture
def link() -> Iterator[Link]:
    yield from made(Link())


@pytest.fixture
def silent_link() -> Iterator[Link]:
    yield from made(SilentLink())


def made(link: Link) -> Iterator[Link]:
    try:
        link.create()
        yield link
    finally:
        link.remove()


class Node:
    """One pod: gan-job in its own network namespace."""

    def __init__(self, tmp: Path, link: Link, index: int, **settings: object):
        self.ns = link.ns[index]
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
        """SIGKILL the whole pod: every process in its namespace (gan-job's launcher starts
        torchrun and the workers in sessions of their own)."""
        found = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True)
        for pid in [self.proc.pid, *map(int, found.stdout.split())]:
            try:
                os.kill(pid, signal.SIGKILL)
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


def fault_then_resume(tmp: Path, link: Link, fault) -> tuple[list[int], list[str]]:
    """Train the pair until its checkpoint of step 30 is stored (the progress line of step 30
    comes before the checkpoint's collectives, which a fault right after it can stop) and call
    fault(nodes): both nodes must end within BOUND,
    none as an unexpected failure (1), leaving a complete checkpoint that a restarted pair
    resumes from. Returns the nodes' exit statuses and output after the fault."""
    write_idx(tmp / "data", n=512)
    nodes = pair(tmp, link, GAN_MAX_STEPS=100000)
    try:
        wait_for("checkpoint at step 30 stored", nodes)
        fault(nodes)
        codes, seconds = exit_codes(nodes, timeout=BOUND + 30)
    finally:
        for n in nodes:
            n.kill()
    outputs = [n.output() for n in nodes]
    assert seconds < BOUND, outputs
    assert all("unexpected failure" not in o for o in outputs), outputs
    steps = complete_steps(tmp / "runs" / "net")
    assert steps and steps[-1] >= 30
    link.restore()
    nodes = pair(tmp, link, GAN_MAX_STEPS=steps[-1] + 10)
    try:
        again, _ = exit_codes(nodes, timeout=240)
    finally:
        for n in nodes:
            n.kill()
    assert again == [0, 0], [n.output()[-3000:] for n in nodes]
    assert any(f"resumed from step {steps[-1]}" in n.output() for n in nodes)
    return codes, outputs


def test_a_cut_link_ends_both_nodes_with_10_and_the_restarted_pair_resumes(tmp_path, link):
    codes, outputs = fault_then_resume(tmp_path, link, lambda nodes: link.cut())
    assert codes == [10, 10], outputs


@pytest.mark.parametrize("tcp_retries2", [None, 3], ids=["tcp-default", "tcp_retries2=3"])
def test_a_network_that_drops_every_packet_ends_both_nodes_with_10_and_the_pair_resumes(
    tmp_path, silent_link, tcp_retries2
):
    """No reset, no unreachable route: the hosts hear nothing. With TCP's default give-up
    (about 15 minutes) the process group's timeout and the watchdog end the wait; with
    tcp_retries2=3 gloo's sockets fail first ("Connection timed out"): a lost peer too, not 1."""
    if tcp_retries2 is not None:
        silent_link.give_up_after_retries(tcp_retries2)
    codes, outputs = fault_then_resume(tmp_path, silent_link, lambda nodes: silent_link.cut())
    assert codes == [10, 10], outputs
    if tcp_retries2 is not None:
        assert any("Connection timed out" in o for o in outputs), outputs


def test_a_killed_node_ends_the_other_with_10_and_the_pair_resumes(tmp_path, link):
    """Node 1's whole process tree SIGKILLed (its host stays up and resets the connections)."""
    codes, outputs = fault_then_resume(tmp_path, link, lambda nodes: nodes[1].kill())
    assert codes == [10, -signal.SIGKILL], outputs
    assert "another process of the job failed or is gone" in outputs[0] or "exit 10" in outputs[0]


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
