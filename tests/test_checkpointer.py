"""Checkpointer in-process with small components on a real local store: the order components
are restored in, the fresh start, GAN_RESUME paths, and a rollback bounded in time."""

from __future__ import annotations

import time

import pytest
import torch

from job.infra.distributed import World
from job.infra.errors import StorageError
from job.infra.jsonl_log import JsonlLog
from job.infra.local_store import LocalStore
from job.infra.metrics import Metrics
from job.infra.writer import BackgroundWriter
from job.run.checkpoint import Checkpointer, complete_steps

ONE_PROCESS = World(0, 1, 0, torch.device("cpu"))
META = {"settings": {"dataset": "mnist"}, "arch": {"model": "mlp"}, "run_id": "r"}


class Counter:
    """A component: a number, and a log of what the checkpointer did to it."""

    def __init__(self, name: str, calls: list[str]):
        self.name, self.calls, self.value = name, calls, 0

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]
        self.calls.append(f"load {self.name}")

    def start_fresh(self) -> None:
        self.calls.append(f"fresh {self.name}")


def checkpointer(store, writer, calls, **options) -> tuple[Checkpointer, dict[str, Counter]]:
    parts = {name: Counter(name, calls) for name in ("run", "nets", "data")}
    c = Checkpointer(store=store, writer=writer, world=ONE_PROCESS, components=parts, meta=META,
                     compatible_settings=("dataset",), every=10, keep=2, metrics=Metrics(False),
                     **options)  # fmt: skip
    return c, parts


def test_a_fresh_start_gives_every_component_its_fresh_state(tmp_path):
    calls: list[str] = []
    store = LocalStore(tmp_path)
    with BackgroundWriter(store) as writer:
        c, _ = checkpointer(store, writer, calls)
        assert c.restore() is None
    assert calls == ["fresh run", "fresh nets", "fresh data"]


def test_components_are_restored_in_their_order_from_the_newest_checkpoint(tmp_path):
    store = LocalStore(tmp_path)
    with BackgroundWriter(store) as writer:
        c, parts = checkpointer(store, writer, [])
        for step in (10, 20, 30):
            parts["run"].value = step
            c.save(step)
            writer.flush(10)  # else a checkpoint is skipped while the last is still stored
    assert complete_steps(store) == [20, 30]  # keep=2
    calls: list[str] = []
    with BackgroundWriter(store) as writer:
        again, parts = checkpointer(store, writer, calls)
        assert again.restore() == 30
    assert calls == ["load run", "load nets", "load data"] and parts["run"].value == 30


def test_a_resume_path_seeds_only_a_run_without_checkpoints_of_its_own(tmp_path):
    seed, run = LocalStore(tmp_path / "seed"), LocalStore(tmp_path / "run")
    for store, step in ((seed, 100), (run, 40)):
        with BackgroundWriter(store) as writer:
            c, parts = checkpointer(store, writer, [])
            parts["run"].value = step
            c.save(step)
    with BackgroundWriter(run) as writer:
        c, parts = checkpointer(run, writer, [], resume=str(tmp_path / "seed"))
        assert c.restore() == 40 and parts["run"].value == 40
    empty = LocalStore(tmp_path / "new")
    with BackgroundWriter(empty) as writer:
        c, parts = checkpointer(empty, writer, [], resume=str(tmp_path / "seed"))
        assert c.restore() == 100 and parts["run"].value == 100


class RefusingStore(LocalStore):
    """A store whose writes fail (an outage) once `down` is set."""

    down = False

    def put_bytes(self, key: str, data: bytes) -> None:
        if self.down:
            raise StorageError(f"{key}: the store is down")
        super().put_bytes(key, data)


def test_a_rollback_waits_for_queued_checkpoints_at_most_its_timeout(tmp_path):
    store = RefusingStore(tmp_path)
    writer = BackgroundWriter(store, retry_initial=0.05)
    c, parts = checkpointer(store, writer, [], timeout=0.5)
    c.save(10)
    assert writer.flush(10)
    parts["run"].value = 99
    store.down = True
    c.save(20)
    started = time.monotonic()
    with pytest.raises(StorageError, match="uploads still not stored"):
        c.rollback()
    assert time.monotonic() - started < 5
    store.down = False
    assert writer.flush(10)
    assert c.rollback() == 20 and parts["run"].value == 99
    writer.close(10)


def test_a_checkpoint_counts_history_rows_and_a_restart_reads_them_back_from_the_artifact(
    tmp_path,
):
    """A checkpoint's size does not grow with the run's history (metrics.jsonl was 1.6 MB of
    every checkpoint at step 1,000): it holds the row count, the artifact the rows."""
    store = LocalStore(tmp_path)
    with BackgroundWriter(store) as writer:
        history = JsonlLog("metrics.jsonl", writer, store)
        c = Checkpointer(store=store, writer=writer, world=ONE_PROCESS,
                         components={"records": history}, meta=META, compatible_settings=(),
                         every=10, keep=2, metrics=Metrics(False))  # fmt: skip
        for step in range(1, 1001):
            history.append({"step": step, "d_loss": 0.5, "g_loss": 1.5})
        c.save(1000)
        history.append({"step": 1001, "d_loss": 0.5, "g_loss": 1.5})  # logged after it
    assert (tmp_path / "checkpoints/step-00001000/state.pt").stat().st_size < 4096
    with BackgroundWriter(store) as writer:
        again = JsonlLog("metrics.jsonl", writer, store)
        c = Checkpointer(store=store, writer=writer, world=ONE_PROCESS,
                         components={"records": again}, meta=META, compatible_settings=(),
                         every=10, keep=2, metrics=Metrics(False))  # fmt: skip
        assert c.restore() == 1000
    assert [r["step"] for r in again.rows] == list(range(1, 1001))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1000
