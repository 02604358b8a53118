"""GAN_GLOBAL_BATCH_SIZE: the split over processes and micro-batches, the same first step
whatever the split (real torchrun on CPU), and a resumed run that keeps its global batch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from job.data.batching import BatchPlan, GlobalBatch, plan, plan_from_settings
from job.infra.errors import SettingsError
from job.settings import load_settings
from tests.helpers import REPO, job_env, run_job, write_idx
from tests.test_shards import same, sharded, source, take  # noqa: F401 (sharded: a fixture)

SPLITS = {"2x32": (2, None), "1x64": (1, None), "1x2x32": (1, 32), "2x2x16": (2, 16)}


def test_the_global_batch_splits_over_processes_then_into_the_fewest_equal_micro_batches():
    assert plan(64, 2) == BatchPlan(64, 2, micro_batch=32, accumulation=1)
    assert plan(64, 1, 32) == BatchPlan(64, 1, micro_batch=32, accumulation=2)
    assert plan(96, 2, 32) == BatchPlan(96, 2, micro_batch=24, accumulation=2)
    assert plan(7, 1, 2) == BatchPlan(7, 1, micro_batch=1, accumulation=7)
    assert plan(96, 2, 32).per_process == 48


def test_a_global_batch_the_world_size_does_not_divide_is_a_settings_error():
    with pytest.raises(
        SettingsError, match=r"GAN_GLOBAL_BATCH_SIZE=100: .*world size 3 \(e.g. 99 or 102\)"
    ):
        plan(100, 3)


def test_batch_size_and_global_batch_size_both_given_must_agree():
    assert plan_from_settings(32, True, 64, 2, None).per_process == 32
    assert plan_from_settings(16, False, 64, 2, None).per_process == 32  # filled in by a recipe
    assert plan_from_settings(16, True, None, 2, None).global_batch == 32
    with pytest.raises(SettingsError, match="GAN_BATCH_SIZE=16 with GAN_GLOBAL_BATCH_SIZE=64 .*"
                                            "expected GAN_BATCH_SIZE=32"):  # fmt: skip
        plan_from_settings(16, True, 64, 2, None)


def test_a_checkpoint_s_global_batch_is_kept_unless_the_settings_name_another():
    applied = []

    def component(current: BatchPlan, **kw) -> GlobalBatch:
        options = {"batch_size": 16, "global_given": False, "micro_limit": None} | kw
        return GlobalBatch(current, apply=applied.append, is_main=True, **options)

    kept = component(plan(16, 1))
    kept.load_state_dict({"global_batch": 32, "batch_size": 16})
    assert kept.plan == applied.pop() == plan(32, 1) and kept.state_dict()["global_batch"] == 32
    for told in (component(plan(24, 1), global_given=True), component(plan(24, 1), batch_size=24)):
        told.load_state_dict({"global_batch": 32, "batch_size": 16})
        assert told.plan == plan(24, 1) and not applied
    with pytest.raises(SettingsError, match="global batch of 32 does not split over world size 3: "
                                            "set GAN_GLOBAL_BATCH_SIZE to a multiple of 3"):  # fmt: skip
        component(plan(48, 3)).load_state_dict({"global_batch": 32, "batch_size": 16})


def first_step(tmp_path, processes: int, micro_limit: int | None) -> dict:
    """The worker's first step at a global batch of 64, each rank's output merged."""
    out = tmp_path / f"{processes}-{micro_limit}"
    out.mkdir()
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_GLOBAL_BATCH_SIZE=64, GAN_MAX_STEPS=1,
                  GAN_RUN_ID=out.name, GAN_DEVICE="cpu")  # fmt: skip
    del env["GAN_BATCH_SIZE"]
    if micro_limit:
        env["GAN_MICRO_BATCH_SIZE"] = str(micro_limit)
    env["PYTHONPATH"] = str(REPO)
    worker = ["tests/global_batch_worker.py", str(out)]
    if processes > 1:
        worker = ["-m", "torch.distributed.run", "--standalone",
                  f"--nproc-per-node={processes}", *worker]  # fmt: skip
    result = subprocess.run([sys.executable, *worker], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(processes)]
    return {**ranks[0], "real": torch.cat([r["real"] for r in ranks]), "ranks": ranks}


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("global-batch")
    write_idx(tmp / "data", n=256)
    return {name: first_step(tmp, *split) for name, split in SPLITS.items()}


def sorted_images(real: torch.Tensor) -> torch.Tensor:
    flat = real.flatten(1)
    return flat[torch.argsort(flat.sum(1) + flat[:, 0] * 1e-3)]


def test_two_processes_one_process_and_two_micro_batches_train_on_the_same_global_batch(steps):
    assert [steps[n]["real"].shape[0] for n in SPLITS] == [64, 64, 64, 64]
    assert [steps[n]["micro_batches"] for n in SPLITS] == [1, 1, 2, 2]
    for name in ("1x64", "1x2x32", "2x2x16"):
        assert torch.equal(sorted_images(steps[name]["real"]), sorted_images(steps["2x32"]["real"]))


def test_two_micro_batches_make_the_first_update_of_two_processes(steps):
    """Micro-batch i groups the images rank i would have: the same gradients, BatchNorm's too."""
    ddp, micro = steps["2x32"], steps["1x2x32"]
    for key, grad in ddp["grads"].items():
        assert torch.allclose(micro["grads"][key], grad, rtol=1e-4, atol=1e-6), key
        assert torch.allclose(micro["weights"][key], ddp["weights"][key], atol=1e-6), key


