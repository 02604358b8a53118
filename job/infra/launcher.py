"""gan-job over torchrun: the grace period after SIGTERM, and the exit status of the job.

torchrun exits 1 whenever a worker fails, whatever the worker returned, and gives workers 30 s
after SIGTERM. Started by gan-job (GAN_NPROC_PER_NODE > 1, or GAN_NNODES > 1), torchrun runs
with --shutdown-timeout GAN_GRACE_SECONDS + SHUTDOWN_MARGIN, and each worker records its exit status in a file of a folder this launcher makes (STATUS_DIR_ENV). When torchrun
is done, the node exits with the status of its first worker that failed (README: Exit status).

torch's own error files (TORCHELASTIC_ERROR_FILE, @record) carry the exit code of the failure
torchrun saw first, but they order failures by whole seconds (so the peer that failed because
another did often wins), are written for exceptions only, and not at all when torchrun is
stopped by a signal: they cannot tell 75 from 10.

This module imports no torch: the launcher process stays small.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from job.infra.errors import EXIT_OK, EXIT_PREEMPTED, EXIT_STOPPED_UNSAVED

log = logging.getLogger(__name__)

RDZV_ID = "gan-job"  # torchrun's --rdzv-id, the same for every run (torchrun_options)
STATUS_DIR_ENV = "GANJOB_STATUS_DIR"  # not GAN_*: that namespace is the user's settings
SHUTDOWN_MARGIN = 5  # s between the workers' own deadline and torchrun's SIGKILL
KILL_MARGIN = 3  # s after torchrun's SIGKILL is due, when this launcher kills torchrun and workers
AGENT_MARGIN = 10  # s torchrun may run on once every worker has ended and one of them failed
_STOPPED = (EXIT_STOPPED_UNSAVED, EXIT_PREEMPTED)
# the signals that stop the job like a preemption (checkpoint, exit 75): SIGHUP is a terminal or
# SSH session that dropped. SIGQUIT does not stop it: each worker writes every thread's stack.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# the stop signals the launcher was started ignoring, for its workers: torchrun, in between,
# handles them all, so the workers do not inherit SIG_IGN
IGNORED_ENV = "GANJOB_IGNORED_SIGNALS"


@dataclass(frozen=True)
class WorkerStatus:
    """One worker's record: written when it starts (code None) and again when it exits."""

    rank: int
    restart: int  # TORCHELASTIC_RESTART_COUNT: torchrun's attempt
    code: int | None  # None: started and never reported (killed: SIGKILL, OOM killer...)
    time: float  # time.monotonic(): one clock for the node, which a wall-clock jump leaves alone
    pid: int = 0  # the worker's process, which torchrun starts in a session of its own


def stop_signals() -> list[signal.Signals]:
    """STOP_SIGNALS but those this process ignores, which stay ignored: a job started under
    nohup (SIGHUP ignored) trains on when its terminal goes. A worker of gan-job's launcher
    first ignores those its launcher was started ignoring (IGNORED_ENV)."""
    for name in filter(None, os.environ.get(IGNORED_ENV, "").split(",")):
        signal.signal(signal.Signals[name], signal.SIG_IGN)
    return [sig for sig in STOP_SIGNALS if signal.getsignal(sig) != signal.SIG_IGN]


def torchrun_options(
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    rdzv_timeout_seconds: int = 900,
) -> list[str]:
    """torchrun's options for nproc_per_node workers here; with nnodes > 1, one agent per node
    meets the others at node 0's c10d store.

    The rendezvous id is the same for every run (RDZV_ID): node 0's endpoint alone is what
    keeps runs apart (each workload has its own). An id from the settings (it was the run id,
    <dataset>-<model> by default) kept nodes started with different settings from ever meeting:
    they waited out GAN_RDZV_TIMEOUT_SECONDS and exited 10 naming nothing. Met, they compare
    their settings and exit 2 naming those that differ (agree.agree_settings).

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
        f"--rdzv-id={RDZV_ID}",
        f"--rdzv-conf=is_host={is_host},join_timeout={timeout},read_timeout={timeout}",
        "--max-restarts=0",
    ]


def torchrun_argv(torchrun_args: list[str], grace_seconds: int) -> list[str]:
    """torchrun with these options over `python -m job`; workers still stopping GAN_GRACE_SECONDS
    after SIGTERM are killed SHUTDOWN_MARGIN s later (a later --shutdown-timeout wins)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--shutdown-timeout={grace_seconds + SHUTDOWN_MARGIN}",
        *torchrun_args,
        "-m",
        "job",
    ]


def run_torchrun(torchrun_args: list[str], grace_seconds: int) -> int:
    """Run torchrun, pass the first stop signal (stop_signals) on to it (the workers ignore later
    ones too) and SIGQUIT to its workers, and return the job's exit status."""
    with tempfile.TemporaryDirectory(prefix="gan-job-status-") as folder:
        argv = torchrun_argv(torchrun_args, grace_seconds)
        received: list[int] = []
        signalled_at: list[float] = []
        child: subprocess.Popen | None = None

        def forward(signum, frame):
            received.append(signum)
            signalled_at.append(time.monotonic())
            if len(received) > 1:  # a second signal breaks torchrun's wait for its workers
                if len(received) == 2:
                    name = signal.Signals(signum).name
                    log.warning("%s again: ignored, the workers are already stopping", name)
                return
            if child is not None:
                child.send_signal(signum)

        handled = stop_signals()
        for sig in handled:
            signal.signal(sig, forward)
        signal.signal(signal.SIGQUIT, lambda signum, frame: dump_workers(Path(folder)))
        log.info("starting torchrun: %s", " ".join(argv))
        error_file = os.path.join(folder, "torchrun.error")  # the agent's failure (JSON)
        ignored = ",".join(sig.name for sig in STOP_SIGNALS if sig not in handled)
        env = {**os.environ, STATUS_DIR_ENV: folder, "TORCHELASTIC_ERROR_FILE": error_file,
               IGNORED_ENV: ignored}  # fmt: skip
        child = subprocess.Popen(argv, env=env, start_new_session=True)
        if received:  # signalled while torchrun was being started
            child.send_signal(received[0])
        deadline = grace_seconds + SHUTDOWN_MARGIN + KILL_MARGIN
        torchrun_code = wait_or_kill(child, signalled_at, deadline, Path(folder))
        statuses = read_statuses(Path(folder))
        rendezvous_broke = rendezvous_failed(error_file)
    code, why = job_status(torchrun_code, statuses, bool(received), rendezvous_broke)
    log.log(logging.INFO if code == EXIT_OK else logging.WARNING, "exit %d: %s", code, why)
    return code


