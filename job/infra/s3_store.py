"""The artifact store in an S3 prefix (boto3), and the S3 bucket-name rules.

S3 requests retry through botocore's own retry modes, each attempt bounded by connect and read
timeouts; BackgroundWriter (job/infra/writer.py) adds an outer retry for outages that last
minutes.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

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

from job.infra.errors import StorageError
from job.infra.store import TMP_SUFFIX, MiB, Store, clean_key, clean_prefix

CHECK_SECONDS = 60.0  # the whole start-up check of an S3 store
T = TypeVar("T")

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
BUCKET_RULE = (
    "an S3 bucket name of 3-63 characters: lowercase letters, digits, dots and hyphens, "
    "beginning and ending with a letter or digit"
)


def bucket_problem(name: str) -> str | None:
    """Why name is not a valid S3 bucket name (AWS's rules, which MinIO and others follow)."""
    if (
        not _BUCKET.match(name)
        or ".." in name
        or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", name)  # an IP address
    ):
        return f"{BUCKET_RULE}; {name!r} is not"
    return None


def s3_uri_problem(uri: str) -> str | None:
    """Why an s3:// URI names no valid bucket; None for valid ones and other URIs."""
    if not uri.startswith("s3://"):
        return None
    bucket = uri[len("s3://") :].split("/", 1)[0]
    if "@" in bucket:
        return "s3://bucket/prefix without user:password@ (S3 credentials are AWS_* variables)"
    return bucket_problem(bucket)


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
        key = clean_key(key)
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
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
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
                Bucket=self.bucket, Prefix=root + clean_prefix(prefix)
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
