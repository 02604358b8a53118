"""Real Prometheus and Pushgateway servers for tests, on 127.0.0.1 free ports with tmp dirs.

with prometheus(["127.0.0.1:9100"], pushgateways=[gw]) as url:
    series = wait_for(url, 'gan_step{run_id="r1"}')
"""

from __future__ import annotations

import json
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

PROMETHEUS = "/usr/bin/prometheus"
PUSHGATEWAY = "/usr/bin/prometheus-pushgateway"
PROMTOOL = "/usr/bin/promtool"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


@contextmanager
def _server(argv: list[str], url: str, log: Path, timeout: float = 20.0) -> Iterator[str]:
    """Runs argv until the with block ends; yields url once url/-/ready answers."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{argv[0]} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
                )
            try:
                http_get(f"{url}/-/ready", timeout=1)
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{argv[0]} not ready:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def prometheus(
    targets: Sequence[str],
    pushgateways: Sequence[str] = (),
    rule_files: Sequence[str | Path] = (),
    scrape_interval: str = "1s",
) -> Iterator[str]:
    """A Prometheus scraping targets (host:port) and Pushgateway URLs; yields its base URL."""
    port = free_port()
    scrape_configs = [{"job_name": "gan", "static_configs": [{"targets": list(targets)}]}]
    if pushgateways:
        hosts = [urllib.parse.urlparse(u).netloc for u in pushgateways]
        scrape_configs.append(
            {
                "job_name": "pushgateway",
                "honor_labels": True,
                "static_configs": [{"targets": hosts}],
            }
        )
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(Path(f).resolve()) for f in rule_files],
        "scrape_configs": scrape_configs,
    }
    with tempfile.TemporaryDirectory(prefix="prometheus-") as tmp:
        config_file = Path(tmp, "prometheus.yml")
        config_file.write_text(json.dumps(config))  # JSON is YAML
        argv = [
            PROMETHEUS,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={tmp}/data",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        with _server(argv, f"http://127.0.0.1:{port}", Path(tmp, "log")) as url:
            yield url


@contextmanager
def pushgateway() -> Iterator[str]:
    """An in-memory Pushgateway; yields its base URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pushgateway-") as tmp:
        # Debian's build persists to /var/lib/prometheus/pushgateway.data by default, which
        # every Pushgateway on the machine would share: keep this one's state in its tmp dir
        argv = [
            PUSHGATEWAY,
            f"--web.listen-address=127.0.0.1:{port}",
            f"--persistence.file={tmp}/pushgateway.data",
        ]
        with _server(argv, f"http://127.0.0.1:{port}", Path(tmp, "log")) as url:
            yield url


def query(url: str, expr: str) -> list[dict]:
    """The result of an instant query: [{"metric": {labels}, "value": [time, "value"]}, ...]."""
    body = http_get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    answer = json.loads(body)
    if answer["status"] != "success":
        raise RuntimeError(f"{expr}: {answer}")
    return answer["data"]["result"]


def wait_for(url: str, expr: str, timeout: float = 20.0) -> list[dict]:
    """Polls an instant query until it returns something (the first scrape takes ~6 s to show)."""
    deadline = time.monotonic() + timeout
    while not (result := query(url, expr)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no data for {expr} after {timeout:.0f} s")
        time.sleep(0.25)
    return result
