"""`gan-job compare URI...`: runs side by side, as a table (terminal and CSV) and one PNG.

A URI is a run (a local folder or s3:// prefix holding config.json) or a sweep prefix, which
stands for every subfolder that holds a config.json. From each run: config.json (settings),
metrics.jsonl (steps, images seen, the time per step), eval.jsonl (FID, and where measured KID,
precision, recall, label accuracy) and the last sample grid.

Wall time is training time: the sum over log intervals of steps x seconds per step, so the
hours a preempted run spent waiting for its retry do not count.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter
from PIL import Image

from job.infra.errors import SettingsError
from job.infra.store import Store
from job.infra.stores import open_store
from job.run import outputs
from job.run.generator_file import read_config
from job.run.report import WIDTH_IN, fid_sums, no_data, setup_axes, widen_single_x

log = logging.getLogger(__name__)

SAME_BY_NATURE = {"run_id", "artifact_uri"}  # differ between any two runs: not a difference


@dataclass
class Run:
    name: str
    uri: str
    settings: dict[str, Any]
    records: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    grid: bytes | None = None

    @property
    def steps(self) -> int:
        return int(self.records[-1]["step"]) if self.records else 0

    @property
    def images_seen(self) -> int:
        return int(self.records[-1].get("images_seen", 0)) if self.records else 0

    def wall_seconds(self) -> np.ndarray:
        """Training seconds elapsed at each record."""
        done, total, out = 0, 0.0, []
        for r in self.records:
            step = int(r["step"])
            total += max(step - done, 0) * float(r.get("step_s", 0.0))
            done = step
            out.append(total)
        return np.array(out)

    def fids(self) -> list[dict]:
        """The FID rows of the extractor, sample count and sums last used (others do not
        compare: a run resumed by a newer gan-job has float32 rows, then float64 ones)."""
        if not self.evals:
            return []
        key = _fid_kind(self.evals[-1])
        return [e for e in self.evals if _fid_kind(e) == key]

    def fid_seconds(self) -> np.ndarray:
        """Training seconds at each FID row: those of the first record at or after its step."""
        steps = np.array([int(r["step"]) for r in self.records])
        wall = self.wall_seconds()
        out = []
        for e in self.fids():
            i = np.searchsorted(steps, int(e["step"])) if len(steps) else 0
            out.append(wall[min(i, len(wall) - 1)] if len(wall) else np.nan)
        return np.array(out, dtype=float)


def best_evaluation(run: Run) -> tuple[int | str, str]:
    """(step, "score=value") of the run's best evaluation: as training recorded it (best_step
    in eval.jsonl), or for runs from before, their lowest KID (FID where there is no KID)."""
    rows = run.fids()
    if not rows:
        return "", ""
    last = rows[-1]
    if "best_step" in last:
        return last["best_step"], f"{last['best_score']}={last['best_value']:.4g}"
    score = "kid" if "kid" in last else "fid"
    row = min((e for e in rows if score in e), key=lambda e: float(e[score]))
    return row["step"], f"{score}={float(row[score]):.4g}"


def _fid_kind(row: dict) -> tuple:
    return row.get("extractor"), row.get("num_samples"), fid_sums(row)


def find_runs(uri: str, endpoint_url: str | None = None) -> list[tuple[str, Store]]:
    """(uri, store) of the run at uri, or of every run one level below it (a sweep)."""
    store = open_store(uri, endpoint_url)
    if store.exists("config.json"):
        return [(uri, store)]
    subs = sorted(
        k.split("/")[0] for k in store.list() if k.count("/") == 1 and k.endswith("/config.json")
    )
    if not subs:
        raise SettingsError(
            [f"{uri}: no config.json here or in its subfolders: not a run or a sweep"]
        )
    return [(f"{uri.rstrip('/')}/{sub}", store.child(sub)) for sub in subs]


def read_run(uri: str, store: Store) -> Run:
    config = read_config(store)
    grids = sorted(k for k in store.list("samples/") if k.endswith(".png"))
    return Run(
        name=str(config.get("run_id") or uri.rstrip("/").rsplit("/", 1)[-1]),
        uri=uri,
        settings={**config.get("settings", {}), "world_size": config.get("world_size")},
        records=_jsonl(store, "metrics.jsonl"),
        evals=_jsonl(store, "eval.jsonl"),
        grid=store.get_bytes(grids[-1]) if grids else None,
    )


def _jsonl(store: Store, key: str) -> list[dict]:
    if not store.exists(key):
        return []
    return [json.loads(line) for line in store.get_bytes(key).decode().splitlines() if line.strip()]


def differing(runs: Sequence[Run]) -> list[str]:
    """Settings whose values are not the same in every run, in settings order."""
    keys = list(dict.fromkeys(k for r in runs for k in r.settings))
    return [
        k
        for k in keys
        if k not in SAME_BY_NATURE and len({json.dumps(r.settings.get(k)) for r in runs}) > 1
    ]


# the last evaluation's other metrics, as table columns, when any run measured them
QUALITY_COLUMNS = {
    "kid": "last_kid",
    "kid_std": "kid_std",
    "precision": "precision",
    "recall": "recall",
    "label_accuracy": "label_accuracy",
}


def table(runs: Sequence[Run]) -> list[dict[str, Any]]:
    measured = {k for r in runs for e in r.fids() for k in QUALITY_COLUMNS if k in e}
    rows = []
    for r in runs:
        fids = [float(e["fid"]) for e in r.fids()]
        last = r.fids()[-1] if fids else {}
        wall = r.wall_seconds()
        best_step, best_score = best_evaluation(r)
        rows.append(
            {
                "run": r.name,
                "uri": r.uri,
                "steps": r.steps,
                "images_seen": r.images_seen,
                "wall_s": round(float(wall[-1]), 1) if len(wall) else "",
                "last_fid": fids[-1] if fids else "",
                "best_fid": min(fids) if fids else "",
                "best_step": best_step,
                "best_score": best_score,
                **{col: _value(last.get(k)) for k, col in QUALITY_COLUMNS.items() if k in measured},
                **{k: _value(r.settings.get(k)) for k in differing(runs)},
            }
        )
    return rows


def _value(v: object) -> object:
    return "" if v is None else v


def write_csv(rows: list[dict[str, Any]], out: Path) -> None:
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = [c for c in rows[0] if c != "uri"]
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_png(runs: Sequence[Run], out: Path) -> None:
    """FID against images seen and against wall time, KID against images seen for every run,
    the settings that differ, and each run's last sample grid side by side."""
    keys = differing(runs)
    grid_h = min(WIDTH_IN / max(len(runs), 1), 3.6) + 0.6
    fig = Figure(figsize=(WIDTH_IN, 4.2 + grid_h), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(f"{len(runs)} runs compared", fontsize=14)
    top, bottom = fig.subfigures(2, 1, height_ratios=[4.2, grid_h])
    by_images, by_time, kid, text = top.subplots(1, 4, width_ratios=[1, 1, 1, 0.8])
    _plot_fid(by_images, runs, wall=False)
    _plot_fid(by_time, runs, wall=True)
    _plot_kid(kid, runs)
    _settings_text(text, runs, keys)
    axes = np.atleast_1d(bottom.subplots(1, len(runs)))
    for ax, r in zip(axes, runs, strict=True):
        ax.axis("off")
        ax.set_title(f"{r.name}\nstep {r.steps:,}", fontsize=10)
        if r.grid:
            image = np.asarray(Image.open(io.BytesIO(r.grid)))
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
    fig.savefig(out, format="png", dpi=100)


def _plot_fid(ax: Axes, runs: Sequence[Run], wall: bool) -> None:
    plotted = [r for r in runs if r.fids()]
    seconds = np.concatenate([r.fid_seconds() for r in plotted]) if plotted else np.zeros(1)
    unit, scale = _time_unit(float(np.nanmax(seconds, initial=0.0)))
    if wall:
        setup_axes(ax, "FID against training time", "FID", f"training time ({unit})")
        ax.xaxis.set_major_formatter(ScalarFormatter())
    else:
        setup_axes(ax, "FID against images seen (lower is better)", "FID")
    if not plotted:
        return no_data(ax)
    xs = []
    for r in plotted:
        fids = r.fids()
        x = r.fid_seconds() / scale if wall else np.array([float(e["images_seen"]) for e in fids])
        ax.plot(x, [float(e["fid"]) for e in fids], marker="o", markersize=4, label=r.name)
        xs.append(x)
    widen_single_x(ax, np.concatenate(xs))
    ax.legend(loc="upper right", fontsize=8)


def _plot_kid(ax: Axes, runs: Sequence[Run]) -> None:
    setup_axes(ax, "KID ± std against images seen", "KID")
    plotted = [(r, [e for e in r.fids() if "kid" in e]) for r in runs]
    plotted = [(r, rows) for r, rows in plotted if rows]
    if not plotted:
        return no_data(ax)
    xs = []
    for r, rows in plotted:
        x = np.array([float(e["images_seen"]) for e in rows])
        ax.errorbar(
            x,
            [float(e["kid"]) for e in rows],
            yerr=[float(e["kid_std"]) for e in rows],
            marker="o",
            markersize=4,
            capsize=3,
            label=r.name,
        )
        xs.append(x)
    widen_single_x(ax, np.concatenate(xs))
    ax.legend(loc="upper right", fontsize=8)


def _time_unit(seconds: float) -> tuple[str, float]:
    if seconds < 120:
        return "seconds", 1.0
    if seconds < 2 * 3600:
        return "minutes", 60.0
    return "hours", 3600.0


def _settings_text(ax: Axes, runs: Sequence[Run], keys: list[str]) -> None:
    ax.axis("off")
    ax.set_title("Settings that differ")
    if not keys:
        ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
        return
    lines = [
        f"{r.name}: " + ", ".join(f"{k}={_cell(r.settings.get(k))}" for k in keys) for r in runs
    ]
    ax.text(
        0,
        1,
        "\n".join(lines),
        ha="left",
        va="top",
        fontsize=9,
        family="monospace",
        transform=ax.transAxes,
        wrap=True,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gan-job compare",
        description="Compare runs: a table (terminal and compare.csv) and compare.png.",
    )
    parser.add_argument("uris", nargs="+", metavar="URI", help="run or sweep: folder or s3://")
    parser.add_argument(
        "--out",
        default=".",
        help="folder (or s3:// prefix, uploaded to) for compare.csv and compare.png",
    )
    args = parser.parse_args(argv)
    if problems := _out_problems(args.out):
        raise SettingsError(problems)
    endpoint = os.environ.get("GAN_S3_ENDPOINT_URL") or None
    found = [run for uri in args.uris for run in find_runs(uri, endpoint)]
    runs = [read_run(uri, store) for uri, store in found]
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = r.uri
    rows = table(runs)
    sums = {r.name: fid_sums(fids[-1]) for r in runs if (fids := r.fids())}
    old = [name for name, kind in sums.items() if kind == "float32"]
    if old and len(old) < len(sums):
        log.warning(
            "the FIDs of %s come from float32 sums, as gan-job computed them before 0.3: up to a "
            "point lower than the others' (docs/metrics.md); re-evaluate with `gan-job evaluate`",
            ", ".join(old),
        )
    with outputs.local_folder(args.out, endpoint) as out:
        out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, out / "compare.csv")
        write_png(runs, out / "compare.png")
    print(format_table(rows))
    log.info("wrote compare.csv and compare.png in %s", args.out)
    return 0


def _out_problems(out: str) -> list[str]:
    """What is wrong with the --out folder, before any work."""
    if "://" in out:
        return outputs.uri_problems(out.rstrip("/") + "/compare.csv")
    if Path(out).exists() and not Path(out).is_dir():
        return [f"--out {out}: is a file, expected a folder"]
    return outputs.out_file_problems(str(Path(out) / "compare.csv"))
