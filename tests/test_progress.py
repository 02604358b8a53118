"""The progress processor (MetricsProcessor) on its own, with a fake Metrics and a real JsonlLog
in a folder store: its schedule, the record it writes, the gauges it sets, the window it times."""

import json
import logging

import torch

from job.infra.distributed import World
from job.infra.jsonl_log import JsonlLog
from job.infra.local_store import LocalStore
from job.infra.writer import BackgroundWriter, NullWriter
from job.run.progress import MetricsProcessor

STATS = ("d_loss", "g_loss", "d_real", "d_fake")


class FakeMetrics:
    def __init__(self):
        self.records, self.step_seconds = [], []

    def observe_record(self, record: dict) -> None:
        self.records.append(record)

    def observe_step_seconds(self, seconds: float) -> None:
        self.step_seconds.append(seconds)


def world(rank: int = 0) -> World:
    return World(rank=rank, world_size=1, local_rank=0, device=torch.device("cpu"))


def processor(tmp_path, rank: int = 0, writer=None):
    store = LocalStore(str(tmp_path))
    writer = writer or BackgroundWriter(store)
    history = JsonlLog("metrics.jsonl", writer, store)
    metrics = FakeMetrics()
    kwargs = {"log_every": 5, "max_steps": 20, "time_left": lambda: 60.0}
    return MetricsProcessor(metrics=metrics, history=history, world=world(rank), **kwargs), metrics


def stats(*values: float) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in zip(STATS, values, strict=True)}


def test_it_is_due_every_log_every_steps_and_at_the_last_step(tmp_path):
    p, _ = processor(tmp_path, writer=NullWriter())
    assert [s for s in range(1, 21) if p.due(s, last=False)] == [5, 10, 15, 20]
    assert p.due(7, last=True)


def test_a_log_step_writes_one_row_sets_the_gauges_and_prints_one_line(tmp_path, caplog):
    p, metrics = processor(tmp_path)
    for _ in range(5):
        p.step_done(images=64, seconds=0.01)
    caplog.set_level(logging.INFO, logger="job.run.progress")
    p.log({"step": 5, "epoch": 0, "images_seen": 320}, stats(1.25, 0.5, 0.75, 0.25))
    assert p.history.writer.close(10)
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["step"] == 5 and row["images_seen"] == 320
    assert (row["d_loss"], row["g_loss"], row["d_real"], row["d_fake"]) == (1.25, 0.5, 0.75, 0.25)
    assert row["images_per_s"] > 0 and row["step_s"] > 0
    assert metrics.records == [row] and metrics.step_seconds == [0.01] * 5
    assert p.records == [row]
    assert "step 5/20" in caplog.text and "D 1.250 G 0.500" in caplog.text


def test_the_timing_window_restarts_after_each_log_and_on_restore(tmp_path):
    p, _ = processor(tmp_path)
    p.step_done(images=64, seconds=0.01)
    assert (p.window_steps, p.window_images) == (1, 64)
    p.log({"step": 1, "epoch": 0, "images_seen": 64}, stats(1, 1, 1, 1))
    assert (p.window_steps, p.window_images) == (0, 0)
    p.step_done(images=64, seconds=0.01)
    p.load_state_dict(p.state_dict())
    assert (p.window_steps, p.window_images) == (0, 0)
    p.history.writer.close(10)


def test_other_ranks_average_but_write_nothing(tmp_path):
    p, metrics = processor(tmp_path, rank=1, writer=NullWriter())
    p.log({"step": 5, "epoch": 0, "images_seen": 320}, stats(1, 1, 1, 1))
    assert p.records == [] and metrics.records == []
    assert not (tmp_path / "metrics.jsonl").exists()


def test_its_checkpoint_state_is_the_row_count(tmp_path):
    p, _ = processor(tmp_path)
    for step in (5, 10):
        p.log({"step": step, "epoch": 0, "images_seen": step * 64}, stats(1, 1, 1, 1))
    assert p.state_dict() == {"count": 2}
    p.history.writer.close(10)