def test_ranks_that_accumulate_micro_batches_average_their_gradients_once_and_agree(steps):
    """DDP syncs in the last micro-batch's backward: both ranks end with the same gradients
    and weights, though each saw other images (BatchNorm statistics stay per rank)."""
    first, second = steps["2x2x16"]["ranks"]
    assert not torch.equal(first["real"], second["real"])
    for key, grad in first["grads"].items():
        assert torch.allclose(second["grads"][key], grad, rtol=1e-5, atol=1e-7), key
        assert torch.equal(second["weights"][key], first["weights"][key]), key


def test_one_process_of_64_makes_nearly_the_same_first_update(steps):
    """One batch of 64 normalises over 64 images, not twice 32: close, not equal (measured:
    cosine 0.999 for D's gradient, 0.95 for G's, whose BatchNorms see only fakes)."""
    for net, least in (("d", 0.99), ("g", 0.9)):
        ddp, whole = (torch.cat([g.flatten() for k, g in steps[name]["grads"].items()
                                 if k.startswith(f"{net}.")]) for name in ("2x32", "1x64"))  # fmt: skip
        assert F.cosine_similarity(ddp, whole, 0) > least, net


def test_a_run_resumed_in_fewer_processes_keeps_its_global_batch(tmp_path):
    """A checkpoint of 2 x 16 resumed in one process trains on 32 a step (settings that name
    another global batch: test_a_checkpoint_s_global_batch_is_kept_unless_the_settings_...)."""
    write_idx(tmp_path / "data", n=256)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=2, GAN_NPROC_PER_NODE=2)
    first = run_job(env)  # 2 processes x 16
    assert first.returncode == 0, first.stdout + first.stderr
    assert "batch 16 per process, global batch 32" in first.stdout

    kept = run_job({**env, "GAN_NPROC_PER_NODE": "1", "GAN_MAX_STEPS": "3"})
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "keeping the checkpoint's global batch 32 under world size 1" in kept.stdout
    assert "x 1 process(es), batch 32 per process, global batch 32" in kept.stdout


def test_settings_that_give_no_global_batch_fail_before_any_work_naming_them():
    with pytest.raises(SettingsError, match="GAN_BATCH_SIZE=16 with GAN_GLOBAL_BATCH_SIZE=64 "
                                            "over 1 process"):  # fmt: skip
        load_settings({"GAN_BATCH_SIZE": "16", "GAN_GLOBAL_BATCH_SIZE": "64"})
    with pytest.raises(SettingsError, match="GAN_GLOBAL_BATCH_SIZE=63: expected a multiple of "
                                            "the world size 2"):  # fmt: skip
        load_settings({"GAN_GLOBAL_BATCH_SIZE": "63", "GAN_NPROC_PER_NODE": "2"})
    assert load_settings({"GAN_BATCH_SIZE": "32", "GAN_GLOBAL_BATCH_SIZE": "64",
                          "GAN_NPROC_PER_NODE": "2", "GAN_DEVICE": "cpu"}).global_batch_size == 64  # fmt: skip


def test_a_shard_source_resized_for_a_kept_global_batch_reads_what_a_source_of_that_size_would(
    s3_env,
    sharded,  # noqa: F811 (test_shards' fixture)
    tmp_path,
):
    """ShardSource.resize, as a checkpoint of 2 x 16 resumed in one process calls it."""
    pair = [source(sharded, tmp_path / "two", rank, 2) for rank in (0, 1)]
    for src in pair:
        take(src, 3)
    one = source(sharded, tmp_path / "one")  # built with 16 a batch, as GAN_BATCH_SIZE says
    one.resize(32)
    one.load_state_dict(pair[0].state_dict())  # 96 images consumed: step 3 at 32 a step
    resumed = take(one, 2)
    assert [x.shape[0] for x, _ in resumed] == [32, 32]
    assert one.state_dict() == {"epoch": 0, "images_consumed": 160}
    assert same(resumed, take(source(sharded, tmp_path / "fresh", batch=32), 5)[3:5])
