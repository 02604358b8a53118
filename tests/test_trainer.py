"""The order of Trainer.run, with fake components that write what they are asked into one list:
a step logs, samples, evaluates and checkpoints in that order; a rollback skips the rest of its
step; the end of a run samples, evaluates, checkpoints and exports; a stop signal checkpoints,
waits for the upload and exits 75 without exporting."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from job.infra.distributed import World
from job.infra.errors import EXIT_OK, EXIT_PREEMPTED
from job.run.train import Trainer

EVERY = 2  # every schedule of the fakes is due on even steps


class Calls(list):
    def __call__(self, name: str, *args):
        self.append((name, *args))


class FakeBudget:
    def __init__(self, calls: Calls, max_steps: int, signal_at: int | None):
        self.calls, self.max_steps, self.signal_at = calls, max_steps, signal_at
        self.state = SimpleNamespace(step=0, images_seen=0, rollbacks=0, advance=self._advance)
        self.stop = SimpleNamespace(set=False, time_left=lambda: 30.0, grace_seconds=30.0)
        self.max_rollbacks = 3

    def _advance(self, images: int) -> None:
        self.state.step += 1
        self.state.images_seen += images

    @property
    def step(self) -> int:
        return self.state.step

    def start(self) -> None:
        self.calls("budget.start")

    def stop_reason(self) -> str | None:
        if self.signal_at is not None and self.step >= self.signal_at:
            return "signal"
        return "max_steps" if self.step >= self.max_steps else None

    def lr_factor(self) -> float:
        return 1.0

    def check_rollback(self) -> str:
        return "non-finite loss"

    def rolled_back(self, rollbacks: int) -> None:
        self.state.rollbacks = rollbacks + 1


def trainer(max_steps: int = 4, signal_at: int | None = None, nonfinite_at: int | None = None):
    calls = Calls()
    budget = FakeBudget(calls, max_steps, signal_at)
    g_ema = object()
    step = lambda: budget.step  # noqa: E731
    parts = SimpleNamespace(
        world=World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")),
        metrics=SimpleNamespace(
            set_info=lambda *a: None,
            inc_resumes=lambda: calls("resumed"),
            inc_nonfinite=lambda: calls("nonfinite"),
        ),
        lock=SimpleNamespace(release=lambda timeout: calls("lock.release")),
        writer=SimpleNamespace(
            disk_full=None,
            refused=None,
            check=lambda: None,
            close=lambda timeout=None: calls("writer.close") or True,
            describe_not_stored=lambda: "nothing",
        ),
        source=SimpleNamespace(
            next=lambda: (torch.zeros(2, 1, 4, 4), None),
            position=SimpleNamespace(epoch=0),
            skipped_images=0,
            stats=lambda: {},
        ),
        nets=SimpleNamespace(
            g_ema=g_ema,
            scale_learning_rates=lambda f: None,
            wrap=lambda **k: 0,
            learning_rates=lambda: {},
        ),
        gan_step=SimpleNamespace(
            train=lambda real, labels, s: calls("train", s + 1) or {"d_loss": torch.tensor(1.0)},
            nonfinite_on_any_rank=lambda world: step() == nonfinite_at,
            grad_norms=lambda: {},
        ),
        budget=budget,
        progress=SimpleNamespace(
            step_done=lambda images, seconds: None,
            due=lambda s, last: last or s % EVERY == 0,
            log=lambda record, stats: calls("log", record["step"]),
            restart_window=lambda: None,
            records=[],
        ),
        fid=SimpleNamespace(
            prepare=lambda: calls("fid.prepare"),
            due=lambda s, last=False: last or s % EVERY == 0,
            evaluate=lambda g, s, images, stop: calls("fid", s) or {"step": s, "fid": 1.0},
            record=lambda row: calls("eval.jsonl", row["step"]),
            records=[],
        ),
        best=SimpleNamespace(
            judge=lambda s, scores, g: calls("best.judge", s) or {},
            stop_reason=lambda: None,
        ),
        checkpointer=SimpleNamespace(
            restore=lambda: None,
            due=lambda s: s % EVERY == 0,
            maybe_save=lambda s, last=False: calls("checkpoint", s, last),
            rollback=lambda: calls("rollback") or 0,
        ),
        artifacts=SimpleNamespace(
            meta={
                "run_id": "r",
                "settings": {"dataset": "d"},
                "arch": {"model": "m"},
                "version": "v",
            },
            write_config=lambda: calls("config.json"),
            maybe_sample=lambda s, g, last=False: calls("sample", s, last),
            report=lambda records, evals: calls("report"),
            export_generator=lambda g, s: calls("export", s),
            restore_grids=lambda s: None,
            announce=lambda s, images: None,
        ),
        upload_timeout=60.0,
        wrap={},
    )
    return Trainer(parts), calls


def test_a_step_logs_samples_evaluates_and_then_checkpoints():
    t, calls = trainer(max_steps=6)
    assert t.run() == EXIT_OK
    step_2 = calls[calls.index(("train", 2)) + 1 : calls.index(("train", 3))]
    assert step_2 == [
        ("log", 2),
        ("sample", 2, False),
        ("fid", 2),
        ("best.judge", 2),
        ("eval.jsonl", 2),
        ("report",),
        ("checkpoint", 2, False),
    ]


def test_the_run_starts_with_config_and_the_real_reference_before_the_budget():
    t, calls = trainer(max_steps=2)
    t.run()
    assert calls[:3] == [("config.json",), ("fid.prepare",), ("budget.start",)]


def test_a_rollback_skips_the_rest_of_its_step_and_training_goes_on():
    t, calls = trainer(max_steps=6, nonfinite_at=4)
    assert t.run() == EXIT_OK
    step_4 = calls[calls.index(("train", 4)) + 1 : calls.index(("train", 5))]
    assert step_4 == [("nonfinite",), ("rollback",)]
    assert ("checkpoint", 6, True) in calls


def test_the_end_of_a_run_samples_evaluates_checkpoints_then_exports_and_reports():
    t, calls = trainer(max_steps=3)
    assert t.run() == EXIT_OK
    end = calls[calls.index(("train", 3)) + 1 :]
    assert end == [
        ("log", 3),
        ("sample", 3, False),
        ("sample", 3, True),
        ("fid", 3),
        ("best.judge", 3),
        ("eval.jsonl", 3),
        ("report",),
        ("checkpoint", 3, True),
        ("export", 3),
        ("report",),
    ]


def test_a_stop_signal_checkpoints_waits_for_the_upload_and_exits_75_without_exporting():
    t, calls = trainer(max_steps=100, signal_at=3)
    assert t.run() == EXIT_PREEMPTED
    end = calls[calls.index(("train", 3)) + 1 :]
    assert end == [("log", 3), ("sample", 3, False), ("checkpoint", 3, True), ("writer.close",)]
