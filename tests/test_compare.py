"""`gan-job compare` on real runs, one on local disk and one in SeaweedFS; the dashboard shows
the runs of a sweep side by side."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from job.infra.stores import open_store
from job.tools.compare import read_run
from tests.helpers import REPO, job_env, run_job, write_extractor, write_idx
from tests.test_s3_job import new_bucket, s3_job_env

DASHBOARD = REPO / "k8s" / "grafana" / "dashboard.json"


def start_job(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "job"], env=env, cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, s3):
    """A local run (seed 1, lr 4e-4) and an S3 run (seed 2, lr 1e-3), trained at the same time."""
    tmp = tmp_path_factory.mktemp("compare")
    write_idx(tmp / "data", n=64)
    fid = dict(
        GAN_MAX_STEPS=4, GAN_LOG_EVERY=1, GAN_SAMPLE_EVERY=2, GAN_FID_EVERY=2,
        GAN_FID_NUM_SAMPLES=32, GAN_FID_FEATURES=write_extractor(tmp / "features.pt"),
        GAN_DATASET="mnist", GAN_LR_G=4e-4,
    )  # fmt: skip
    bucket = new_bucket(s3)
    local = job_env(tmp, **fid, GAN_SEED=1, GAN_RUN_ID="local-run")
    remote = s3_job_env(tmp, s3, **fid, GAN_SEED=2, GAN_RUN_ID="s3-run")
    remote |= {"GAN_ARTIFACT_URI": f"s3://{bucket}/runs", "GAN_LR_G": "1e-3"}
    jobs = [start_job(local), start_job(remote)]
    for job in jobs:
        out, _ = job.communicate(timeout=300)
        assert job.returncode == 0, out
    return tmp, f"s3://{bucket}/runs/s3-run", remote


def test_compare_tables_and_plots_a_local_and_an_s3_run(two_runs):
    tmp, s3_run, env = two_runs
    out = tmp / "out"
    # tmp/runs is a prefix holding one run (and fid-stats/): it expands to that run
    result = run_job(env, "compare", str(tmp / "runs"), s3_run, "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr

    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["local-run", "s3-run"]
    assert [r["uri"] for r in rows] == [str(tmp / "runs" / "local-run"), s3_run]
    # the best evaluation, the last one's KID, precision and recall, then the settings that
    # differ, nothing else
    assert list(rows[0])[7:] == ["best_step", "best_score", "last_kid", "kid_std", "precision",
                                 "recall", "lr_g", "seed"]  # fmt: skip
    assert [(r["lr_g"], r["seed"]) for r in rows] == [("0.0004", "1"), ("0.001", "2")]
    for r in rows:
        assert (r["steps"], r["images_seen"]) == ("4", "64")
        assert float(r["wall_s"]) > 0
        assert 0 < float(r["best_fid"]) <= float(r["last_fid"])
    evals = [json.loads(x) for x in (tmp / "runs/local-run/eval.jsonl").read_text().splitlines()]
    assert float(rows[0]["last_fid"]) == evals[-1]["fid"]
    assert float(rows[0]["best_fid"]) == min(e["fid"] for e in evals)
    assert float(rows[0]["last_kid"]) == evals[-1]["kid"]
    assert float(rows[0]["recall"]) == evals[-1]["recall"]
    assert rows[0]["best_step"] == str(evals[-1]["best_step"])
    assert rows[0]["best_score"] == f"kid={evals[-1]['best_value']:.4g}"

    header, *lines = result.stdout.splitlines()[:3]
    assert header.split() == ["run", "steps", "images_seen", "wall_s", "last_fid", "best_fid", "best_step", "best_score", "last_kid", "kid_std", "precision", "recall", "lr_g", "seed"]  # fmt: skip
    assert lines[1].split()[0] == "s3-run" and lines[1].split()[-2:] == ["0.001", "2"]

    png = Image.open(out / "compare.png")
    assert png.format == "PNG" and png.width >= 1200 and png.height >= 600

    # the other way round: a local run named directly, an S3 prefix expanded to its runs
    s3_prefix = s3_run.rsplit("/", 1)[0]
    again = run_job(env, "compare", str(tmp / "runs/local-run"), s3_prefix, "--out", str(out))
    assert again.returncode == 0, again.stdout + again.stderr
    with open(out / "compare.csv") as f:
        assert list(csv.DictReader(f)) == rows


def test_fids_of_float32_sums_are_kept_apart_and_named(two_runs):
    """Records written before FID's sums were float64 read up to a point lower: a run resumed by
    a newer gan-job compares its newer rows only, and compare names runs that have only old ones."""
    tmp, _, env = two_runs
    local = tmp / "runs/local-run"
    rows = [json.loads(x) for x in (local / "eval.jsonl").read_text().splitlines()]
    assert rows and all(r["fid_sums"] == "float64" for r in rows)
    old = tmp / "old/old-run"
    shutil.copytree(local, old)
    config = json.loads((old / "config.json").read_text()) | {"run_id": "old-run"}
    (old / "config.json").write_text(json.dumps(config))
    float32 = [{k: v for k, v in r.items() if k != "fid_sums"} for r in rows]
    (old / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in float32))
    result = run_job(env, "compare", str(local), str(old), "--out", str(tmp / "out-old"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the FIDs of old-run come from float32 sums" in result.stdout

    resumed = read_run(str(old), open_store(str(old)))
    resumed.evals = float32 + rows[-1:]
    assert resumed.fids() == rows[-1:]


def test_compare_refuses_a_uri_that_holds_no_run(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_job(job_env(tmp_path), "compare", str(tmp_path / "empty"), "--out", str(tmp_path))
    assert result.returncode == 2
    assert f"{tmp_path / 'empty'}: no config.json here or in its subfolders" in result.stdout
    assert not (tmp_path / "compare.csv").exists()


# ---------------------------------------------------------------------------- the dashboard


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def test_the_run_variable_selects_many_runs():
    dashboard = json.loads(DASHBOARD.read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "run_id"]
    assert variable["multi"] is True and variable["includeAll"] is True
    assert variable["query"]["query"] == "label_values(gan_run_info, run_id)"


@pytest.mark.parametrize("title,expr", panel_queries(), ids=[t for t, _ in panel_queries()])
def test_every_panel_query_keeps_the_selected_runs_apart(title, expr):
    selectors = re.findall(r"\bgan_\w+\{([^}]*)\}", expr)
    metrics = re.findall(r"\bgan_\w+\b", expr)
    assert selectors and len(selectors) == len(metrics), expr  # every metric has a selector
    assert all('run_id=~"$run_id"' in s for s in selectors), expr
    # every aggregation keeps run_id, so that two runs are two series, not one max of both
    aggregations = re.findall(r"\b(sum|max|min|avg|count)\s*(by\s*\(([^)]*)\))?\s*\(", expr)
    assert aggregations, expr
    for op, by, labels in aggregations:
        assert "run_id" in labels.replace(" ", "").split(","), f"{op} {by}: {expr}"
