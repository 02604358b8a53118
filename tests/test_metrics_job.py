"""A real Prometheus scrapes a real training run (a shards dataset streamed from a real
SeaweedFS); its final values reach a real Pushgateway."""

import json
import math
import subprocess
import sys
import time

from prom import free_port, http_get, prometheus, pushgateway, query

from tests.helpers import REPO, run_job, write_classifier, write_idx
from tests.test_s3_job import s3_job_env

RUN = "scraped"


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((REPO / "k8s/grafana/dashboard.json").read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def fill_in(expr: str) -> str:
    for name, value in {"$run_id": RUN, "$__rate_interval": "1m", "$__range": "1h"}.items():
        expr = expr.replace(name, value)
    return expr


def test_prometheus_scrapes_a_training_run_and_every_panel_has_data(tmp_path, s3, s3_bucket):
    write_idx(tmp_path / "data", n=512)
    shards = f"s3://{s3_bucket}/digits"
    made = run_job(s3_job_env(tmp_path, s3), "shard", "mnist", shards, "--shard-size", "64",
                   "--data-dir", str(tmp_path / "data"))  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    port = free_port()
    with pushgateway() as gateway, prometheus([f"127.0.0.1:{port}"]) as prom:
        env = s3_job_env(
            tmp_path, s3, GAN_DATASET=f"shards:{shards}", GAN_RUN_ID=RUN, GAN_METRICS_PORT=port,
            GAN_MAX_STEPS=1_000_000, GAN_MAX_MINUTES=1.5, GAN_LOG_EVERY=2, GAN_CHECKPOINT_EVERY=10,
            GAN_FID_EVERY=10, GAN_FID_NUM_SAMPLES=32, GAN_PUSHGATEWAY_URL=gateway,
            # conditional, with a classifier in the extractor: label accuracy has data too
            GAN_CONDITIONAL="true", GAN_FID_FEATURES=write_classifier(tmp_path / "features.pt"),
        )  # fmt: skip
        job = subprocess.Popen([sys.executable, "-m", "job"], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            pending = {(title, fill_in(expr)) for title, expr in dashboard_queries()}
            deadline = time.monotonic() + 80
            while pending and time.monotonic() < deadline and job.poll() is None:
                pending = {(t, e) for t, e in pending if not query(prom, e)}
                time.sleep(1)
            assert job.poll() is None, "the job ended before every panel had data"
            assert not pending, f"panels without data: {sorted(pending)}"
            for title, expr in dashboard_queries():
                for series in query(prom, fill_in(expr)):
                    assert math.isfinite(float(series["value"][1])), (title, series)
            step = float(query(prom, f'gan_step{{run_id="{RUN}"}}')[0]["value"][1])
            assert step > 0
        finally:
            job.terminate()  # SIGTERM: the job checkpoints and exits for a retry
            output, _ = job.communicate(timeout=120)
        assert job.returncode == 75, output
        pushed = json.loads(http_get(f"{gateway}/api/v1/metrics"))
        groups = [g for g in pushed["data"] if g["labels"].get("run_id") == RUN]
        assert groups, pushed
        final_step = groups[0]["gan_step"]["metrics"][0]["value"]
        assert float(final_step) >= step
