"""The benchmark runs both loops for real and writes consistent figures (no speed is asserted)."""

import json
import subprocess
import sys

from tests.helpers import REPO, job_env, write_idx


def test_bench_runs_both_loops_and_writes_consistent_json(tmp_path):
    write_idx(tmp_path / "data", n=256)  # gzipped train files only, as a user might have them
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_WIDTH=8) | {"PYTHONPATH": str(REPO)}
    out = tmp_path / "out.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/bench.py", "--steps", "2", "--warmup", "1", "--repeats", "2",
         "--image-size", "28", "--batch-size", "8", "--skip-fid", "--json", str(out)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    job, ref = report["job"], report["ref"]
    assert job["images_per_s_median"] > 0 and ref["images_per_s_median"] > 0
    ratio = job["images_per_s_median"] / ref["images_per_s_median"]
    assert abs(report["ratio"] - ratio) < 1e-9 * ratio and len(report["ratio_pairs"]) == 2
    assert report["arch"]["image_size"] == 28 and report["arch"]["width"] == 8
    assert report["settings"]["batch_size"] == 8 and report["settings"]["dataset"] == "mnist"
    assert job["images_per_window"] == ref["images_per_window"] == 16
    for loop in (job, ref):
        assert all(s >= 0 for s in loop["data_seconds"])
        # one window of two tiny steps can take less CPU than the clock's 10 ms tick
        assert all(c >= 0 for c in loop["cpu_seconds"]) and sum(loop["cpu_seconds"]) > 0
        assert loop["peak_memory_mib"] >= loop["memory_at_window_start_mib"] > 0
        assert loop["dataset_mib"] > 0 and loop["achieved_tflops"] > 0
    assert ref["worker_pss_mib"] > 0  # the tutorial's two DataLoader workers were running
    assert report["flops"]["per_image"] > 0
    assert report["fid"] == {"skipped": "--skip-fid"}
    assert report["torch"] and report["device"] in ("cpu", "cuda")
    assert "ratio job/ref" in result.stdout and "images/s (median)" in result.stdout
