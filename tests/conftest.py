"""Shared fixtures. S3 tests run against a real SeaweedFS server (tests/s3server.py)."""

from __future__ import annotations

import uuid

import pytest
from s3server import SeaweedS3, use_server


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> SeaweedS3:
    """One SeaweedFS S3 server for the whole session: endpoint_url, access_key, secret_key, env()."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3) -> str:
    """A fresh, empty bucket on the session's server."""
    return s3.create_bucket(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def s3_env(s3, monkeypatch, tmp_path) -> SeaweedS3:
    """The process environment pointed at the server, as a pod would see it (no ~/.aws files)."""
    use_server(monkeypatch, s3, tmp_path)
    return s3