def wait_or_kill(
    child: subprocess.Popen, signalled_at: list[float], deadline: float, folder: Path
) -> int:
    """torchrun's exit status. torchrun and every worker are killed when torchrun is still
    running deadline seconds after the first signal, or AGENT_MARGIN s after all its workers
    ended with a failure: its agent hung on a rendezvous store or a peer that is gone."""
    failed_at = None
    while True:
        try:
            return child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            now = time.monotonic()
            if signalled_at and now - signalled_at[0] > deadline:
                why = f"{deadline:g} s after the signal (GAN_GRACE_SECONDS + {SHUTDOWN_MARGIN + KILL_MARGIN} s)"
                break
            if failed_at is None and workers_failed(read_statuses(folder)):
                failed_at = now
            if failed_at is not None and now - failed_at > AGENT_MARGIN:
                why = f"{AGENT_MARGIN} s after its workers ended with a failure"
                break
    log.warning("torchrun still running %s: killing it and its workers", why)
    kill_group(child.pid)
    for status in read_statuses(folder):
        if status.code is None and status.pid:
            kill_group(status.pid)
    return child.wait()


def dump_workers(folder: Path) -> None:
    """SIGQUIT to every running worker, which writes its threads' stacks (faulthandler). Not to
    torchrun: its agent takes SIGQUIT as a death signal and kills the workers with it."""
    pids = [s.pid for s in read_statuses(folder) if s.code is None and s.pid]
    log.warning("SIGQUIT: passed on to the workers %s, which write every thread's stack", pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGQUIT)
        except (ProcessLookupError, PermissionError):
            pass


def workers_failed(statuses: list[WorkerStatus]) -> bool:
    """Every worker that started has ended, and not all of them finished (finished, torchrun
    waits for the other nodes to finish too)."""
    codes = [s.code for s in statuses]
    return bool(codes) and None not in codes and any(c != EXIT_OK for c in codes)


def kill_group(pid: int) -> None:
    """SIGKILL to the process group pid leads (a process started in a session of its own)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def job_status(
    torchrun_code: int,
    statuses: list[WorkerStatus],
    signalled: bool,
    rendezvous_broke: bool = False,
) -> tuple[int, str]:
    """The node's exit status and why, from torchrun's and its workers' (latest attempt).

    The earliest failure wins over everything else: a peer's failure or a stop that followed
    it is its consequence. A stop counts as stored (75) only when every worker says so.
    """
    if torchrun_code == 0:
        return EXIT_OK, "every worker finished"
    latest = max((s.restart for s in statuses), default=0)
    statuses = sorted((s for s in statuses if s.restart == latest), key=lambda s: s.time)
    failed = [s for s in statuses if s.code not in (None, EXIT_OK, *_STOPPED)]
    if failed:
        first = failed[0]
        return first.code, f"rank {first.rank} failed first, with exit {first.code}"
    if statuses and all(s.code == EXIT_PREEMPTED for s in statuses):
        return EXIT_PREEMPTED, "stopped once the checkpoint of the stop step was stored"
    killed = [s.rank for s in statuses if s.code is None]
    if killed:
        cause = "after the grace period" if signalled else "by a signal (another node failed?)"
        return EXIT_STOPPED_UNSAVED, f"ranks {killed} were killed {cause} before they reported"
    if signalled:
        return EXIT_STOPPED_UNSAVED, "stopped by a signal with no checkpoint of where it stopped"
    if any(s.code in _STOPPED for s in statuses):
        return EXIT_STOPPED_UNSAVED, "stopped: a process of the job failed (see the other nodes)"
    if rendezvous_broke:
        return EXIT_STOPPED_UNSAVED, "the node group broke at the rendezvous (a node lost or late)"
    return torchrun_code, f"torchrun failed (exit {torchrun_code}); no worker reported a failure"


def rendezvous_failed(error_file: str) -> bool:
    """Whether torchrun's agent stopped on a rendezvous error (a node that never came, or node
    0's store gone with its pod), going by the error file torchrun writes on its own failure."""
    try:
        with open(error_file) as f:
            message = json.load(f)["message"]["message"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return message.startswith("Rendezvous")


def read_statuses(folder: Path) -> list[WorkerStatus]:
    return [WorkerStatus(**json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))]


def record_status(code: int | None) -> None:
    """This worker's status, for the launcher that started torchrun (nothing without one)."""
    folder = os.environ.get(STATUS_DIR_ENV)
    if not folder or "RANK" not in os.environ:
        return
    status = WorkerStatus(
        rank=int(os.environ["RANK"]),
        restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        code=code,
        time=time.monotonic(),
        pid=os.getpid(),
    )
    path = Path(folder, f"attempt-{status.restart:03d}-rank-{status.rank:05d}.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status.__dict__))
    os.replace(tmp, path)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def started_by_launcher() -> bool:
    return STATUS_DIR_ENV in os.environ
