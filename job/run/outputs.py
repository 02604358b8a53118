"""Where a tool's --out goes: a local path, or an s3:// URI that the tool writes into a local
temporary folder first and uploads (open_store) once it is complete, so that no folder named
`s3:` appears where the tool ran."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from job.infra.errors import DiskFullError, StorageError
from job.infra.s3_store import s3_uri_problem
from job.infra.stores import open_store


def is_s3(out: str) -> bool:
    return out.startswith("s3://")


def split(out: str) -> tuple[str, str]:
    """(folder or prefix, file name) of a file's path or s3:// URI."""
    folder, _, name = out.rstrip("/").rpartition("/")
    return folder or ".", name


def uri_problems(out: str, flag: str = "--out") -> list[str]:
    """What is wrong with an --out that names a URI: only s3://bucket/key is written."""
    if is_s3(out):
        why = s3_uri_problem(out)
        if why is None and not out.removeprefix("s3://").strip("/").count("/"):
            why = "s3://bucket/key: a key after the bucket"
        return [f"{flag} {out}: expected {why}"] if why else []
    if "://" in out:
        return [f"{flag} {out}: expected a local path or an s3://bucket/key URI"]
    return []


def out_file_problems(out: str, flag: str = "--out") -> list[str]:
    """What is wrong with a file --out, before any work: a bad URI, a folder, a file in the way
    of its folder, a folder that cannot be written."""
    if "://" in out:
        return uri_problems(out, flag)
    path = Path(out)
    if path.is_dir():
        return [f"{flag} {out}: is a folder, expected a file name"]
    folder = next(p for p in path.absolute().parents if p.exists())  # nearest existing folder
    if not folder.is_dir():
        return [f"{flag} {out}: {folder} is a file, not a folder"]
    if not os.access(folder, os.W_OK | os.X_OK):
        return [f"{flag} {out}: cannot write in {folder} (permission denied)"]
    return []


@contextlib.contextmanager
def local_folder(out: str, endpoint_url: str | None = None) -> Iterator[Path]:
    """The local folder to write out's files in: out itself, or, for an s3:// prefix, a
    temporary folder whose files are uploaded under the prefix when the block ends without an
    exception (StorageError naming the store when the upload fails)."""
    if not is_s3(out):
        yield Path(out)
        return
    store = open_store(out, endpoint_url)
    with tempfile.TemporaryDirectory(prefix="gan-job-out-") as tmp:
        yield Path(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file() and not path.name.endswith(".partial"):
                store.put_file(path.relative_to(tmp).as_posix(), path)


def write_bytes(
    out: str, data: bytes, endpoint_url: str | None = None, flag: str = "--out"
) -> None:
    """data as the file (or s3:// object) out, complete or not at all (replacing)."""
    folder, name = split(out)
    if is_s3(out):
        open_store(folder, endpoint_url).put_bytes(name, data)
        return
    with replacing(Path(out), flag) as f:
        f.write(data)


@contextlib.contextmanager
def replacing(path: Path, flag: str = "--out") -> Iterator[BinaryIO]:
    """A temporary file beside path, renamed to path once the block has written it, removed
    otherwise: path is complete or absent. DiskFullError when the disk fills, StorageError
    naming flag and path when it cannot be written at all."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFullError(f"{flag} {path}: {e.strerror}") from e
        raise StorageError(f"{flag} {path}: cannot write in {path.parent} ({e.strerror})") from e
    finally:
        tmp.unlink(missing_ok=True)
