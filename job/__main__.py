"""Entry point: `python -m job` / `gan-job` trains; `gan-job sample ...` samples a generator."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING

from job.errors import EXIT_UNEXPECTED, JobError, SettingsError

if TYPE_CHECKING:
    from job.settings import Settings


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


def _train() -> int:
    from job import distributed
    from job.settings import load_settings

    settings = load_settings()
    if (settings.nproc_per_node > 1 or settings.nnodes > 1) and not distributed.under_torchrun():
        return _run_torchrun(settings)
    from job.train import train

    return train(settings)


def _run_torchrun(settings: Settings) -> int:
    """torchrun; SIGTERM/SIGINT are passed on (torchrun passes them to the workers, which
    checkpoint) and a run stopped that way exits 75 (retry), like one process. A node group
    that broke at the rendezvous (a node lost, or one that never came) exits 10 (retry)."""
    from job import distributed
    from job.errors import EXIT_PREEMPTED, EXIT_STOPPED_UNSAVED

    options = distributed.torchrun_options(
        settings.nproc_per_node,
        settings.nnodes,
        settings.node_rank,
        settings.rdzv_endpoint,
        settings.resolved_run_id,
        settings.rdzv_timeout_seconds,
    )
    argv = distributed.torchrun_argv(options)
    logging.info("starting %d processes: %s", settings.nproc_per_node, " ".join(argv))
    with tempfile.TemporaryDirectory(prefix="gan-job-torchrun-") as scratch:
        error_file = os.path.join(scratch, "error.json")  # torchrun's own failure, if any
        child = subprocess.Popen(argv, env={**os.environ, "TORCHELASTIC_ERROR_FILE": error_file})
        received: list[int] = []

        def forward(signum, frame):
            received.append(signum)
            child.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)
        code = child.wait()
        if received and code != 0:
            return EXIT_PREEMPTED
        if code != 0 and distributed.rendezvous_failed(error_file):
            logging.error("the node group broke at the rendezvous: exit for a retry of the group")
            return EXIT_STOPPED_UNSAVED
        return code


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
        if argv and argv[0] == "sweep":
            from job.sweep import main as sweep_main

            return sweep_main(argv[1:])
        if argv and argv[0] == "compare":
            from job.compare import main as compare_main

            return compare_main(argv[1:])
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
