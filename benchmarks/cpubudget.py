"""Run a command and stop it with SIGTERM once its process tree has used BUDGET CPU-seconds.

    python benchmarks/cpubudget.py BUDGET_S LOGFILE -- COMMAND...

A budget of CPU time, not wall time, keeps runs comparable on a shared, loaded machine
(docs/quality.md, "Color at 32 px"). The job answers SIGTERM with a checkpoint and exit 75, so
a run stopped this way is evaluated like any other. The command's output goes to LOGFILE, and a
last line `CPUBUDGET cpu_s=... wall_s=... rc=... sigterm=...`.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """user + sys of root and its descendants (their children that exited included)."""
    children: dict[int, list[int]] = {}
    seconds: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(name), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        seconds[pid] = sum(int(v) for v in fields[11:15]) / TICK  # utime stime cutime cstime
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += seconds.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


def main(argv: list[str]) -> int:
    budget, log, command = float(argv[0]), argv[1], argv[argv.index("--") + 1 :]
    start = time.monotonic()
    with open(log, "a") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        sent = False
        while proc.poll() is None:
            time.sleep(1)
            if not sent and tree_cpu_seconds(proc.pid) >= budget:
                proc.send_signal(signal.SIGTERM)
                sent = True
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        out.write(
            f"\nCPUBUDGET cpu_s={used.ru_utime + used.ru_stime:.1f} "
            f"wall_s={time.monotonic() - start:.1f} rc={proc.returncode} sigterm={sent}\n"
        )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
