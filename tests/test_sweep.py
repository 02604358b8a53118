"""`gan-job sweep`: rows validated up front, each row a real run, and k8s/sweep.yaml's Indexed
Job driving the same command with its completion index."""

from __future__ import annotations

import copy
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.helpers import REPO, job_env, run_job, write_idx
from tests.test_manifests import (
    KUBE_VERSION,
    PERMANENT_EXIT_CODES,
    RETRY_EXIT_CODES,
    SIGKILL_EXIT_CODE,
    crd_errors,
    pod_failure,
)
from tests.test_manifests import (
    test_pods_are_locked_down_bounded_and_have_writable_scratch as check_pod_template,
)

MANIFEST = REPO / "k8s" / "sweep.yaml"


def tiny_env(tmp: Path, **settings: object) -> dict[str, str]:
    write_idx(tmp / "data", n=64)
    return job_env(
        tmp, **{"GAN_DATASET": "mnist", "GAN_MAX_STEPS": 2, "GAN_LOG_EVERY": 1, **settings}
    )


def write_sweep(path: Path, doc: object) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def test_each_row_of_a_sweep_is_its_own_run(tmp_path):
    rows = [
        {"name": "base", "GAN_SEED": 1},
        {"GAN_SEED": 2, "GAN_LR_G": 1e-3},
        {"name": "hinge", "GAN_SEED": 3, "GAN_LOSS": "hinge"},
    ]
    sweep = write_sweep(
        tmp_path / "s.yaml", {"name": "trio", "common": {"GAN_MAX_STEPS": 3}, "rows": rows}
    )
    result = run_job(tiny_env(tmp_path), "sweep", str(sweep), "--parallel", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    runs = tmp_path / "runs" / "trio"
    assert sorted(p.name for p in runs.iterdir() if (p / "config.json").exists()) == [
        "base", "hinge", "trio-1",
    ]  # fmt: skip
    settings = {name: config(runs / name)["settings"] for name in ("base", "trio-1", "hinge")}
    assert [s["seed"] for s in settings.values()] == [1, 2, 3]
    assert settings["trio-1"]["lr_g"] == 1e-3 and settings["base"]["lr_g"] != 1e-3
    assert settings["hinge"]["loss"] == "hinge" and settings["base"]["loss"] == "bce"
    assert {s["max_steps"] for s in settings.values()} == {3}  # common, over the caller's 2
    assert {config(runs / n)["run_id"] for n in settings} == set(settings)
    table = result.stdout.split("sweep trio: 3 rows", 1)[1]
    assert re.search(r"0\s+base\s+0 ", table) and re.search(r"2\s+hinge\s+0 ", table)
    assert "[hinge] " in result.stdout  # parallel rows' lines are told apart


def test_a_bad_row_fails_the_sweep_before_any_row_runs(tmp_path):
    rows = [{"GAN_SEED": 1}, {"name": "typo", "GAN_LRG": 1}, {"name": "neg", "GAN_LR_G": -1}]
    sweep = write_sweep(tmp_path / "bad.yaml", {"rows": rows})
    result = run_job(tiny_env(tmp_path), "sweep", str(sweep))
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert f"{sweep}: row 2 (neg): GAN_LR_G='-1': expected a number > 0" in out
    assert f"{sweep}: row 1 (typo): GAN_LRG: unknown setting" in out
    assert "row 0" not in out
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize(
    "doc,message",
    [
        ({"rows": [{"name": "a/b"}]}, "row 0 (a/b): name 'a/b': expected a value matching"),
        ({"rows": [{"name": "x"}, {"name": "x"}]}, "row 1 (x): name 'x' is used by an earlier row"),
        ({"rows": [{"GAN_RUN_ID": "x"}]}, "row 0: GAN_RUN_ID is set by the sweep"),
        ({"rows": [{"seed": 1}]}, "row 0: 'seed': expected GAN_* variables"),
        ({"rows": [], "name": "s"}, "no rows"),
        ({"rows": [{}], "comon": {}}, "unknown keys ['comon']"),
        ("just text", "expected a list of rows or a mapping with rows:"),
    ],
)
def test_malformed_sweep_files_are_settings_errors(tmp_path, doc, message):
    from job.infra.errors import SettingsError
    from job.tools.sweep import load_sweep

    with pytest.raises(SettingsError, match=re.escape(message)):
        load_sweep(write_sweep(tmp_path / "s.yaml", doc), environ={})


def test_json_lines_and_yaml_values_become_settings(tmp_path):
    from job.tools.sweep import load_sweep

    path = tmp_path / "grid.jsonl"
    path.write_text(
        '{"GAN_SEED": 4, "GAN_SPECTRAL_NORM": true}\n\n{"name": "b", "GAN_LR_D": 0.001}\n'
    )
    sweep = load_sweep(path, environ={"GAN_ARTIFACT_URI": "s3://bucket/runs/"})
    assert sweep.name == "grid" and [r.name for r in sweep.rows] == ["grid-0", "b"]
    env = sweep.rows[0].env
    assert env["GAN_SPECTRAL_NORM"] == "true" and env["GAN_SEED"] == "4"
    assert env["GAN_ARTIFACT_URI"] == "s3://bucket/runs/grid" and env["GAN_RUN_ID"] == "grid-0"
    assert sweep.rows[1].artifacts == "s3://bucket/runs/grid/b"


def test_the_sweep_exits_with_the_first_failing_rows_status(tmp_path):
    rows = [
        {"name": "ok", "GAN_MAX_STEPS": 1},
        {"name": "nodata", "GAN_DATASET": f"folder:{tmp_path}/missing"},  # exit 3
        {"name": "badckpt", "GAN_RESUME": str(tmp_path / "no-checkpoint")},  # exit 5
    ]
    sweep = write_sweep(tmp_path / "s.yaml", {"name": "mixed", "rows": rows})
    result = run_job(tiny_env(tmp_path), "sweep", str(sweep), "--parallel", "3")
    out = result.stdout + result.stderr
    assert result.returncode == 3, out
    table = out.split("sweep mixed: 3 rows", 1)[1]
    assert [re.search(rf"\d+\s+{n}\s+(\d+) ", table).group(1) for n in ("ok", "nodata", "badckpt")] == ["0", "3", "5"]  # fmt: skip
    assert (tmp_path / "runs/mixed/ok/config.json").exists()


# ------------------------------------------------------------------------- k8s/sweep.yaml


def manifest() -> tuple[dict, dict]:
    docs = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text()) if d}
    return docs["ConfigMap"], docs["Job"]


