"""The artifact store's interface (Store): a local folder or an S3 prefix, behind a few calls.

Keys are '/'-separated paths relative to the store's root ("checkpoints/step-00000100/model.pt").
Every put is atomic: a reader sees the old object, the whole new one, or nothing.
LocalStore (job/infra/local_store.py) and S3Store (job/infra/s3_store.py) implement it;
open_store (job/infra/stores.py) picks one by URI.
"""

from __future__ import annotations

import errno
from pathlib import Path

from job.infra.errors import StorageError

MiB = 1024 * 1024
TMP_SUFFIX = ".partial"  # local temp files: ".<name>.<hex>.partial", never listed
# a folder that refuses writes (remounted read-only, permissions taken away): retrying is no use
REFUSED_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


class WritesRefused(StorageError):
    """The artifact folder refuses writes: a storage failure (exit 4) that waiting cannot end."""


def refused(folder: str, key: str, exc: OSError) -> WritesRefused:
    return WritesRefused(
        f"{folder}: cannot write {key}: {exc.strerror} (the folder refuses writes)"
    )


def clean_key(key: str) -> str:
    parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"invalid storage key {key!r}")
    return "/".join(parts)


def clean_prefix(prefix: str) -> str:
    """A list prefix: may be empty or end with '/'; never climbs out of the root."""
    if not prefix:
        return ""
    trailing = "/" if prefix.endswith("/") else ""
    return clean_key(prefix) + trailing


class Store:
    """Where a run's artifacts live. LocalStore and S3Store implement it."""

    uri: str

    def put_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def put_file(self, key: str, path: str | Path) -> None:
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def get_file(self, key: str, path: str | Path) -> None:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        """{key: size in bytes} of every object whose key starts with prefix (recursive)."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self.list_sizes(prefix))

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def child(self, sub: str) -> Store:
        raise NotImplementedError

    def check(self) -> None:
        raise NotImplementedError

    def local_path(self, key: str) -> Path | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"
