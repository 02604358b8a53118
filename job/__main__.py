"""Entry point: `python -m job` / `gan-job` trains (over torchrun when GAN_NPROC_PER_NODE > 1 or
GAN_NNODES > 1); `gan-job --dry-run` (or GAN_DRY_RUN=true) only says what it would do;
`gan-job sample|features|sweep|compare|evaluate|shard ...` are the subcommands."""

from __future__ import annotations

import atexit
import faulthandler
import functools
import importlib
import logging
import os
import signal
import sys

from job.infra import launcher
from job.infra.errors import EXIT_UNEXPECTED, JobError, SettingsError, Stopped

# gan-job SUBCOMMAND ...: the module whose main(argv) runs it (imported only when asked for)
SUBCOMMANDS = {
    "sample": "job.tools.sample",
    "features": "job.tools.features",
    "sweep": "job.tools.sweep",
    "compare": "job.tools.compare",
    "evaluate": "job.tools.evaluate",
    "shard": "job.tools.shard",
    "export": "job.tools.export",
}
DRY_RUN_FLAG = "--dry-run"


def _setup_logging() -> None:
    rank = os.environ.get("RANK")
    prefix = (
        f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    )
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {prefix}%(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    logging.getLogger("botocore").setLevel(logging.WARNING)
    from job.infra.secrets import redact_logs

    redact_logs()


STOP_SIGNALS = launcher.STOP_SIGNALS
_startup_signals: list[int] = []  # taken by _stop_at_once: the first one stops the job


def _stop_at_once(signum, frame) -> None:
    _startup_signals.append(signum)
    name = signal.Signals(signum).name
    if len(_startup_signals) == 1:
        raise Stopped(
            f"stopped by {name} during start-up, before training: nothing new to save; a retry "
            "starts from the last complete checkpoint"
        )
    if len(_startup_signals) == 2:
        logging.getLogger("job").warning("%s again: ignored, the job is already stopping", name)


def _stop_tool(signum, frame) -> None:
    """A subcommand stopped by a signal: raised where it runs, so that its `finally` blocks
    remove its unfinished files; the exit status is the shell's for that signal (128 + it)."""
    name = signal.Signals(signum).name
    stopped = Stopped(f"stopped by {name}: unfinished files removed, nothing more written")
    stopped.exit_code = 128 + signum
    raise stopped


def _ignore_stop_signals() -> None:
    """Interpreter shutdown puts the default handlers back, under which a late SIGTERM would turn
    the exit status the job decided on into 143 (SIGINT: 130, SIGHUP: 129)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _train(dry_run: bool = False) -> int:
    # until the training loop takes SIGTERM/SIGINT over (StopFlag): stop at once, nothing to save
    _startup_signals.clear()
    for sig in launcher.stop_signals():  # those it was started ignoring stay ignored (nohup)
        signal.signal(sig, _stop_at_once)
    atexit.unregister(_ignore_stop_signals)
    atexit.register(_ignore_stop_signals)
    launcher.record_status(None)  # a worker of gan-job's launcher: started
    from job.settings import load_settings

    settings = load_settings()
    if dry_run or settings.dry_run:  # before torchrun: one process, no process group
        from job.tools.dryrun import dry_run as report

        return report(settings)
    if (settings.nproc_per_node > 1 or settings.nnodes > 1) and not launcher.under_torchrun():
        logging.info("starting %d processes on this node", settings.nproc_per_node)
        options = launcher.torchrun_options(
            settings.nproc_per_node,
            settings.nnodes,
            settings.node_rank,
            settings.rdzv_endpoint,
            settings.rdzv_timeout_seconds,
        )
        from job.infra import threads  # torchrun would give each worker OMP_NUM_THREADS=1

        os.environ.setdefault(
            "OMP_NUM_THREADS",
            str(threads.choose(settings.num_threads, settings.nproc_per_node).count),
        )
        return launcher.run_torchrun(options, settings.grace_seconds)
    if launcher.under_torchrun() and not launcher.started_by_launcher():
        if os.environ.get("RANK", "0") == "0":
            logging.warning(
                "started by torchrun itself, which exits 1 whatever failed and kills workers 30 s "
                "after SIGTERM: set GAN_NPROC_PER_NODE / GAN_NNODES and run gan-job instead, for "
                "the exit statuses of the README and GAN_GRACE_SECONDS"
            )
    from job.run.build import build
    from job.run.train import train

    return train(
        functools.partial(build, settings),
        settings.device,
        settings.stall_timeout_seconds,
        settings.pushgateway_url,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help", "help"):
        from job.settings import help_text

        print(help_text())
        return 0
    _setup_logging()
    # kill -QUIT: every thread's stack to stderr (the log), from C, even while the main thread
    # waits in a collective or a C call; the process goes on. The process's own stderr (fd 2):
    # sys.stderr may be a stream without a file descriptor (main() called from Python)
    if sys.__stderr__ is not None:
        faulthandler.register(signal.SIGQUIT, file=sys.__stderr__, all_threads=True, chain=False)
    code = _run(argv)
    launcher.record_status(code)  # a worker of gan-job's launcher: how it ended
    distributed = sys.modules.get("job.infra.distributed")  # not imported: no process group joined
    return distributed.leave(code) if distributed else code


def _run(argv: list[str]) -> int:
    log = logging.getLogger("job")
    try:
        if argv and argv[0] in SUBCOMMANDS:
            for sig in launcher.stop_signals():  # sweep takes them over for its children
                signal.signal(sig, _stop_tool)
            command = importlib.import_module(SUBCOMMANDS[argv[0]])
            return command.main(argv[1:])
        dry_run = argv == [DRY_RUN_FLAG]
        if argv and not dry_run:
            raise SettingsError(
                [f"unknown arguments {argv}: settings are GAN_* variables, see --help"]
            )
        return _train(dry_run)
    except Stopped as exc:
        log.warning("%s", exc)
        return exc.exit_code
    except JobError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except Exception:
        log.exception("unexpected failure")
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
