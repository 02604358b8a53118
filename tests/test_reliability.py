"""Faults injected for real: signals, NaNs, bad files, a full disk, changed settings."""

import ast
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from job.infra import distributed
from job.infra.errors import EXIT_PREEMPTED, NonFiniteLossError
from job.infra.local_store import LocalStore
from job.infra.writer import BackgroundWriter
from job.run import checkpoint
from job.run.build import build
from job.run.train import Trainer
from job.settings import load_settings
from tests.helpers import REPO, job_env, run_job, write_idx, write_image_folder


def start_job(env):
    env = dict(env, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "job"], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def terminate_after(job, marker: str, timeout: float = 120) -> tuple[int, str]:
    """SIGTERM the job once its output shows marker; (exit status, whole output)."""
    lines, deadline = [], time.monotonic() + timeout
    for line in job.stdout:
        lines.append(line)
        if marker in line or time.monotonic() > deadline:
            job.send_signal(signal.SIGTERM)
            break
    rest, _ = job.communicate(timeout=timeout)
    return job.returncode, "".join(lines) + rest


def state_at(run, step):
    return torch.load(run / f"checkpoints/step-{step:08d}/state.pt", weights_only=False)


def checkpoint_steps(run):
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").iterdir())


def assert_same_weights(a, b):
    for net in ("g", "d", "g_ema"):
        for key in a["nets"][net]:
            assert torch.equal(a["nets"][net][key], b["nets"][net][key]), f"{net}.{key} differs"


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_checkpoints_and_the_resumed_run_is_bit_identical(tmp_path, nproc):
    write_idx(tmp_path / "data", n=2048)
    common = dict(GAN_DATASET="mnist", GAN_DEVICE="cpu", GAN_CHECKPOINT_EVERY=100000,
                  GAN_NPROC_PER_NODE=nproc, GAN_LOG_EVERY=10)  # fmt: skip
    env = job_env(tmp_path, GAN_RUN_ID="stopped", GAN_MAX_STEPS=100000, **common)
    code, output = terminate_after(start_job(env), "step 20/")
    assert code == 75, output
    run = tmp_path / "runs/stopped"
    (stopped,) = checkpoint_steps(run)
    assert stopped >= 20 and "stopping at step" in output and ": signal" in output
    assert (run / f"checkpoints/step-{stopped:08d}/COMPLETE.json").is_file()

    end = stopped + 10
    env["GAN_MAX_STEPS"] = str(end)
    resumed = run_job(env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from step {stopped}" in resumed.stdout
    straight = run_job(job_env(tmp_path, GAN_RUN_ID="straight", GAN_MAX_STEPS=end, **common))
    assert straight.returncode == 0, straight.stdout
    assert_same_weights(state_at(run, end), state_at(tmp_path / "runs/straight", end))


def in_process_trainer(tmp_path, poison_at: set[int], again: bool = False, **env):
    """A real Trainer whose D weights are overwritten with NaN after the given steps: once
    (a transient fault), or again each time the run passes those steps."""
    write_idx(tmp_path / "data", n=512)
    settings = load_settings({
        "GAN_DATASET": "mnist", "GAN_DATA_DIR": str(tmp_path / "data"), "GAN_WIDTH": "8",
        "GAN_LATENT_DIM": "16", "GAN_BATCH_SIZE": "16", "GAN_METRICS_PORT": "0",
        "GAN_FID_FEATURES": "none", "GAN_ARTIFACT_URI": str(tmp_path / "runs"),
        "GAN_DEVICE": "cpu", "GAN_CHECKPOINT_EVERY": "5", "GAN_LOG_EVERY": "5", **env,
    })  # fmt: skip
    trainer = Trainer(build(settings, distributed.setup("cpu")))
    trainer.resume()
    real_step = trainer.gan_step.train

    def step(real, labels, at):
        stats = real_step(real, labels, at)
        if at + 1 in poison_at:
            if not again:
                poison_at.discard(at + 1)
            with torch.no_grad():
                next(trainer.nets.d.parameters()).fill_(float("nan"))
        return stats

    trainer.gan_step.train = step
    return trainer


def test_nonfinite_loss_rolls_back_with_lower_learning_rates(tmp_path, caplog):
    trainer = in_process_trainer(tmp_path, poison_at={7}, GAN_MAX_STEPS="12", GAN_LR_DECAY="none")
    assert trainer.run() == 0
    trainer.close()
    assert "rolled back to step 5 with learning rates x0.5" in caplog.text
    assert trainer.budget.state.rollbacks == 1 and trainer.budget.state.step == 12
    assert trainer.nets.opt_d.param_groups[0]["lr"] == pytest.approx(trainer.nets.base_lr["d"] / 2)
    final = state_at(tmp_path / "runs/mnist-dcgan", 12)
    assert final["run"]["rollbacks"] == 1
    d = final["nets"]["d"]
    assert all(torch.isfinite(v).all() for v in d.values() if v.is_floating_point())


def test_nonfinite_loss_fails_when_rollbacks_are_used_up(tmp_path):
    trainer = in_process_trainer(tmp_path, poison_at={7}, again=True, GAN_MAX_STEPS="30",
                                 GAN_NONFINITE_MAX_ROLLBACKS="1")  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="after 1 rollbacks"):
        trainer.run()
    trainer.close()
    assert checkpoint_steps(tmp_path / "runs/mnist-dcgan") == [5]  # nothing poisoned was saved


