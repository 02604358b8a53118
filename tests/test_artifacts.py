"""RunArtifacts in-process on a real local store: grids on their schedule and held within
bounds, grids restored from the names they were written with, the report and the export."""

from __future__ import annotations

import torch

from job.gan.models import Arch, build_generator
from job.infra.distributed import World
from job.infra.local_store import LocalStore
from job.infra.writer import BackgroundWriter
from job.run.artifacts import MAX_GRIDS_KEPT, RunArtifacts, grid_key

PNG = b"\x89PNG"
ARCH = Arch(model="mlp", channels=1, image_size=8, latent_dim=4, width=8, num_classes=0)


def artifacts(store, writer, rank: int = 0) -> RunArtifacts:
    return RunArtifacts(store=store, writer=writer, world=World(rank, 2, 0, torch.device("cpu")),
                        meta={"run_id": "r", "arch": ARCH.to_dict()}, arch=ARCH, sample_every=10,
                        seed=0, startup=["until step 100"])  # fmt: skip


def test_grids_follow_their_schedule_and_the_report_and_export_are_stored(tmp_path):
    store, g = LocalStore(tmp_path), build_generator(ARCH)
    with BackgroundWriter(store) as writer:
        a = artifacts(store, writer)
        for step in range(1, 26):
            a.maybe_sample(step, g)
        a.maybe_sample(25, g, last=True)
        a.report([{"step": 5, "images_seen": 80, "d_loss": 1.0, "g_loss": 1.0, "d_real": 0.5,
                   "d_fake": 0.5}], [])  # fmt: skip
        a.export_generator(g, 25)
    assert sorted(store.list("samples/")) == [grid_key(s) for s in (10, 20, 25)]
    assert store.get_bytes("report.png").startswith(PNG)
    assert set(torch.load(store.local_path("final/generator.pt"))) == {"arch", "g_ema", "step"}


def test_grids_in_memory_stay_bounded_keeping_the_first_and_the_last(tmp_path):
    store, g = LocalStore(tmp_path), build_generator(ARCH)
    with BackgroundWriter(store) as writer:
        a = artifacts(store, writer)
        for step in range(10, 1010, 10):
            a.maybe_sample(step, g)
            writer.flush(10)
    assert len(a.grids) == MAX_GRIDS_KEPT and {10, 1000} <= set(a.grids)
    assert len(store.list("samples/")) == 100  # every grid is stored


def test_grids_are_restored_up_to_the_checkpoint_ignoring_other_objects(tmp_path):
    store = LocalStore(tmp_path)
    for key in (grid_key(10), grid_key(20), grid_key(30), "samples/notes.txt",
                "samples/step-abc.png", "samples/old/step-00000005.png"):  # fmt: skip
        store.put_bytes(key, PNG + key.encode())
    with BackgroundWriter(store) as writer:
        a = artifacts(store, writer)
        a.restore_grids(20)
        other_rank = artifacts(store, writer, rank=1)
        other_rank.restore_grids(20)
    assert a.grids == {10: PNG + grid_key(10).encode(), 20: PNG + grid_key(20).encode()}
    assert other_rank.grids == {}
