"""The evaluation end to end: a tiny conditional run records KID, precision/recall and label
accuracy; `gan-job evaluate` measures a finished run without touching it; two ranks measure what
one process does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from job.infra import errors
from job.infra.errors import SettingsError
from job.tools.evaluate import load_run
from job.tools.evaluate import main as evaluate_main
from tests import eval_worker
from tests.helpers import REPO, job_env, run_job, write_classifier, write_idx


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    write_idx(tmp / "data", n=128)
    features = write_classifier(tmp / "squares.pt")
    env = job_env(tmp, GAN_DATASET="mnist", GAN_CONDITIONAL="true", GAN_MAX_STEPS=4,
                  GAN_FID_EVERY=2, GAN_FID_NUM_SAMPLES=40, GAN_FID_FEATURES=features,
                  GAN_RUN_ID="cond")  # fmt: skip
    result = run_job(env)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp, env, tmp / "runs" / "cond"


def test_a_conditional_run_records_kid_precision_recall_and_label_accuracy(finished_run):
    _, _, run = finished_run
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["num_samples"] == 40 and r["num_real"] == 40 and r["kid_subset_size"] == 20
        assert r["kid_std"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert 0 <= r["label_accuracy"] <= 1 and len(r["label_accuracy_per_class"]) == 10
    assert (run / "report.png").stat().st_size > 0


def test_gan_job_evaluate_prints_a_table_and_a_json_line_and_leaves_the_run_alone(
    finished_run, capsys
):
    tmp, env, run = finished_run
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    out = tmp / "eval" / "cond.json"
    result = run_job(env, "evaluate", str(run), "--num", "60", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    values = json.loads(out.read_text())
    assert values["step"] == 4 and values["num_samples"] == 60 and values["num_real"] == 60
    assert values["extractor"] == "torchscript:squares" and values["kid_subset_size"] == 30
    assert len(values["label_accuracy_per_class"]) == 10
    lines = result.stdout.splitlines()
    assert any(line.startswith("KID ") and "±" in line for line in lines)
    assert any(line.startswith("label accuracy") for line in lines)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    # the same in this process, the JSON line on stdout: the same numbers for the same seed
    assert evaluate_main([str(run), "--num", "60"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed | {"seconds": 0} == values | {"seconds": 0}
    with pytest.raises(SettingsError, match="--num 3: expected an integer from 10 to 1000000"):
        evaluate_main([str(run), "--num", "3"])


def test_two_ranks_measure_what_one_process_measures(tmp_path):
    features = str(write_classifier(tmp_path / "squares.pt"))
    env = job_env(tmp_path)
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "tests/eval_worker.py", str(tmp_path), features]  # fmt: skip
    two = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stdout + two.stderr
    eval_worker.main(tmp_path, features)
    single, rank0, rank1 = (
        torch.load(tmp_path / name, weights_only=False)
        for name in ("rank0-of-1.pt", "rank0-of-2.pt", "rank1-of-2.pt")
    )
    assert set(rank1) == {"fid"} and rank1["fid"] == rank0["fid"]
    assert set(rank0) == set(single) and "label_accuracy" in single and "kid" in single
    for key, value in single.items():
        close = pytest.approx(value, abs=1e-3 if key == "fid" else 1e-6)  # FID: summed by rank
        assert rank0[key] == close, key


def copy_with_best(run: Path, to: Path) -> Path:
    """A copy of the run whose best/generator.pt (as training keeps it: arch, g_ema, step,
    scores) holds other weights than its final generator, from step 2."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "best", ignore_errors=True)
    final = torch.load(to / "final/generator.pt", weights_only=False)
    weights = {k: v * 0.5 if v.is_floating_point() else v for k, v in final["g_ema"].items()}
    (to / "best").mkdir()
    best = {"arch": final["arch"], "g_ema": weights, "step": 2, "scores": {"fid": 12.5}}
    torch.save(best, to / "best/generator.pt")
    return to


def measured(argv: list[str], out: Path) -> dict:
    assert evaluate_main([*argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_evaluate_which_best_measures_the_best_generator_at_its_step(finished_run, tmp_path):
    _, env, run = finished_run
    copy = copy_with_best(run, tmp_path / "run")
    out = tmp_path / "best.json"
    result = run_job(
        env, "evaluate", str(copy), "--num", "20", "--which", "best", "--out", str(out)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    best = json.loads(out.read_text())
    final = measured([str(copy), "--num", "20", "--which", "final"], tmp_path / "final.json")
    assert (best["step"], best["which"], final["step"], final["which"]) == (2, "best", 4, "final")
    assert best["fid"] != final["fid"]
    g, _, settings, step = load_run(str(copy), None, "best")
    saved = torch.load(copy / "best/generator.pt", weights_only=False)["g_ema"]
    assert step == 2 and settings["run_id"] == "cond"
    assert all(torch.equal(v, saved[k]) for k, v in g.state_dict().items())


def test_evaluate_which_best_of_a_run_without_best_exits_5_naming_it(finished_run, tmp_path):
    _, env, run = finished_run
    copy = copy_with_best(run, tmp_path / "run")
    shutil.rmtree(copy / "best")
    result = run_job(env, "evaluate", str(copy), "--num", "20", "--which", "best")
    assert result.returncode == errors.EXIT_CHECKPOINT, result.stdout + result.stderr
    assert f"{copy}: no best/generator.pt" in result.stdout and "Traceback" not in result.stdout


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory) -> Path:
    """A finished MLP run: unlike the 4-step DCGAN's, its images differ from one z to the next."""
    tmp = tmp_path_factory.mktemp("mlprun")
    write_idx(tmp / "data", n=128)
    env = job_env(tmp, GAN_DATASET="mnist", GAN_MODEL="mlp", GAN_MAX_STEPS=4, GAN_RUN_ID="mlp",
                  GAN_FID_FEATURES=write_classifier(tmp / "squares.pt"))  # fmt: skip
    result = run_job(env)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp / "runs" / "mlp"


def test_evaluate_truncation_changes_the_samples_and_psi_1_is_none(mlp_run, tmp_path):
    argv = [str(mlp_run), "--num", "20"]
    plain = measured(argv, tmp_path / "plain.json")
    one = measured([*argv, "--truncation", "1"], tmp_path / "one.json")
    half = measured([*argv, "--truncation", "0.5"], tmp_path / "half.json")
    assert plain | {"seconds": 0} == one | {"seconds": 0} and plain["truncation"] == 1.0
    assert half["truncation"] == 0.5 and half["fid"] != plain["fid"]


def test_evaluate_bad_truncation_or_which_exits_2_naming_the_flag(finished_run, capsys):
    _, env, run = finished_run
    result = run_job(env, "evaluate", str(run), "--truncation", "1.5")
    assert result.returncode == errors.EXIT_SETTINGS, result.stdout + result.stderr
    assert "--truncation 1.5: expected 0 < PSI <= 1" in result.stdout
    with pytest.raises(SettingsError, match="--truncation 0.0: expected 0 < PSI <= 1"):
        evaluate_main([str(run), "--truncation", "0"])
    with pytest.raises(SystemExit) as exit_:
        evaluate_main([str(run), "--which", "worst"])
    assert exit_.value.code == errors.EXIT_SETTINGS
    assert "argument --which: invalid choice: 'worst'" in capsys.readouterr().err
