"""Real short training runs of the job on CPU, through its entrypoint."""

import json

import torch

from tests.helpers import job_env, run_job, write_extractor, write_idx

SECRET = "wJalrXUtnFEMI-test-secret-never-logged"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def load_state(run, step):
    return torch.load(run / f"checkpoints/step-{step:08d}/state.pt", weights_only=False)


def test_default_dataset_run_writes_every_artifact(tmp_path):
    extractor = write_extractor(tmp_path / "features.pt", channels=1)
    env = job_env(
        tmp_path, GAN_MAX_STEPS=20, GAN_CHECKPOINT_EVERY=10, GAN_SAMPLE_EVERY=10, GAN_FID_EVERY=10,
        GAN_FID_NUM_SAMPLES=64, GAN_FID_FEATURES=extractor, GAN_KEEP_CHECKPOINTS=1,
    )  # fmt: skip
    env["AWS_SECRET_ACCESS_KEY"] = SECRET
    result = run_job(env)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "runs" / "fashion-mnist-dcgan"
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["max_steps"] == 20 and config["arch"]["channels"] == 1
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step-00000010.png",
        "step-00000020.png",
    ]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000020"]  # keep 1
    assert (run / "checkpoints/step-00000020/COMPLETE.json").is_file()
    evals = read_jsonl(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [10, 20]
    assert all(e["extractor"] == "torchscript:features" and e["num_samples"] == 64 for e in evals)
    assert all(e["fid"] > 0 for e in evals)
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert {"d_loss", "g_loss", "d_real", "d_fake", "images_per_s", "images_seen"} <= set(
        records[0]
    )
    assert records[-1]["images_seen"] == 20 * 16
    export = torch.load(run / "final/generator.pt", weights_only=False)
    assert export["step"] == 20 and "g_ema" in export
    assert "step 20/20" in result.stdout and "img/s" in result.stdout and "ETA" in result.stdout
    start = result.stdout.split("INFO starting\n", 1)[1].split(" INFO ", 1)[0]
    assert "run fashion-mnist-dcgan: fresh start, until step 20" in start
    assert f"artifacts: {run}" in start
    assert "data: fashion-mnist from " in start and "60000 images, 10 classes, 1x28x28" in start
    assert "device: cpu (" in start and "x 1 process(es), batch 16 per process" in start
    assert "recipe: fast28 (filled in: model='dcgan', depth=1, loss='bce'" in start
    assert "width=" not in start  # set explicitly, not by the recipe
    assert "FID: torchscript:features, 64 samples, every 10 steps" in start
    everything = result.stdout + result.stderr
    everything += "".join(p.read_bytes().decode("latin1") for p in run.rglob("*") if p.is_file())
    assert SECRET not in everything


def test_time_budget_stops_cleanly_and_a_restart_resumes_from_that_step(tmp_path):
    write_idx(tmp_path / "data", n=512)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=100000, GAN_MAX_MINUTES=0.02,
                  GAN_CHECKPOINT_EVERY=100000)  # fmt: skip
    first = run_job(env)
    assert first.returncode == 0, first.stdout + first.stderr
    run = tmp_path / "runs" / "mnist-dcgan"
    (stopped,) = [int(p.name[5:]) for p in (run / "checkpoints").iterdir()]
    assert 0 < stopped < 100000 and "max_minutes" in first.stdout

    env.update(GAN_MAX_STEPS=str(stopped + 7), GAN_MAX_MINUTES="0")
    second = run_job(env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resumed from step {stopped}" in second.stdout
    assert load_state(run, stopped + 7)["run"]["step"] == stopped + 7
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == stopped + 7


def test_resumed_run_matches_an_uninterrupted_one_bit_for_bit(tmp_path):
    write_idx(tmp_path / "data", n=256)
    common = dict(GAN_DATASET="mnist", GAN_CHECKPOINT_EVERY=6, GAN_CONDITIONAL="true")
    straight = job_env(tmp_path, GAN_RUN_ID="straight", GAN_MAX_STEPS=12, **common)
    assert run_job(straight).returncode == 0
    split = job_env(tmp_path, GAN_RUN_ID="split", GAN_MAX_STEPS=6, **common)
    assert run_job(split).returncode == 0
    split["GAN_MAX_STEPS"] = "12"
    assert run_job(split).returncode == 0
    a, b = load_state(tmp_path / "runs/straight", 12), load_state(tmp_path / "runs/split", 12)
    for net in ("g", "d", "g_ema"):
        for key in a["nets"][net]:
            assert torch.equal(a["nets"][net][key], b["nets"][net][key]), f"{net}.{key} differs"


def test_checkpoint_of_another_model_is_refused(tmp_path):
    write_idx(tmp_path / "data", n=128)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=3, GAN_RUN_ID="r")
    assert run_job(env).returncode == 0
    env["GAN_MODEL"] = "mlp"
    result = run_job(env)
    assert result.returncode == 5
    assert "GAN_RESUME=never" in result.stdout


