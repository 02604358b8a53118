"""Metrics, alerts, dashboard and report, against a real Prometheus, Pushgateway and promtool."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from prom import (
    PROMTOOL,
    PUSHGATEWAY,
    _server,
    free_port,
    http_get,
    prometheus,
    pushgateway,
    query,
    wait_for,
)
from tcpproxy import TcpProxy

from job.infra.metrics import Metrics
from job.run.report import write_report

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "monitoring" / "alerts.yaml"
LIVE_RUN = "live-run"
PUSHED_RUN = "pushed-run"
# Grafana's variables, as the dashboard would fill them in
TEMPLATE_VARS = {"$run_id": LIVE_RUN, "$__rate_interval": "1m", "$__range": "1h"}


def feed(metrics: Metrics, i: int) -> None:
    """One logging interval of a pretend training run: every kind of observation."""
    metrics.observe_record(
        {
            "step": 10 * i,
            "epoch": i // 50,
            "images_seen": 640 * i,
            "images_per_s": 900.0 + i % 7,
            "step_s": 0.02 + 0.01 * (i % 5),
            "d_loss": 1.2 - 0.001 * i,
            "g_loss": 0.8 + 0.001 * i,
            "d_real": 0.6,
            "d_fake": 0.3,
            "grad_norm_d": 1.5,
            "grad_norm_g": 2.5,
            "gpu_memory_bytes": 2**30,
            "gpu_memory_peak_bytes": 2**31,
            "data_images_per_s": 5000.0,
            "data_downloaded_bytes": 2**20 * i,
            "data_download_bytes_per_s": 2.0**24,
            "data_cache_bytes": 2**22,
            "time": 1.0,
        }
    )
    metrics.observe_step_seconds(0.02 + 0.01 * (i % 5))
    if i % 10 == 0:
        metrics.observe_fid(300.0 / (1 + i), extractor="cnn28", images_seen=640 * i)
        quality = {"kid": 30.0 / (1 + i), "kid_std": 2.0, "precision": 0.6, "recall": 0.5}
        metrics.observe_quality(quality | {"label_accuracy": 0.9}, extractor="cnn28")
        metrics.observe_best(10 * i, 30.0 / (1 + i), "kid")
        metrics.observe_checkpoint(0.5, step=10 * i)
    if i % 7 == 3:
        metrics.inc_nonfinite()
        metrics.inc_upload_failures()
        metrics.inc_checkpoints_skipped()


def new_metrics(run_id: str) -> Metrics:
    metrics = Metrics()
    metrics.set_info(run_id, dataset="fashion-mnist", model="dcgan", world_size=2, version="0.1.0")
    metrics.inc_resumes()
    return metrics


@pytest.fixture(scope="module")
def live() -> Iterator[str]:
    """A served Metrics fed every 50 ms by a background loop; yields its host:port."""
    metrics, port, stop = new_metrics(LIVE_RUN), free_port(), threading.Event()

    def loop() -> None:
        i = 0
        while not stop.wait(0.05):
            feed(metrics, i)
            i += 1

    feed(metrics, 0)
    metrics.serve(port, addr="127.0.0.1")
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield f"127.0.0.1:{port}"
    stop.set()
    thread.join()
    metrics.close()


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    """A Pushgateway holding the final metrics of a finished run."""
    with pushgateway() as url:
        metrics = new_metrics(PUSHED_RUN)
        for i in range(5):
            feed(metrics, i)
        metrics.push(url, job="gan-job", grouping={"rank": "0"})
        yield url


@pytest.fixture(scope="module")
def prom(live: str, gateway: str) -> Iterator[str]:
    with prometheus([live], pushgateways=[gateway], rule_files=[ALERTS]) as url:
        yield url


def test_endpoint_passes_promtool_check_metrics(live: str) -> None:
    body = http_get(f"http://{live}/metrics")
    check = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert b"gan_step{" in body


def test_every_sample_has_the_run_id(live: str) -> None:
    samples = [
        line
        for line in http_get(f"http://{live}/metrics").decode().splitlines()
        if line and not line.startswith("#")
    ]
    assert samples and all(f'run_id="{LIVE_RUN}"' in s for s in samples)


def test_fresh_metrics_report_unknown_values_not_zeros() -> None:
    body = Metrics().render().decode()
    assert "gan_step 0.0" in body
    assert "gan_discriminator_fake_probability NaN" in body
    assert "gan_fid{" not in body  # no extractor until the first FID


def test_disabled_metrics_do_nothing() -> None:
    metrics = Metrics(enabled=False)
    metrics.serve(free_port())
    metrics.set_info("r", "d", "m", 1, "v")
    feed(metrics, 3)
    metrics.inc_resumes()
    metrics.push("http://127.0.0.1:1", job="gan-job", grouping={})
    metrics.close()
    assert metrics.render() == b""


def test_failed_push_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    new_metrics("r").push(f"http://127.0.0.1:{free_port()}", job="gan-job", grouping={})
    assert "pushing metrics" in caplog.text


def test_push_reaches_the_pushgateway(gateway: str) -> None:
    groups = json.loads(http_get(f"{gateway}/api/v1/metrics"))["data"]
    labels = [g["labels"] for g in groups if "gan_step" in g]
    assert labels == [{"job": "gan-job", "rank": "0", "run_id": PUSHED_RUN}]


@contextmanager
def pushgateway_under(prefix: str, tmp: Path) -> Iterator[int]:
    """A Pushgateway serving its routes under prefix (--web.route-prefix); yields its port."""
    port = free_port()
    argv = [PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}",
            f"--persistence.file={tmp}/pushgateway.data", f"--web.route-prefix={prefix}"]  # fmt: skip
    with _server(argv, f"http://127.0.0.1:{port}{prefix}", tmp / "pushgateway.log"):
        yield port


@pytest.mark.parametrize(("prefix", "tail"), [("", "/?token=s3cret"), ("/pg", "/pg?token=s3cret")])
def test_push_keeps_the_urls_path_prefix_and_sends_its_query(tmp_path, prefix, tail) -> None:
    """Through a proxy that lets only pushes carrying the query through, as a token check does."""
    with pushgateway_under(prefix, tmp_path) as port, TcpProxy(port) as proxy:
        proxy.reject = lambda line: line.startswith(b"PUT") and b"?token=s3cret " not in line
        new_metrics("queried").push(f"http://127.0.0.1:{proxy.port}{tail}", "gan-job", {})
        groups = json.loads(http_get(f"http://127.0.0.1:{port}{prefix}/api/v1/metrics"))["data"]
    assert proxy.rejected == 0
    assert [g["labels"] for g in groups if "gan_step" in g] == [
        {"job": "gan-job", "run_id": "queried"}
    ]


def test_prometheus_scrapes_the_endpoint(prom: str) -> None:
    first = float(wait_for(prom, f'gan_step{{run_id="{LIVE_RUN}"}}')[0]["value"][1])
    time.sleep(1.5)
    assert float(query(prom, f'gan_step{{run_id="{LIVE_RUN}"}}')[0]["value"][1]) > first


def test_pushed_series_have_no_instance_label(prom: str) -> None:
    """What the alerts' instance!="" relies on to ignore finished runs."""
    pushed = wait_for(prom, f'gan_step{{run_id="{PUSHED_RUN}"}}')
    live = wait_for(prom, f'gan_step{{run_id="{LIVE_RUN}"}}')
    assert "instance" not in pushed[0]["metric"]
    assert live[0]["metric"]["instance"]


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((ROOT / "k8s" / "grafana" / "dashboard.json").read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def fill_in(expr: str) -> str:
    for name, value in TEMPLATE_VARS.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def test_every_dashboard_query_returns_data(prom: str) -> None:
    pending = {(title, fill_in(expr)) for title, expr in dashboard_queries()}
    deadline = time.monotonic() + 20
    while pending and time.monotonic() < deadline:
        pending = {(title, expr) for title, expr in pending if not query(prom, expr)}
        time.sleep(0.5)
    assert not pending, f"panels without data: {sorted(pending)}"
    for title, expr in dashboard_queries():
        for series in query(prom, fill_in(expr)):
            assert math.isfinite(float(series["value"][1])), (title, expr, series)


def test_dashboard_run_variable_lists_runs(prom: str) -> None:
    dashboard = json.loads((ROOT / "k8s" / "grafana" / "dashboard.json").read_text())
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "run_id")
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"]).groups()
    runs = {s["metric"][label] for s in wait_for(prom, metric)}
    assert LIVE_RUN in runs


