"""The artifact store: a local folder or an S3 prefix, behind one small interface.

Keys are '/'-separated paths relative to the store's root ("checkpoints/step-00000100/model.pt").
Every put is atomic: a reader sees the old object, the whole new one, or nothing.
S3 requests retry through botocore's own retry modes, each attempt bounded by connect and read
timeouts; BackgroundWriter adds an outer retry for outages that last minutes. Training never
waits on storage: during an outage, what waits in memory is bounded (see BackgroundWriter).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

import boto3
from boto3.s3.transfer import S3UploadFailedError, TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from job.infra import watchdog
from job.infra.errors import DiskFullError, StorageError
from job.settings import s3_uri_problem

log = logging.getLogger(__name__)

MiB = 1024 * 1024
CHECK_SECONDS = 60.0  # the whole start-up check of an S3 store
T = TypeVar("T")
_TMP_SUFFIX = ".partial"  # local temp files: ".<name>.<hex>.partial", never listed
# a folder that refuses writes (remounted read-only, permissions taken away): retrying is no use
_REFUSED = (errno.EROFS, errno.EACCES, errno.EPERM)


class WritesRefused(StorageError):
    """The artifact folder refuses writes: a storage failure (exit 4) that waiting cannot end."""


def refused(folder: str, key: str, exc: OSError) -> WritesRefused:
    return WritesRefused(
        f"{folder}: cannot write {key}: {exc.strerror} (the folder refuses writes)"
    )


def _refusals_raised(folder: str, key: str, write: Callable[[], T]) -> T:
    """write(), with an OSError of a folder that refuses writes raised as WritesRefused."""
    try:
        return write()
    except OSError as e:
        if e.errno in _REFUSED:
            raise refused(folder, key, e) from e
        raise


def _clean_key(key: str) -> str:
    parts = [p for p in key.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"invalid storage key {key!r}")
    return "/".join(parts)


def _clean_prefix(prefix: str) -> str:
    """A list prefix: may be empty or end with '/'; never climbs out of the root."""
    if not prefix:
        return ""
    trailing = "/" if prefix.endswith("/") else ""
    return _clean_key(prefix) + trailing


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(_TMP_SUFFIX)


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


# ---------------------------------------------------------------------------------------------
# local folder


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(dest: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) next to dest, fsync, then rename over dest. The writer holds an flock on tmp
    throughout: a temp file nobody holds is one a killed writer left (see _remove_stale_temps)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
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
        return self.root / _clean_key(key)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self._path(key)
        _refusals_raised(
            self.uri, key, lambda: _atomic_write(dest, lambda tmp: tmp.write_bytes(data))
        )

    def put_file(self, key: str, path: str | Path) -> None:
        dest = self._path(key)
        if dest.exists() and dest.samefile(path):
            return
        _refusals_raised(
            self.uri, key, lambda: _atomic_write(dest, lambda tmp: shutil.copyfile(path, tmp))
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
        _atomic_write(Path(path), lambda tmp: shutil.copyfile(src, tmp))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        prefix = _clean_prefix(prefix)
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
        return LocalStore(self.root / _clean_key(sub))

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


# ---------------------------------------------------------------------------------------------
# S3


def _endpoint_from_env() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def make_s3_client(
    endpoint_url: str | None = None,
    connect_timeout: float = 10,
    read_timeout: float = 60,
    max_attempts: int | None = None,
):
    """A boto3 S3 client that honours the standard AWS_* settings.

    endpoint_url wins over AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (which boto3 reads itself when
    endpoint_url is None). A custom endpoint means a non-AWS store: path-style addressing and
    checksums only where required, unless AWS_S3_ADDRESSING_STYLE /
    AWS_REQUEST_CHECKSUM_CALCULATION say otherwise. Attempts per request, the first included:
    max_attempts, else AWS_MAX_ATTEMPTS (default 5), in botocore's AWS_RETRY_MODE (default
    standard); each waits at most connect_timeout + read_timeout between bytes.
    """
    session = boto3.session.Session()
    region = os.environ.get("AWS_REGION") or session.region_name or "us-east-1"
    custom = endpoint_url or _endpoint_from_env()
    style = os.environ.get("AWS_S3_ADDRESSING_STYLE") or ("path" if custom else None)
    extra = {}
    if custom and not os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION"):
        extra["request_checksum_calculation"] = "when_required"
    if custom and not os.environ.get("AWS_RESPONSE_CHECKSUM_VALIDATION"):
        extra["response_checksum_validation"] = "when_required"
    config = Config(
        region_name=region,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={
            "mode": os.environ.get("AWS_RETRY_MODE", "standard"),
            # botocore's own "max_attempts" key counts retries, not attempts as AWS_MAX_ATTEMPTS
            "total_max_attempts": max_attempts or int(os.environ.get("AWS_MAX_ATTEMPTS", "5")),
        },
        s3={"addressing_style": style} if style else None,
        **extra,
    )
    return session.client("s3", endpoint_url=endpoint_url or None, config=config)


def _error_code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _describe(e: Exception, bucket: str, endpoint: str) -> str:
    """The cause in words a user can act on. botocore never puts secrets in its messages."""
    if isinstance(e, EndpointConnectionError | ConnectTimeoutError):
        return f"cannot reach endpoint {endpoint} ({e})"
    if isinstance(e, ReadTimeoutError):
        return f"endpoint {endpoint} did not answer in time ({e})"
    if isinstance(e, NoCredentialsError):
        return (
            "no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_SHARED_CREDENTIALS_FILE / AWS_PROFILE)"
        )
    if isinstance(e, ClientError):
        code = _error_code(e)
        if code in ("NoSuchBucket", "404"):
            return f"no such bucket {bucket!r} at {endpoint}"
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return (
                f"access denied ({code}) to bucket {bucket!r} at {endpoint}: check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's permissions"
            )
        return f"{code or type(e).__name__} from {endpoint}: {e}"
    return f"{type(e).__name__}: {e}"


_S3_ERRORS = (ClientError, BotoCoreError, S3UploadFailedError)


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, client=None):
        self.bucket = bucket
        self.prefix = "/".join(p for p in prefix.split("/") if p)
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url
        self.client = client or make_s3_client(endpoint_url)
        self.transfer = TransferConfig(
            multipart_threshold=64 * MiB, multipart_chunksize=16 * MiB, max_concurrency=4
        )

    @property
    def endpoint(self) -> str:
        return self.client.meta.endpoint_url

    def _key(self, key: str) -> str:
        key = _clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, what: str, key: str, e: Exception) -> StorageError:
        cause = _describe(e, self.bucket, self.endpoint)
        return StorageError(f"artifact store {self.uri}: {what} {key!r} failed: {cause}")

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except _S3_ERRORS as e:
            raise self._fail("put", key, e) from e

    def put_file(self, key: str, path: str | Path) -> None:
        """Multipart above transfer.multipart_threshold; S3 shows the object only when complete."""
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)
        except _S3_ERRORS as e:
            raise self._fail("upload", key, e) from e

    def get_bytes(self, key: str) -> bytes:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return obj["Body"].read()
        except _S3_ERRORS as e:
            raise self._not_found_or_fail("get", key, e) from e

    def get_file(self, key: str, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
        try:
            self.client.download_file(self.bucket, self._key(key), str(tmp), Config=self.transfer)
            os.replace(tmp, path)
        except _S3_ERRORS as e:
            raise self._not_found_or_fail("download", key, e) from e
        finally:
            tmp.unlink(missing_ok=True)

    def _not_found_or_fail(self, what: str, key: str, e: Exception) -> Exception:
        if isinstance(e, ClientError) and _error_code(e) in ("NoSuchKey", "404"):
            return FileNotFoundError(f"{self.uri}/{key}")
        return self._fail(what, key, e)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if _error_code(e) in ("NoSuchKey", "404"):
                return False
            raise self._fail("head", key, e) from e
        except _S3_ERRORS as e:
            raise self._fail("head", key, e) from e

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        root = f"{self.prefix}/" if self.prefix else ""
        out = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root + _clean_prefix(prefix)
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(root) :]
                    if key and not key.endswith("/"):  # skip console "folder" markers
                        out[key] = obj["Size"]
        except _S3_ERRORS as e:
            raise self._fail("list", prefix, e) from e
        return out

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except _S3_ERRORS as e:
            raise self._fail("delete", key, e) from e

    def child(self, sub: str) -> S3Store:
        child = S3Store(self.bucket, self._key(sub), self.endpoint_url, client=self.client)
        child.transfer = self.transfer
        return child

    def check(self, timeout: float = CHECK_SECONDS) -> None:
        """List (finds a missing bucket or bad keys), then write, read and delete a probe object.

        Short timeouts, two attempts per request and a deadline for the whole check: an
        unreachable or unresponsive endpoint fails in seconds, a crawling one in timeout seconds.
        """
        client = make_s3_client(
            self.endpoint_url, connect_timeout=5, read_timeout=5, max_attempts=2
        )
        endpoint = client.meta.endpoint_url
        probe = self._key(f".gan-job-probe-{uuid.uuid4().hex[:8]}")

        def probe_store() -> bytes:
            client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
            client.put_object(Bucket=self.bucket, Key=probe, Body=b"probe")
            data = client.get_object(Bucket=self.bucket, Key=probe)["Body"].read()
            client.delete_object(Bucket=self.bucket, Key=probe)
            return data

        try:
            data = _within(timeout, probe_store)
        except TimeoutError:
            raise StorageError(
                f"artifact store {self.uri}: endpoint {endpoint} is too slow: "
                f"its check (list, put, get, delete) took over {timeout:.0f} s"
            ) from None
        except _S3_ERRORS as e:
            raise StorageError(
                f"artifact store {self.uri}: {_describe(e, self.bucket, endpoint)}"
            ) from e
        if data != b"probe":
            raise StorageError(f"artifact store {self.uri}: a probe object read back differently")


def _within(seconds: float, fn: Callable[[], T]) -> T:
    """fn() in a daemon thread; TimeoutError when it has not returned in seconds (it is left
    to finish or fail on its own)."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            outcome.append((False, e))

    thread = threading.Thread(target=run, name="s3-check", daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise TimeoutError
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


# ---------------------------------------------------------------------------------------------


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


@dataclass(eq=False)  # queued items are told apart by identity
class _Item:
    """One queued write (key: what it stores) or call (key None)."""

    run: Callable[[], None]
    key: str | None = None
    replace: bool = False
    droppable: bool = False


class BackgroundWriter:
    """Uploads in a background thread: training never waits on storage.

    FIFO with one worker: an item submitted later is stored after every earlier one, so a
    checkpoint's completion marker, submitted last, lands only after its parts. A failed item is
    retried with backoff until it succeeds or close()'s deadline passes; failures counts attempts
    that failed.

    During an outage items wait in memory, within bounds. A snapshot submitted with replace=True
    (metrics.jsonl, report.png) replaces the waiting one of the same key. At most max_pending
    droppable items (sample grids) wait: a newer one drops the oldest, with a warning. Nothing
    else is ever dropped before close()'s deadline: producers of large items (checkpoints) ask
    has_room() first and skip their work when it says no.
    """

    def __init__(
        self,
        store: Store,
        max_pending: int = 8,
        on_failure: Callable[[Exception], None] | None = None,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
    ):
        self.store = store
        self.max_pending = max_pending
        self.on_failure = on_failure
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.failures = 0
        self.last_error: Exception | None = None
        self.dropped: list[str] = []  # droppable keys given up to make room
        self.not_stored: list[str] = []  # keys still waiting when close() gave up
        self.disk_full: OSError | None = None  # ENOSPC: flush() and close() wait no longer
        self.refused: WritesRefused | None = None  # a read-only folder: neither do they
        self._items: deque[_Item] = deque()
        self._current: _Item | None = None  # the item being stored (or retried)
        self._cond = threading.Condition()
        self._abandon = threading.Event()  # set by close() after its deadline: stop retrying
        self._closed = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="storage-writer", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Items submitted and not yet stored."""
        with self._cond:
            return len(self._items) + (self._current is not None)

    def has_room(self, items: int) -> bool:
        """Whether items more can wait without exceeding max_pending. Droppable items do not
        count (they make room themselves), nor replaceable ones (at most one per key waits)."""
        with self._cond:
            queued = [*self._items, *([self._current] if self._current else [])]
            kept = sum(1 for i in queued if not (i.droppable or i.replace))
            return kept + items <= self.max_pending

    def submit(
        self,
        key: str,
        data: bytes | None = None,
        path: str | Path | None = None,
        delete_after: bool = False,
        replace: bool = False,
        droppable: bool = False,
    ) -> None:
        """Store data or the file at path under key; returns at once.

        delete_after removes the local file once it is stored (not if it is the stored file).
        replace: a later submit of the same key replaces this one while it waits (snapshots).
        droppable: may be dropped, oldest first, while max_pending droppable items wait.
        """
        if (data is None) == (path is None):
            raise ValueError("submit needs exactly one of data or path")
        if data is not None:
            self._add(_Item(lambda: self.store.put_bytes(key, data), key, replace, droppable))
            return
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(path)

        def put() -> None:
            self.store.put_file(key, path)
            stored = self.store.local_path(key)
            if delete_after and not (stored and stored.exists() and stored.samefile(path)):
                path.unlink(missing_ok=True)

        self._add(_Item(put, key, replace, droppable))

    def submit_call(self, fn: Callable[[], None]) -> None:
        """Run fn in order with the uploads (e.g. retention deletes); retried like a put."""
        self._add(_Item(fn))

    def _add(self, item: _Item) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("BackgroundWriter is closed")
            if item.replace:
                superseded = [i for i in self._items if i.replace and i.key == item.key]
                for old in superseded:
                    self._items.remove(old)
            if item.droppable:
                waiting = [i for i in self._items if i.droppable]
                for old in waiting[: max(0, len(waiting) - self.max_pending + 1)]:
                    self._items.remove(old)
                    self.dropped.append(old.key)
                    log.warning(
                        "storage: %s dropped, not stored: uploads are behind (last error: %s)",
                        old.key,
                        self.last_error,
                    )
            self._items.append(item)
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stopping:
                    self._cond.wait()
                if not self._items:
                    return
                item = self._current = self._items.popleft()
            self._run_with_retry(item.run)
            watchdog.beat("storing artifacts")
            with self._cond:
                self._current = None
                self._cond.notify_all()

    def _run_with_retry(self, fn: Callable[[], None]) -> None:
        delay = self.retry_initial
        while not self._abandon.is_set():
            try:
                fn()
                return
            except Exception as e:
                self.failures += 1
                self.last_error = e
                if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                    with self._cond:
                        self.disk_full = e
                        self._cond.notify_all()
                if isinstance(e, WritesRefused):
                    with self._cond:
                        self.refused = e
                        self._cond.notify_all()
                log.warning(
                    "storage write failed (attempt %d), retrying in %.1fs: %s",
                    self.failures,
                    delay,
                    e,
                )
                if self.on_failure is not None:
                    try:
                        self.on_failure(e)
                    except Exception:
                        log.exception("on_failure callback raised")
            if self._abandon.wait(delay):
                return
            delay = min(delay * 2, self.retry_max)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted is stored; False on timeout, or at once when the
        disk is full or the folder refuses writes (waiting would not change that)."""
        with watchdog.waiting("waiting for the uploads", timeout), self._cond:
            self._cond.wait_for(
                lambda: (not self._items and not self._current) or self.disk_full or self.refused,
                timeout,
            )
            return not self._items and not self._current

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the thread. Past the deadline, what still waits is given up (listed
        in not_stored, logged): False."""
        with self._cond:
            if self._closed:
                return not self.not_stored and self.pending == 0
            self._closed = True
        ok = self.flush(timeout)
        with self._cond:
            if not ok:
                waiting = [*([self._current] if self._current else []), *self._items]
                self.not_stored = [i.key for i in waiting if i.key is not None]
                self._items.clear()
                self._abandon.set()
            self._stopping = True
            self._cond.notify_all()
        if not ok:
            why = (
                "the disk is full"
                if self.disk_full
                else "the folder refuses writes"
                if self.refused
                else f"{timeout} s"
            )
            log.error("storage: giving up after %s: %s", why, self.describe_not_stored())
        self._thread.join(None if ok else 1.0)  # a call stuck past its deadline dies with us
        return ok

    def describe_not_stored(self) -> str:
        """What close() gave up (a few dozen keys at most), for a one-line message."""
        return f"{', '.join(self.not_stored) or 'nothing'} (last error: {self.last_error})"

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NullWriter:
    """The writer of ranks other than 0: they write no artifacts."""

    pending = 0
    last_error = None
    disk_full = None
    refused = None
    dropped: list[str] = []
    not_stored: list[str] = []

    def has_room(self, items: int) -> bool:
        return True

    def describe_not_stored(self) -> str:
        return "nothing"

    def submit(self, key: str, data: bytes | None = None, path=None, **options) -> None:
        pass

    def submit_call(self, fn: Callable[[], None]) -> None:
        pass

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def close(self, timeout: float | None = None) -> bool:
        return True


class JsonlLog:
    """A JSON-lines history (metrics.jsonl, eval.jsonl): its rows, kept for the report and the
    schedule, and the artifact of the same name.

    In a local store each row is appended to the file as it comes. An S3 object cannot be
    appended to, so there the whole file is uploaded at sync(), which the checkpointer calls
    with every checkpoint (before the checkpoint's parts) and the run calls at its end. A
    checkpoint holds only the number of rows: the artifact, stored before it, holds the rows.
    """

    def __init__(self, key: str, writer: BackgroundWriter | NullWriter, store: Store):
        self.key, self.writer, self.store, self.rows = key, writer, store, []
        self.path = store.local_path(key) if isinstance(writer, BackgroundWriter) else None

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise DiskFullError(f"{self.path}: {e}") from e
                if e.errno in _REFUSED:
                    raise refused(self.store.uri, self.key, e) from e
                raise

    def _text(self) -> bytes:
        return "".join(json.dumps(r) + "\n" for r in self.rows).encode()

    def sync(self) -> None:
        if self.path is None and self.rows:
            self.writer.submit(self.key, data=self._text(), replace=True)

    def state_dict(self) -> dict:
        return {"count": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        """The first `count` rows (those logged before the checkpoint), from memory after a
        rollback or from the artifact after a restart; a checkpoint of gan-job 0.3 and before
        holds the rows themselves. The artifact loses rows logged after the checkpoint."""
        if "rows" in state:
            self.rows = list(state["rows"])
        else:
            count = int(state["count"])
            rows = self.rows if len(self.rows) >= count else self._stored_rows()
            if len(rows) < count:
                log.warning(
                    "%s/%s holds %d of the %d rows the checkpoint counts: the history "
                    "(report.png) goes on from those",
                    self.store.uri,
                    self.key,
                    len(rows),
                    count,
                )
            self.rows = rows[:count]
        if isinstance(self.writer, BackgroundWriter):
            self._rewrite()

    def start_fresh(self) -> None:
        self.rows = []
        if isinstance(self.writer, BackgroundWriter):
            self._rewrite()

    def _rewrite(self) -> None:
        """The artifact as the rows are now (nothing to do for an empty history not stored)."""
        if self.path is None:
            self.sync()
        elif self.rows or self.path.exists():
            text = self._text()
            _atomic_write(self.path, lambda tmp: tmp.write_bytes(text))

    def _stored_rows(self) -> list[dict]:
        """The artifact's rows, up to the first that does not parse (an append cut short)."""
        try:
            text = self.store.get_bytes(self.key).decode(errors="replace")
        except FileNotFoundError:
            return []
        rows = []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
        return rows


# ---------------------------------------------------------------------------------------------
# datasets from S3

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


def _download_prefix(uri: str, local_dir: Path, endpoint_url: str | None) -> Path:
    local_dir.mkdir(parents=True, exist_ok=True)
    marker = local_dir / _DONE_MARKER
    with open(local_dir / _LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and marker.read_text() == uri:
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
        marker.write_text(uri)
    return local_dir