def test_nonfinite_policy_fail_exits_at_once(tmp_path):
    trainer = in_process_trainer(tmp_path, poison_at={3}, GAN_MAX_STEPS="30", GAN_NONFINITE="fail")
    with pytest.raises(NonFiniteLossError) as info:
        trainer.run()
    trainer.close()
    assert info.value.exit_code == 7 and "GAN_NONFINITE=fail" in str(info.value)


def test_image_folder_with_empty_and_unreadable_files(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=8)
    (root / "cats" / "empty.png").write_bytes(b"")
    (root / "dogs" / "garbage.jpg").write_bytes(b"this is not a JPEG" * 10)
    env = job_env(tmp_path, GAN_DATASET=f"folder:{root}", GAN_MODEL="mlp", GAN_IMAGE_SIZE=16,
                  GAN_MAX_STEPS=8, GAN_BATCH_SIZE=8, GAN_NUM_WORKERS=0, GAN_LOG_EVERY=8)  # fmt: skip
    skipped = run_job(env)
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert "skipping 2 unreadable image files" in skipped.stdout  # by their size or header
    assert "(empty or not images), e.g. " in skipped.stdout
    env["GAN_BAD_IMAGES"] = "fail"
    env["GAN_RUN_ID"] = "strict"
    failed = run_job(env)
    assert failed.returncode == 3 and "empty.png: empty image file" in failed.stdout
    (root / "cats" / "empty.png").unlink()
    failed = run_job(env)
    assert failed.returncode == 3 and "garbage.jpg: unreadable image" in failed.stdout
    assert not (tmp_path / "runs/strict/checkpoints").exists()


def test_truncated_dataset_file_exits_3_naming_it(tmp_path):
    data = write_idx(tmp_path / "data", n=64, gz=False)
    images = data / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    result = run_job(job_env(tmp_path, GAN_DATASET="mnist"))
    assert result.returncode == 3 and "train-images-idx3-ubyte: IDX size mismatch" in result.stdout


def test_resume_with_changed_settings_is_refused(tmp_path):
    write_idx(tmp_path / "data", n=128)
    write_idx(tmp_path / "data/KMNIST/raw", n=128)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=2, GAN_RUN_ID="r")
    assert run_job(env).returncode == 0
    env["GAN_DATASET"] = "kmnist"
    result = run_job(env)
    assert result.returncode == 5
    assert "GAN_DATASET: 'mnist' in the checkpoint, 'kmnist' now" in result.stdout


def test_full_disk_while_checkpointing_exits_8_leaving_no_complete_checkpoint(tmp_path):
    write_idx(tmp_path / "data", n=256)
    disk = tmp_path / "small-disk"
    disk.mkdir()
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=40, GAN_CHECKPOINT_EVERY=4,
                  GAN_WIDTH=32, GAN_ARTIFACT_URI=disk, GAN_RUN_ID="full")  # fmt: skip
    # the job, then a look at what it left, inside a namespace with a 300 KiB tmpfs on disk/
    check = (
        "from job.run import checkpoint; from job.infra.stores import open_store;"
        f"s = open_store('{disk}/full');"
        "print('COMPLETE', [(n, checkpoint.load_verified(s, n)['step']) "
        "for n in checkpoint.complete_steps(s)])"
    )
    script = (
        f'mount -t tmpfs -o size=300k tmpfs "{disk}" || exit 99; "{sys.executable}" -m job; '
        f'code=$?; "{sys.executable}" -c "{check}"; exit $code'
    )
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=180)  # fmt: skip
    assert result.returncode == 8, result.stdout + result.stderr
    assert "No space left on device" in result.stdout
    complete = ast.literal_eval(result.stdout.split("COMPLETE ")[-1].strip())
    assert all(step == loaded for step, loaded in complete)  # every complete one is intact
    assert os.listdir(disk) == []  # the tmpfs lived in the job's namespace only