def test_alerts_evaluate_on_real_data(prom: str) -> None:
    """The rules load and run in a real Prometheus; the counter alerts match the live run only
    (pending: their `for:` outlasts the test)."""
    deadline = time.monotonic() + 20
    while True:
        rules = [
            r
            for g in json.loads(http_get(f"{prom}/api/v1/rules"))["data"]["groups"]
            for r in g["rules"]
        ]
        firing = {
            (a["labels"]["alertname"], a["labels"]["run_id"])
            for a in json.loads(http_get(f"{prom}/api/v1/alerts"))["data"]["alerts"]
            if a["state"] in ("pending", "firing")
        }
        expected = {
            ("GanNonFiniteLoss", LIVE_RUN),
            ("GanUploadFailures", LIVE_RUN),
            ("GanCheckpointsSkipped", LIVE_RUN),
        }
        if firing == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(rules) == 6 and all(r["health"] == "ok" for r in rules), rules
    assert firing == expected


def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    for args in (["check", "rules", ALERTS.name], ["test", "rules", "alerts_test.yaml"]):
        run = subprocess.run(
            [PROMTOOL, *args], cwd=ALERTS.parent, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, run.stdout + run.stderr


def test_prometheusrule_and_dashboard_are_generated_from_monitoring() -> None:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "monitoring" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    stale = "stale: run python monitoring/generate.py"
    assert generate.PROMETHEUS_RULE.read_text() == generate.prometheus_rule(ALERTS.read_text()), (
        stale
    )
    assert generate.DASHBOARD.read_text() == generate.render_dashboard(), stale

    rule = yaml.safe_load(generate.PROMETHEUS_RULE.read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def png_grid(seed: int, rgb: bool) -> bytes:
    shape = (66, 66, 3) if rgb else (66, 66)
    pixels = np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("rgb", [False, True])
def test_report_is_a_png_with_plots_and_grids(tmp_path: Path, rgb: bool) -> None:
    records = [
        {
            "step": s,
            "images_seen": 64 * s,
            "d_loss": 1.0,
            "g_loss": 0.7,
            "d_real": 0.6,
            "d_fake": 0.4,
        }
        for s in range(0, 1000, 10)
    ]
    records[5]["d_loss"] = float("nan")
    evals = [
        {
            "step": s,
            "images_seen": 64 * s,
            "fid": 300 / (1 + s),
            "extractor": "cnn28",
            "num_samples": 500,
        }
        for s in (0, 500, 990)
    ]
    grids = [(s, png_grid(s, rgb)) for s in range(0, 1000, 100)]
    path = tmp_path / "report.png"
    png = write_report(records, evals, grids, path, title="test run")
    assert path.read_bytes() == png
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.width >= 1200


def test_report_without_data_still_renders() -> None:
    out = io.BytesIO()
    png = write_report([], [], [], out)
    assert out.getvalue() == png and png.startswith(b"\x89PNG")
