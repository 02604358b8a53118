"""scripts/gpu_check.py: its --dry mode end to end on the CPU (so that the command a lent GPU
runs cannot rot), and a part that hangs ends at its timeout without taking the others along."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tarfile
import time

import pytest

from tests.helpers import REPO, write_extractor, write_idx

SCRIPT = REPO / "scripts" / "gpu_check.py"


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.e2e
def test_the_dry_gpu_check_runs_every_part_on_the_cpu_and_writes_its_summary(tmp_path):
    write_idx(tmp_path / "data", n=256)
    features = write_extractor(tmp_path / "features.pt")
    out, export = tmp_path / "out", tmp_path / "export"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry", "--data", str(tmp_path / "data"), "--features",
         str(features), "--out", str(out), "--export", str(export)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    parts = summary["parts"]
    r3gan_rows = {"bench-r3gan32-8-eager": (32, 8, 8), "bench-r3gan256-2-eager": (256, 2, 4)}
    assert set(parts) == {"tests", "train", "evaluate", "bench-16-eager", *r3gan_rows}
    assert (
        all(p["status"] == "ok" for p in parts.values()) and summary["ok"] and summary["finished"]
    )
    tests = parts["tests"]
    assert tests["passed"] >= 3 and tests["failed"] == 0 and not tests["failures"]
    assert parts["train"]["steps"] == 12 and parts["train"]["recipe"] == "fast28"
    assert parts["train"]["device_line"].startswith("cpu")
    assert parts["evaluate"]["num_samples"] == 48 and parts["evaluate"]["fid"] >= 0
    bench = parts["bench-16-eager"]
    assert bench["batch"] == 16 and bench["compile"] is False and bench["ratio"] > 0
    assert bench["job_images_per_s"] > 0 and bench["fid"]["samples"] == 32
    assert (bench["model"], bench["image_size"]) == ("dcgan", 28)
    for name, (size, batch, width) in r3gan_rows.items():
        row = parts[name]
        assert (row["model"], row["image_size"], row["batch"], row["width"]) == (
            "r3gan", size, batch, width,
        )  # fmt: skip
        assert row["job_images_per_s"] > 0 and row["ratio"] > 0 and row["gflop_per_image"] > 0
        assert row["bf16"] is False and row["fid"]["skipped"] == "--skip-fid"  # CPU: GAN_AMP=auto
    md = (out / "summary.md").read_text()
    assert "| 16 | off |" in md and "| 12 |" in md and "| tests | ok |" in md
    assert "| 32 | 8 | 8 | off |" in md and "| 256 | 4 | 2 | off |" in md
    assert sorted(p.name for p in export.iterdir()) == sorted(gpu_check_module().EXPORTED)
    with tarfile.open(export / "outputs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"tests.xml", "train.log", "evaluate.json", "bench-16-eager.json"} <= names
    assert "train/gpu-check/metrics.jsonl" in names and not [n for n in names if ".pt" in n]
    assert "bench-r3gan256-2-eager.json" in names and not [n for n in names if "images/" in n]


def test_a_part_that_hangs_is_killed_at_its_timeout(tmp_path):
    module = gpu_check_module()
    hang = [sys.executable, "-c", "import time; time.sleep(600)"]
    part = module.Part("hang", hang, {}, tmp_path, timeout=1).start()
    quick = module.Part("quick", [sys.executable, "-c", "print('done')"], {}, tmp_path, 30).start()
    t0 = time.monotonic()
    assert part.wait()["status"] == "timeout" and time.monotonic() - t0 < 15
    assert part.proc.poll() is not None
    assert quick.wait()["status"] == "ok" and "done" in (tmp_path / "quick.log").read_text()


def test_a_killed_test_run_is_counted_from_its_verbose_lines(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text(
        "tests/test_gpu.py::test_a[cuda] PASSED                [ 10%]\n"
        "tests/test_gpu.py::test_b[cuda] XFAIL (reason)        [ 20%]\n"
        "tests/test_gpu.py::test_c[cuda] FAILED                [ 30%]\n"
        "tests/test_gpu.py::test_d[cpu] SKIPPED (no CUDA)      [ 40%]\n"
        "tests/test_gpu.py::test_e[cuda] \n"
    )
    found = gpu_check_module().verbose_counts(log)
    assert {k: found[k] for k in ("passed", "failed", "skipped", "xfailed")} == {
        "passed": 1, "failed": 1, "skipped": 1, "xfailed": 1,
    }  # fmt: skip
    assert found["failures"] == [
        "tests/test_gpu.py::test_c[cuda]",
        "killed while running tests/test_gpu.py::test_e[cuda]",
    ]


def test_test_outcomes_are_counted_from_pytests_junit_xml(tmp_path):
    xml = tmp_path / "tests.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu" name="test_a[cuda]"/>'
        '<testcase classname="tests.test_gpu" name="test_b[cuda]"><failure/></testcase>'
        '<testcase classname="tests.test_gpu" name="test_c[cuda]">'
        '<skipped type="pytest.xfail" message="known"/></testcase>'
        '<testcase classname="tests.test_gpu" name="test_d[cuda]">'
        '<skipped type="pytest.skip" message="no CUDA GPU visible&#10;more"/></testcase>'
        "</testsuite></testsuites>"
    )
    found = gpu_check_module().junit_counts(xml)
    assert {k: found[k] for k in ("passed", "failed", "skipped", "xfailed")} == {
        "passed": 1, "failed": 1, "skipped": 1, "xfailed": 1,
    }  # fmt: skip
    assert found["failures"] == ["test_b[cuda]: "]
    assert found["skip_reasons"] == {"no CUDA GPU visible": 1}
