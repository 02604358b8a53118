"""The artifact store in a local folder: atomic writes (temp file, fsync, rename) under an flock,
refused writes told apart from failures that waiting may end, and the temp files that killed
writers left removed at the start-up check."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from job.infra.errors import StorageError
from job.infra.store import REFUSED_ERRNOS, TMP_SUFFIX, Store, clean_key, clean_prefix, refused

log = logging.getLogger(__name__)

T = TypeVar("T")


def _refusals_raised(folder: str, key: str, write: Callable[[], T]) -> T:
    """write(), with an OSError of a folder that refuses writes raised as WritesRefused."""
    try:
        return write()
    except OSError as e:
        if e.errno in REFUSED_ERRNOS:
            raise refused(folder, key, e) from e
        raise


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(dest: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) next to dest, fsync, then rename over dest. The writer holds an flock on tmp
    throughout: a temp file nobody holds is one a killed writer left (see _remove_stale_temps)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    held = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        _lock(held, blocking=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
        os.close(held)
    _fsync_dir(dest.parent)


def _lock(fd: int, blocking: bool) -> bool:
    """An exclusive flock on fd: False if another holds it or the file system has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


def _remove_if_stale(path: Path) -> int | None:
    """Removes a temp file no live writer holds: the bytes freed, None if it was left alone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # FileNotFoundError: its writer just finished
        return None
    try:
        if not _lock(fd, blocking=False):
            return None
        size = os.fstat(fd).st_size
        path.unlink()  # temp names are never reused: a file still there is the one locked
        return size
    except OSError:
        return None
    finally:
        os.close(fd)


def _remove_stale_temps(root: Path) -> tuple[int, int]:
    """Removes the temp files under root that killed writers left: (files, bytes) removed."""
    paths = [Path(folder, n) for folder, _, names in os.walk(root) for n in names if _is_tmp(n)]
    removed = [size for size in map(_remove_if_stale, paths) if size is not None]
    return len(removed), sum(removed)


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"artifact store {self.uri}: cannot create folder: {e}") from e

    def _path(self, key: str) -> Path:
        return self.root / clean_key(key)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self._path(key)
        _refusals_raised(
            self.uri, key, lambda: atomic_write(dest, lambda tmp: tmp.write_bytes(data))
        )

    def put_file(self, key: str, path: str | Path) -> None:
        dest = self._path(key)
        if dest.exists() and dest.samefile(path):
            return
        _refusals_raised(
            self.uri, key, lambda: atomic_write(dest, lambda tmp: shutil.copyfile(path, tmp))
        )

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.uri}/{key}")
        return path.read_bytes()

    def get_file(self, key: str, path: str | Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise FileNotFoundError(f"{self.uri}/{key}")
        atomic_write(Path(path), lambda tmp: shutil.copyfile(src, tmp))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        prefix = clean_prefix(prefix)
        start = self.root / prefix.rpartition("/")[0]  # deepest folder the prefix names
        out = {}
        for folder, _, files in os.walk(start):
            for name in files:
                path = Path(folder, name)
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix) and not _is_tmp(name):
                    try:
                        out[key] = path.stat().st_size
                    except FileNotFoundError:  # deleted while we walked
                        pass
        return out

    def delete(self, key: str) -> None:
        path = self._path(key)
        _refusals_raised(self.uri, key, lambda: path.unlink(missing_ok=True))
        # prune folders left empty (e.g. a retired checkpoint), never the root itself
        for parent in path.parents:
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            try:
                parent.rmdir()
            except OSError:
                break

    def child(self, sub: str) -> LocalStore:
        return LocalStore(self.root / clean_key(sub))

    def check(self) -> None:
        """Write, read and delete a probe file; then remove the temp files under this store's
        folder (not its parent's) that writers killed mid-write left."""
        probe = f".gan-job-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.put_bytes(probe, b"probe")
            ok = self.get_bytes(probe) == b"probe"
            self.delete(probe)
        except OSError as e:
            raise StorageError(f"artifact store {self.uri}: cannot write: {e}") from e
        if not ok:
            raise StorageError(f"artifact store {self.uri}: a probe file read back differently")
        files, freed = _remove_stale_temps(self.root)
        if files:
            log.info(
                "storage: removed %d temp files of interrupted writes under %s: %d bytes freed",
                files,
                self.uri,
                freed,
            )
