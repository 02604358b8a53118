"""Entry point: `python -m job` / `gan-job` trains; `gan-job sample ...` samples a generator."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from job.errors import EXIT_UNEXPECTED, JobError, SettingsError


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
    from job.settings import redact_logs

    redact_logs()


def _train() -> int:
    from job import distributed
    from job.settings import load_settings

    settings = load_settings()
    if settings.nproc_per_node > 1 and not distributed.under_torchrun():
        return _run_torchrun(settings.nproc_per_node)
    from job.train import train

    return train(settings)


def _run_torchrun(nproc: int) -> int:
    """torchrun with nproc workers; SIGTERM/SIGINT are passed on (torchrun passes them to the
    workers, which checkpoint) and a run stopped that way exits 75 (retry), like one process."""
    from job import distributed
    from job.errors import EXIT_PREEMPTED

    argv = distributed.torchrun_argv(nproc)
    logging.info("starting %d processes: %s", nproc, " ".join(argv))
    child = subprocess.Popen(argv)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    code = child.wait()
    return EXIT_PREEMPTED if received and code != 0 else code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help", "help"):
        from job.settings import help_text

        print(help_text())
        return 0
    _setup_logging()
    log = logging.getLogger("job")
    try:
        if argv and argv[0] == "sample":
            from job.sample import main as sample_main

            return sample_main(argv[1:])
        if argv and argv[0] == "features":
            from job.features import main as features_main

            return features_main(argv[1:])
        if argv:
            raise SettingsError(
                [f"unknown arguments {argv}: settings are GAN_* variables, see --help"]
            )
        return _train()
    except JobError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except Exception:
        log.exception("unexpected failure")
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
