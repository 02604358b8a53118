"""The best generator and early stopping: BestGenerator in-process on a real local store, and
real runs that stop on a plateau or a target, alone and under torchrun, and keep their best
across a resume."""

from __future__ import annotations

import json
import math

import torch

from job.gan.models import Arch, build_generator
from job.infra.distributed import World
from job.infra.local_store import LocalStore
from job.infra.metrics import Metrics
from job.infra.writer import BackgroundWriter
from job.run.artifacts import RunArtifacts
from job.run.best import BestGenerator
from tests.helpers import job_env, run_job, write_extractor, write_idx

ONE_PROCESS = World(0, 1, 0, torch.device("cpu"))
ARCH = Arch(model="mlp", channels=1, image_size=8, latent_dim=4, width=8, num_classes=0)


def best_of(store, writer, metrics=None, **stops) -> BestGenerator:
    artifacts = RunArtifacts(store=store, writer=writer, world=ONE_PROCESS,
                             meta={"run_id": "r"}, arch=ARCH, sample_every=10, seed=0,
                             startup=[""])  # fmt: skip
    options = dict(patience=0, min_delta=0.0, target_fid=None, target_kid=None) | stops
    return BestGenerator(world=ONE_PROCESS, artifacts=artifacts,
                         metrics=metrics or Metrics(False), **options)  # fmt: skip


def export(store: LocalStore, which: str = "best") -> dict:
    return torch.load(store.local_path(f"{which}/generator.pt"), weights_only=False)


def test_the_best_kid_is_kept_with_its_step_scores_and_weights(tmp_path):
    store, g, metrics = LocalStore(tmp_path), build_generator(ARCH), Metrics()
    with BackgroundWriter(store) as writer:
        best = best_of(store, writer, metrics)
        fields = [best.judge(step, {"fid": fid, "kid": kid}, g)
                  for step, fid, kid in ((10, 9.0, 0.5), (20, 5.0, 0.2), (30, 4.0, 0.3))]  # fmt: skip
    assert [f["best_step"] for f in fields] == [10, 20, 20]
    assert fields[-1] == {"best_step": 20, "best_score": "kid", "best_value": 0.2}
    saved = export(store)
    assert saved["step"] == 20 and saved["scores"] == {"fid": 5.0, "kid": 0.2}
    assert 'gan_best_step{score="kid"} 20.0' in metrics.render().decode()
    assert 'gan_best_score{score="kid"} 0.2' in metrics.render().decode()


def test_fid_decides_where_an_evaluation_has_no_kid(tmp_path):
    store = LocalStore(tmp_path)
    with BackgroundWriter(store) as writer:
        best = best_of(store, writer)
        best.judge(10, {"fid": 9.0}, build_generator(ARCH))
        assert best.judge(20, {"fid": 7.0}, build_generator(ARCH))["best_step"] == 20
    assert best.score == "fid" and best.value == 7.0


def test_patience_counts_evaluations_without_an_improvement_of_min_delta(tmp_path):
    store, g = LocalStore(tmp_path), build_generator(ARCH)
    with BackgroundWriter(store) as writer:
        best = best_of(store, writer, patience=2, min_delta=0.05)
        reasons = []
        for step, kid in ((10, 0.5), (20, 0.46), (30, 0.3), (40, 0.27), (50, 0.29)):
            best.judge(step, {"fid": 1.0, "kid": kid}, g)
            reasons.append(best.stop_reason())
    assert reasons == [None, None, None, None, "plateau"]  # 0.46 and 0.27: less than 0.05 better
    assert best.step == 30


def test_a_target_stops_once_reached(tmp_path):
    store, g = LocalStore(tmp_path), build_generator(ARCH)
    with BackgroundWriter(store) as writer:
        best = best_of(store, writer, target_fid=5.0)
        best.judge(10, {"fid": 9.0, "kid": 0.5}, g)
        assert best.stop_reason() is None
        best.judge(20, {"fid": 5.0, "kid": 0.6}, g)  # the target, on a worse KID
        assert best.stop_reason() == "target"


def test_a_restored_best_is_written_again_over_a_later_one(tmp_path):
    store, g = LocalStore(tmp_path), build_generator(ARCH)
    with BackgroundWriter(store) as writer:
        best = best_of(store, writer)
        best.judge(10, {"fid": 9.0, "kid": 0.5}, g)
        state = best.state_dict()
        best.judge(20, {"fid": 1.0, "kid": 0.1}, build_generator(ARCH))  # then lost to a resume
    with BackgroundWriter(store) as writer:
        again = best_of(store, writer)
        again.load_state_dict(state)
    saved = export(store)
    assert saved["step"] == 10 and again.value == 0.5
    assert all(torch.equal(saved["g_ema"][k], v) for k, v in g.state_dict().items())


# ---------------------------------------------------------------- real runs


def stopping_env(tmp_path, **settings) -> dict[str, str]:
    write_idx(tmp_path / "data", n=256)
    extractor = write_extractor(tmp_path / "features.pt")
    defaults = dict(GAN_DATASET="mnist", GAN_RUN_ID="stop", GAN_FID_FEATURES=extractor,
                    GAN_FID_EVERY=10, GAN_FID_NUM_SAMPLES=64, GAN_CHECKPOINT_EVERY=10,
                    GAN_MAX_STEPS=200)  # fmt: skip
    return job_env(tmp_path, **(defaults | settings))


def evals(run) -> list[dict]:
    return [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]


def test_a_plateau_ends_the_run_with_exit_0_the_final_checkpoint_and_both_generators(tmp_path):
    # no later evaluation can beat the first by a whole unit of KID
    env = stopping_env(tmp_path, GAN_EARLY_STOP_PATIENCE=2, GAN_EARLY_STOP_MIN_DELTA=1.0)
    result = run_job(env)
    log, run = result.stdout + result.stderr, tmp_path / "runs/stop"
    assert result.returncode == 0, log
    assert "stopping at step 30: plateau" in log
    assert [(r["step"], r["best_step"]) for r in evals(run)] == [(10, 10), (20, 10), (30, 10)]
    best, final = (torch.load(run / f"{w}/generator.pt", weights_only=False)
                   for w in ("best", "final"))  # fmt: skip
    assert best["step"] == 10 and best["scores"]["kid"] == evals(run)[0]["kid"]
    assert final["step"] == 30 and (run / "checkpoints/step-00000030/COMPLETE.json").exists()


def test_a_target_stops_two_processes_together(tmp_path):
    env = stopping_env(tmp_path, GAN_TARGET_FID=1e6, GAN_NPROC_PER_NODE=2)
    result = run_job(env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert log.count("stopping at step 10: target") == 2  # both ranks, at the same step
    assert (tmp_path / "runs/stop/best/generator.pt").exists()


def test_a_resumed_run_keeps_its_best(tmp_path):
    env = stopping_env(tmp_path, GAN_EARLY_STOP_MIN_DELTA=1.0, GAN_MAX_STEPS=20)
    assert run_job(env).returncode == 0
    run = tmp_path / "runs/stop"
    (run / "best/generator.pt").write_bytes(b"written by steps a resume goes back over")
    env["GAN_MAX_STEPS"] = "40"
    result = run_job(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["best_step"] for r in evals(run)] == [10, 10, 10, 10]
    assert torch.load(run / "best/generator.pt", weights_only=False)["step"] == 10
    assert not math.isnan(evals(run)[-1]["best_value"])
