"""Failures the job reports with their own exit status (documented in README.md)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_SETTINGS = 2
EXIT_DATA = 3
EXIT_STORAGE = 4
EXIT_CHECKPOINT = 5
EXIT_FID = 6
EXIT_NONFINITE = 7
EXIT_DISK_FULL = 8
EXIT_DEVICE = 9  # GAN_DEVICE=cuda asked for and not usable
EXIT_STOPPED_UNSAVED = 10  # stopped before a complete checkpoint of the stop step; retry
EXIT_RUN_LOCKED = 11
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after a complete checkpoint; retry


class JobError(Exception):
    """An expected failure: its message is for the user, its exit_code for the scheduler."""

    exit_code = EXIT_UNEXPECTED


class SettingsError(JobError):
    exit_code = EXIT_SETTINGS

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid settings:\n" + "\n".join(f"  {p}" for p in problems))


class DataError(JobError):
    exit_code = EXIT_DATA


class StorageError(JobError):
    exit_code = EXIT_STORAGE


class CheckpointError(JobError):
    exit_code = EXIT_CHECKPOINT


class FIDError(JobError):
    exit_code = EXIT_FID


class NonFiniteLossError(JobError):
    exit_code = EXIT_NONFINITE


class DiskFullError(StorageError):
    """No space left where artifacts are written (ENOSPC): retrying will not help."""

    exit_code = EXIT_DISK_FULL


class DeviceError(JobError):
    """GAN_DEVICE=cuda and no usable GPU: stop before any work rather than train on the CPU."""

    exit_code = EXIT_DEVICE


class PeerLostError(JobError):
    """Another process of the job failed or vanished mid-collective: this one stops too."""

    exit_code = EXIT_STOPPED_UNSAVED


class Stopped(BaseException):
    """SIGTERM/SIGINT before training started: there is nothing new to save.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way (a
    retry loop, a loader that reports bad files) takes it for an ordinary failure.
    """

    exit_code = EXIT_STOPPED_UNSAVED


class RunLockedError(JobError):
    """Another live job holds this run id: a second writer would mix the two runs."""

    exit_code = EXIT_RUN_LOCKED
