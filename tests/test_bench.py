"""The benchmark runs both loops for real and writes consistent figures (no speed is asserted)."""

import json
import subprocess
import sys

from tests.helpers import REPO, job_env, write_idx


def test_bench_runs_both_loops_and_writes_consistent_json(tmp_path):
    write_idx(tmp_path / "data", n=256)  # gzipped train files only, as a user might have them
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_WIDTH=8)
    out = tmp_path / "out.json"
    result = subprocess.run(
        [sys.executable, "-m", "job.bench", "--steps", "2", "--warmup", "1", "--repeats", "1",
         "--image-size", "28", "--batch-size", "8", "--skip-fid", "--json", str(out)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    job, ref = report["job"]["images_per_s_median"], report["ref"]["images_per_s_median"]
    assert job > 0 and ref > 0
    assert abs(report["ratio"] - job / ref) < 1e-9 * report["ratio"]
    assert report["arch"]["image_size"] == 28 and report["arch"]["width"] == 8
    assert report["settings"]["batch_size"] == 8 and report["settings"]["dataset"] == "mnist"
    assert report["job"]["images_per_window"] == report["ref"]["images_per_window"] == 16
    assert all(s >= 0 for s in report["job"]["data_seconds"] + report["ref"]["data_seconds"])
    assert report["job"]["peak_memory_mib"] > 0 and report["ref"]["peak_memory_mib"] > 0
    assert report["flops"]["per_image"] > 0
    assert report["fid"] == {"skipped": "--skip-fid"}
    assert report["torch"] and report["device"] in ("cpu", "cuda")
    assert "ratio job/ref" in result.stdout and "images/s" in result.stdout
