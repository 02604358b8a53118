"""`make run`, the README's first command, run for real: its recipe for two minutes and its
threads, read back from the run it leaves."""

import json
import subprocess
import sys

import pytest

from job.infra import threads
from tests.helpers import REPO, job_env, write_extractor, write_idx


@pytest.mark.e2e
def test_make_run_trains_the_two_minute_recipe_on_the_jobs_own_thread_count(tmp_path, monkeypatch):
    write_idx(tmp_path / "data", n=128)
    installed = tmp_path / "installed"  # this venv stands in for make's own: no pip run
    installed.touch()
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=3, GAN_BATCH_SIZE=16)
    for name in ("GAN_WIDTH", "GAN_LATENT_DIM", "GAN_FID_FEATURES", "GAN_LR_DECAY"):
        env.pop(name)  # make run's own values
    env.pop("OMP_NUM_THREADS")
    result = subprocess.run(
        ["make", "-s", "run", f"PYTHON={sys.executable}", f"INSTALLED={installed}",
         f"FEATURES={write_extractor(tmp_path / 'features.pt')}"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "runs" / "mnist-dcgan"
    settings = json.loads((run / "config.json").read_text())["settings"]
    assert (settings["width"], settings["depth"], settings["recipe"]) == (16, 1, "fast28")
    assert settings["lr_decay"] == "linear" and settings["max_minutes"] == 2
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # what the job saw
    derived = threads.choose(None, 1)
    assert f"threads: {derived.count} per process ({derived.why})" in result.stdout
    assert [json.loads(line)["step"] for line in (run / "eval.jsonl").open()][-1] == 3
    assert (run / "final" / "generator.pt").is_file()