def test_sweep_manifest_passes_strict_schema_validation():
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Job", "PodMonitor"]
    for doc in docs:
        if doc["kind"] == "PodMonitor":
            assert crd_errors(doc) == []
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_sweep_pods_are_locked_down_like_the_other_workloads():
    _, job = manifest()
    template = copy.deepcopy(job["spec"]["template"])
    (container,) = template["spec"]["containers"]
    # the sweep file's read-only ConfigMap volume aside, the same checks as every workload's pods
    template["spec"]["volumes"] = [v for v in template["spec"]["volumes"] if v["name"] != "sweep"]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "sweep"]
    check_pod_template("Job gan-job-sweep", template)
    (main_job,) = [d for d in yaml.safe_load_all((REPO / "k8s/job.yaml").read_text()) if d]
    assert container["image"] == main_job["spec"]["template"]["spec"]["containers"][0]["image"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
    assert job["spec"]["activeDeadlineSeconds"] > 0 and job["spec"]["ttlSecondsAfterFinished"] > 0


def test_every_sweep_pod_is_scraped():
    docs = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text()) if d}
    selector = docs["PodMonitor"]["spec"]["selector"]["matchLabels"]
    labels = docs["Job"]["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    (endpoint,) = docs["PodMonitor"]["spec"]["podMetricsEndpoints"]
    assert "relabelings" not in endpoint  # every index is its own run's rank 0


def test_sweep_job_has_one_index_per_row_and_retries_per_row(tmp_path):
    """What the schema does not check but the API server and the sweep rely on."""
    from job.tools.sweep import load_sweep

    configmap, job = manifest()
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    args = container["args"]
    assert args[:2] == ["sweep", f"{mount['mountPath']}/rows.yaml"]
    assert args[2:] == ["--index", "$(JOB_COMPLETION_INDEX)"]

    assert set(configmap["data"]) == {"rows.yaml"}
    assert spec["completionMode"] == "Indexed"
    (tmp_path / "rows.yaml").write_text(configmap["data"]["rows.yaml"])
    sweep = load_sweep(tmp_path / "rows.yaml", environ={})
    assert spec["completions"] == len(sweep.rows)
    assert 1 <= spec["parallelism"] <= spec["completions"]
    assert 1 <= spec["backoffLimitPerIndex"] <= 10 and "backoffLimit" not in spec
    assert 0 <= spec["maxFailedIndexes"] < spec["completions"]
    assert pod["restartPolicy"] == "Never"

    assert spec["podReplacementPolicy"] == "Failed"
    rules = spec["podFailurePolicy"]["rules"]
    assert {r["action"] for r in rules} <= {"Ignore", "FailJob", "FailIndex", "Count"}
    assert pod_failure(spec, 2)[0] == "FailJob"  # every pod validates every row
    for code in PERMANENT_EXIT_CODES - {2}:
        assert pod_failure(spec, code)[0] == "FailIndex", code
        assert pod_failure(spec, code, disrupted=True)[0] == "FailIndex", code
    for code in RETRY_EXIT_CODES | {1, 143}:
        assert pod_failure(spec, code)[0] == "Count", code
        assert pod_failure(spec, code, disrupted=True)[0] == "Ignore", code
    assert pod_failure(spec, SIGKILL_EXIT_CODE, disrupted=True)[0] == "Count"


def test_a_sweep_pod_runs_the_row_of_its_completion_index(tmp_path):
    """The container's args and env as the manifest gives them, the ConfigMap mounted where the
    pod would see it, and the index the Job controller would set."""
    configmap, job = manifest()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "sweep"]
    mounted = tmp_path / "configmap"
    mounted.mkdir()
    for key, text in configmap["data"].items():
        (mounted / key).write_text(text)

    env = tiny_env(tmp_path)  # stands in for the gan-job-settings ConfigMap (envFrom)
    env |= {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env["GAN_METRICS_PORT"] = "0"  # the pod's 9090 may be taken on a shared test machine
    env["GAN_DEVICE"] = "cpu"  # the pod's cuda: no GPU here
    (index,) = [e for e in container["env"] if e["name"] == "JOB_COMPLETION_INDEX"]
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    env["JOB_COMPLETION_INDEX"] = "1"  # what that annotation holds in the second pod
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    args = [a.replace(mount["mountPath"], str(mounted)) for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "job", *args],  # the image's entrypoint: gan-job
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr

    doc = yaml.safe_load(configmap["data"]["rows.yaml"])
    row = doc["rows"][1]
    runs = tmp_path / "runs" / doc["name"]
    assert [p.name for p in runs.iterdir() if (p / "config.json").exists()] == [row["name"]]
    settings = config(runs / row["name"])["settings"]
    assert settings["seed"] == row["GAN_SEED"] and settings["lr_g"] == float(row["GAN_LR_G"])
    assert settings["recipe"] == doc["common"]["GAN_RECIPE"]


def test_the_documented_sweep_example_is_a_valid_sweep(tmp_path):
    from job.tools.sweep import load_sweep

    doc = (REPO / "docs" / "sweeps.md").read_text()
    example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "lr.yaml").write_text(example)
    sweep = load_sweep(tmp_path / "lr.yaml", environ={"GAN_ARTIFACT_URI": "runs"})
    assert [r.name for r in sweep.rows] == ["slow", "fast", "lr-2"]
    assert sweep.rows[1].artifacts == "runs/lr/fast"


def test_a_stopped_sweep_passes_the_signal_on_and_starts_no_more_rows(tmp_path):
    rows = [{"name": "first"}, {"name": "second"}]
    sweep = write_sweep(tmp_path / "s.yaml", {"name": "stop", "rows": rows})
    env = tiny_env(tmp_path, GAN_MAX_STEPS=100000, GAN_LOG_EVERY=5)
    proc = subprocess.Popen(
        [sys.executable, "-m", "job", "sweep", str(sweep)], env=env, cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step 5/100000" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + proc.stdout.read()
    assert proc.wait(timeout=120) == 75, out
    table = out.split("sweep stop: 2 rows", 1)[1]
    assert re.search(r"0\s+first\s+75 ", table) and re.search(r"1\s+second\s+- ", table), table
    assert (tmp_path / "runs/stop/first/checkpoints").is_dir()  # the row checkpointed
    assert not (tmp_path / "runs/stop/second").exists()