def test_a_run_seeded_by_gan_resume_path_resumes_from_its_own_checkpoints_after_a_preemption(
    tmp_path,
):
    """GAN_RESUME=<path> seeds a run that has no checkpoints; its retry, with the same
    environment, goes on from its own newest one, which retention keeps."""
    write_idx(tmp_path / "data", n=256)
    seed = job_env(tmp_path, GAN_RUN_ID="seed", GAN_MAX_STEPS=20, GAN_CHECKPOINT_EVERY=10)
    assert run_job(seed).returncode == 0
    env = job_env(tmp_path, GAN_RUN_ID="tuned", GAN_RESUME=str(tmp_path / "runs" / "seed"),
                  GAN_MAX_STEPS=100000, GAN_CHECKPOINT_EVERY=10, GAN_LOG_EVERY=10)  # fmt: skip
    code, first = terminate_after(start_job(env), "checkpoint at step 40 stored")
    assert code == EXIT_PREEMPTED and "resumed from step 20" in first, first
    stop = int(first.split("stopping at step ")[1].split(":")[0])

    code, retry = terminate_after(start_job(env), f"checkpoint at step {stop + 10} stored")
    assert code == EXIT_PREEMPTED, retry
    assert f"resumed from step {stop} " in retry and "resumed from step 20" not in retry
    second_stop = int(retry.split("stopping at step ")[1].split(":")[0])
    assert checkpoint_steps(tmp_path / "runs" / "tuned")[-1] == second_stop


def test_retention_never_deletes_the_checkpoint_just_stored(tmp_path):
    store = LocalStore(tmp_path)
    with BackgroundWriter(store) as writer:
        for step in (100, 200, 300):
            checkpoint.save(writer, step, {"step": step}, keep=2)
        checkpoint.save(writer, 50, {"step": 50}, keep=2)  # a run sent back to an earlier state
    assert checkpoint.complete_steps(store) == [50, 300]


def test_a_disk_that_fills_up_only_at_the_end_of_a_run_exits_8_at_once(tmp_path):
    """Training writes fit; the last checkpoint and final/generator.pt do not."""
    write_idx(tmp_path / "data", n=256)
    disk = tmp_path / "small-disk"
    disk.mkdir()
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=10, GAN_CHECKPOINT_EVERY=1000,
                  GAN_SAMPLE_EVERY=1000, GAN_WIDTH=32, GAN_ARTIFACT_URI=disk, GAN_RUN_ID="full",
                  GAN_UPLOAD_TIMEOUT_MINUTES=5)  # fmt: skip
    script = f'mount -t tmpfs -o size=96k tmpfs "{disk}" || exit 99; exec "{sys.executable}" -m job'
    t0 = time.monotonic()
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    seconds, output = time.monotonic() - t0, result.stdout + result.stderr
    assert result.returncode == 8, output
    last = result.stdout.strip().splitlines()[-1]
    assert "No space left on device" in last and "GAN_UPLOAD_TIMEOUT_MINUTES" not in last, output
    assert "step 10/10" in output and seconds < 60  # GAN_UPLOAD_TIMEOUT_MINUTES: 300 s


def test_sigterm_on_a_full_disk_exits_8_saying_the_disk_is_full(tmp_path):
    """The checkpoint of the stop step does not fit: not a grace period that ran out (10)."""
    write_idx(tmp_path / "data", n=256)
    disk = tmp_path / "small-disk"
    disk.mkdir()
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=100000, GAN_CHECKPOINT_EVERY=100000,
                  GAN_SAMPLE_EVERY=100000, GAN_WIDTH=32, GAN_ARTIFACT_URI=disk, GAN_RUN_ID="full",
                  GAN_LOG_EVERY=5, GAN_GRACE_SECONDS=60)  # fmt: skip
    script = f'mount -t tmpfs -o size=96k tmpfs "{disk}" || exit 99; exec "{sys.executable}" -m job'
    job = subprocess.Popen(["unshare", "-rm", "sh", "-c", script], env=dict(env, PYTHONUNBUFFERED="1"),
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    code, output = terminate_after(job, "step 10/")
    last = output.strip().splitlines()[-1]
    assert code == 8, output
    assert "checkpoint of step" in last and "No space left on device" in last, output
    assert "GAN_GRACE_SECONDS" not in last