def test_incomplete_and_corrupt_checkpoints_are_skipped(tmp_path):
    write_idx(tmp_path / "data", n=256)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=6, GAN_CHECKPOINT_EVERY=2,
                  GAN_RUN_ID="r", GAN_MODEL="mlp")  # fmt: skip
    assert run_job(env).returncode == 0
    ckpts = tmp_path / "runs/r/checkpoints"
    (ckpts / "step-00000006/COMPLETE.json").unlink()  # a crash before the marker
    state = ckpts / "step-00000004/state.pt"
    state.write_bytes(state.read_bytes()[:-10] + b"0123456789")  # bit rot
    env["GAN_MAX_STEPS"] = "8"
    result = run_job(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checksum mismatch" in result.stdout
    assert "resumed from step 2" in result.stdout


def test_explicit_fid_extractor_that_is_unavailable_fails_before_training(tmp_path):
    write_idx(tmp_path / "data", n=64)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=3,
                  GAN_FID_INCEPTION_WEIGHTS=tmp_path / "missing.pth", GAN_FID_FEATURES="inception")  # fmt: skip
    result = run_job(env)
    assert result.returncode == 6 and "missing.pth" in result.stdout
    assert not (tmp_path / "runs/mnist-dcgan/checkpoints").exists()


def test_default_fid_without_inception_weights_warns_and_trains(tmp_path):
    write_idx(tmp_path / "data", n=64)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=3, GAN_FID_EVERY=2)
    del env["GAN_FID_FEATURES"]
    env["TORCH_HOME"] = str(tmp_path / "torch")
    result = run_job(env)
    assert result.returncode == 0
    assert "WARNING InceptionV3 weights not found" in result.stdout
    assert not (tmp_path / "runs/mnist-dcgan/eval.jsonl").exists()


def test_folder_dataset_trains_with_a_conditional_mlp(tmp_path):
    from tests.helpers import write_image_folder

    root = write_image_folder(tmp_path / "imgs", per_class=8)
    env = job_env(tmp_path, GAN_DATASET=f"folder:{root}", GAN_MODEL="mlp", GAN_IMAGE_SIZE=16,
                  GAN_CONDITIONAL="true", GAN_MAX_STEPS=4, GAN_BATCH_SIZE=4, GAN_NUM_WORKERS=1,
                  GAN_RUN_ID="folder")  # fmt: skip
    result = run_job(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert load_state(tmp_path / "runs/folder", 4)["meta"]["arch"]["num_classes"] == 2


def test_compiled_run_with_penalties_checkpoints_plain_weights_that_an_eager_run_resumes(tmp_path):
    write_idx(tmp_path / "data", n=128)
    # R1 and R2 every other step: G compiled, D eager for their double backward
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=4, GAN_CHECKPOINT_EVERY=2,
                  GAN_COMPILE="true", GAN_R1_GAMMA=0.1, GAN_R2_GAMMA=0.1, GAN_R1_EVERY=2,
                  GAN_RUN_ID="r")  # fmt: skip
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    compiled = run_job(env)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    state = load_state(tmp_path / "runs/r", 4)
    assert not any(
        "_orig_mod" in k or "module." in k for net in ("g", "d") for k in state["nets"][net]
    )
    env.update(GAN_COMPILE="false", GAN_MAX_STEPS="6")
    eager = run_job(env)
    assert eager.returncode == 0, eager.stdout + eager.stderr
    assert "resumed from step 4" in eager.stdout
    assert load_state(tmp_path / "runs/r", 6)["run"]["step"] == 6
