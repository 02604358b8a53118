"""A link between two network namespaces that can drop every packet silently: a TUN device in
each namespace and this process copying IP packets between them. This kernel has no sch_netem,
nft or iptables; a veth set down is noticed by the kernel at once, a relay that stops copying is
not (the hosts see a silent network, as when a peer loses power). SIGUSR1: drop every packet;
SIGUSR2: copy again. Prints "ready" once both devices exist.

    python tests/tunrelay.py NS_A DEV_A NS_B DEV_B
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import select
import signal
import struct
import sys

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
_libc = ctypes.CDLL(None, use_errno=True)


def enter(namespace: str) -> None:
    """Move this (single-threaded) process into the network namespace `ip netns` named so."""
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {namespace}")
    finally:
        os.close(fd)


def open_tun(name: str) -> int:
    """A TUN device of this name in the current network namespace, as long as the fd is open."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def relay(a: int, b: int) -> None:
    dropping = False

    def drop(signum, frame):
        nonlocal dropping
        dropping = signum == signal.SIGUSR1

    signal.signal(signal.SIGUSR1, drop)
    signal.signal(signal.SIGUSR2, drop)
    other = {a: b, b: a}
    while True:
        for fd in select.select([a, b], [], [])[0]:
            packet = os.read(fd, 65536)
            if not dropping:
                try:
                    os.write(other[fd], packet)
                except OSError:  # the other device is not up (yet): lost, as on a wire
                    pass


def main() -> None:
    ns_a, dev_a, ns_b, dev_b = sys.argv[1:5]
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    enter(ns_a)
    a = open_tun(dev_a)
    enter(ns_b)
    b = open_tun(dev_b)
    _libc.setns(home, CLONE_NEWNET)
    print("ready", flush=True)
    relay(a, b)


if __name__ == "__main__":
    main()
