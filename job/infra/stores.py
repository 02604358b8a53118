"""A store by its URI (open_store: a path, file:// or s3://), and S3 datasets copied once per
node to a local folder (download_prefix)."""

from __future__ import annotations

import errno
import fcntl
import logging
from pathlib import Path
from urllib.parse import unquote, urlparse

from job.infra.errors import DiskFullError, StorageError
from job.infra.local_store import LocalStore
from job.infra.s3_store import S3Store, s3_uri_problem
from job.infra.store import Store

log = logging.getLogger(__name__)


def open_store(uri: str, endpoint_url: str | None = None) -> Store:
    """Paths, "./runs" and "file:///abs/path" give a LocalStore; "s3://bucket/prefix" an S3Store."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"artifact URI {uri!r} names no bucket: expected s3://bucket/prefix")
        if why := s3_uri_problem(uri):
            raise StorageError(f"{uri}: expected {why}")
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"artifact URI {uri!r}: file:// URIs must be local (file:///path)")
        return LocalStore(unquote(parsed.path))
    if "://" in uri:
        raise StorageError(f"artifact URI {uri!r}: unsupported scheme (use a path or s3://)")
    return LocalStore(uri)


_DONE_MARKER = ".download-complete"
_LOCK_FILE = ".download.lock"


def download_prefix(uri: str, local_dir: Path, endpoint_url: str | None = None) -> Path:
    """Copy every object under uri into local_dir, once per node.

    A file lock makes concurrent ranks on one node download once; a marker written at the end
    makes later calls return at once; files already there with the right size are skipped.
    A local_dir that cannot be written (read-only, missing, full) is a StorageError naming it.
    """
    try:
        return _download_prefix(uri, Path(local_dir), endpoint_url)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFullError(f"{local_dir}: no space left for {uri}: {e.strerror}") from e
        raise StorageError(
            f"{local_dir}: cannot write the copy of {uri} there ({e.strerror}): set "
            "GAN_DATA_DIR to a writable folder"
        ) from e


def copy_dir(data_dir: str | Path, uri: str) -> Path:
    """The node's folder under data_dir for its copy of the s3:// prefix uri."""
    return Path(data_dir) / "s3" / uri.removeprefix("s3://")


def copied(uri: str, local_dir: Path) -> bool:
    """Whether local_dir holds a complete copy of uri (download_prefix finished there)."""
    marker = Path(local_dir) / _DONE_MARKER
    return marker.is_file() and marker.read_text() == uri


def _download_prefix(uri: str, local_dir: Path, endpoint_url: str | None) -> Path:
    local_dir.mkdir(parents=True, exist_ok=True)
    with open(local_dir / _LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if copied(uri, local_dir):
            return local_dir
        store = open_store(uri, endpoint_url)
        objects = store.list_sizes()
        if not objects:
            raise StorageError(f"nothing to download under {uri}")
        base = local_dir.resolve()
        for key, size in sorted(objects.items()):
            dest = local_dir / key
            if not dest.resolve().is_relative_to(base):
                raise StorageError(f"{uri}: key {key!r} points outside {local_dir}")
            if dest.is_file() and dest.stat().st_size == size:
                continue
            store.get_file(key, dest)
        log.info("downloaded %d objects from %s to %s", len(objects), uri, local_dir)
        (local_dir / _DONE_MARKER).write_text(uri)
    return local_dir
