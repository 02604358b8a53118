"""A one-page PNG summary of a run: losses, D outputs, FID, KID (with its spread), precision,
recall and label accuracy against images seen, and the fixed-noise sample grids over time side
by side."""

from __future__ import annotations

import io
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, LogFormatter, MaxNLocator
from matplotlib.transforms import offset_copy
from PIL import Image

WIDTH_IN = 16.0
PLOTS_HEIGHT_IN = 4.2
SMOOTH_ABOVE = 200  # points; noisier loss curves get a moving average drawn over them
LEGEND_BELOW_PT = 34  # from the axes' bottom: below its tick labels and x label
LEGEND_CHAR_PT = 4.8  # the mean width of a character of a small legend label


def write_report(
    records: Sequence[Mapping[str, Any]],
    evals: Sequence[Mapping[str, Any]],
    grids: Sequence[tuple[int, bytes]],
    out: str | os.PathLike[str] | BinaryIO | None = None,
    title: str = "",
    max_grids: int = 6,
) -> bytes:
    """Draws the report and returns it as PNG bytes, also written to out (a path or a binary
    file) when given.

    records: training log lines {"step", "images_seen", "d_loss", "g_loss", "d_real", "d_fake"}.
    evals: eval.jsonl rows {"step", "images_seen", "fid", "extractor", "num_samples"}, and
    where measured "kid", "kid_std", "precision", "recall", "label_accuracy".
    grids: (step, PNG bytes) of the fixed-noise sample grids; at most max_grids of them, evenly
    spread and always the first and the last, are shown.
    """
    fig = report_figure(records, evals, grids, title, max_grids)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    png = buffer.getvalue()
    if isinstance(out, (str, os.PathLike)):
        with open(out, "wb") as f:
            f.write(png)
    elif out is not None:
        out.write(png)
    return png


def report_figure(
    records: Sequence[Mapping[str, Any]],
    evals: Sequence[Mapping[str, Any]],
    grids: Sequence[tuple[int, bytes]],
    title: str = "",
    max_grids: int = 6,
) -> Figure:
    """The report's figure (see write_report); KID and the 0..1 scores get their plots once an
    evaluation measured them."""
    shown = _spread(sorted(grids, key=lambda g: g[0]), max_grids)
    grid_height = min(WIDTH_IN / max(len(shown), 1), 3.6) + 0.6 if shown else 0.0
    fig = Figure(figsize=(WIDTH_IN, PLOTS_HEIGHT_IN + grid_height), layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, fontsize=14)
    top, bottom = fig.subfigures(2, 1, height_ratios=[PLOTS_HEIGHT_IN, grid_height or 0.01])
    quality = any("kid" in e or "label_accuracy" in e for e in evals)
    axes = top.subplots(1, 5 if quality else 3)
    _plot_losses(axes[0], records)
    _plot_outputs(axes[1], records)
    _plot_fid(axes[2], evals)
    if quality:
        _plot_kid(axes[3], evals)
        _plot_scores(axes[4], evals)
        for ax in axes:  # five plots in a row: fewer ticks, or their labels overlap
            ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    _show_grids(bottom, shown, _images_seen_by_step(records))
    return fig


def _spread(items: list[Any], n: int) -> list[Any]:
    if len(items) <= n:
        return items
    return [items[round(i)] for i in np.linspace(0, len(items) - 1, n)]


def _column(records: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array([float(r.get(key, np.nan)) for r in records], dtype=float)


def _smooth(y: np.ndarray) -> np.ndarray:
    """A centred moving average over ~2% of the points that skips NaNs."""
    k = max(len(y) // 50, 1)
    kernel = np.ones(k)
    finite = np.isfinite(y)
    sums = np.convolve(np.where(finite, y, 0.0), kernel, mode="same")
    counts = np.convolve(finite.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def setup_axes(ax: Axes, title: str, ylabel: str, xlabel: str = "images seen") -> None:
    """A plot's title, axis labels, engineering-notation integer x ticks and a light grid."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.grid(alpha=0.3)


def widen_single_x(ax: Axes, x: np.ndarray) -> None:
    """Gives a lone x value a readable axis instead of matplotlib's +-5% of it (or of 0)."""
    x = x[np.isfinite(x)]
    if len(x) and x.min() == x.max():
        pad = max(abs(x[0]) * 0.1, 1.0)
        ax.set_xlim(x[0] - pad, x[0] + pad)


def _legend(ax: Axes) -> None:
    """Below the axes, under its x label: a legend inside would cover curves, and a long one
    the title or the next plot. Labels wrap to the axes' width."""
    handles, labels = ax.get_legend_handles_labels()
    width = max(int(ax.get_position().width * WIDTH_IN * 72 / LEGEND_CHAR_PT), 12)
    below = offset_copy(ax.transAxes, fig=ax.figure, y=-LEGEND_BELOW_PT, units="points")
    ax.legend(
        handles,
        [textwrap.fill(label, width) for label in labels],
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        bbox_transform=below,
        fontsize="small",
        frameon=False,
    )


def no_data(ax: Axes) -> None:
    """An empty plot that says it has no data yet."""
    ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_series(ax: Axes, x: np.ndarray, y: np.ndarray, label: str, color: str) -> None:
    if len(y) > SMOOTH_ABOVE:
        ax.plot(x, y, color=color, alpha=0.25, linewidth=0.7)
        ax.plot(x, _smooth(y), color=color, linewidth=1.6, label=f"{label} (moving avg)")
    else:
        ax.plot(x, y, color=color, linewidth=1.2, label=label)


def _plot_losses(ax: Axes, records: Sequence[Mapping[str, Any]]) -> None:
    setup_axes(ax, "Losses", "loss")
    if not records:
        return no_data(ax)
    x = _column(records, "images_seen")
    _plot_series(ax, x, _column(records, "d_loss"), "D loss", "tab:blue")
    _plot_series(ax, x, _column(records, "g_loss"), "G loss", "tab:orange")
    widen_single_x(ax, x)
    _legend(ax)


def _plot_outputs(ax: Axes, records: Sequence[Mapping[str, Any]]) -> None:
    setup_axes(ax, "Discriminator outputs", "mean probability")
    if not records:
        return no_data(ax)
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=0.8)
    x = _column(records, "images_seen")
    _plot_series(ax, x, _column(records, "d_real"), "D(x) real", "tab:green")
    _plot_series(ax, x, _column(records, "d_fake"), "D(G(z)) fake", "tab:red")
    widen_single_x(ax, x)
    _legend(ax)


def fid_sums(row: Mapping[str, Any]) -> str:
    """The precision of an FID record's sums: float32 for records written before the job kept
    them in float64 (job.quality.scores.FID_SUMS), which read up to a point lower."""
    return str(row.get("fid_sums", "float32"))


def _fid_series(row: Mapping[str, Any]) -> str:
    """A run resumed by a newer gan-job has float32 rows, then float64 ones: two series."""
    extractor = str(row.get("extractor", ""))
    return f"{extractor}, float32 sums" if fid_sums(row) == "float32" else extractor


def _plot_fid(ax: Axes, evals: Sequence[Mapping[str, Any]]) -> None:
    setup_axes(ax, "FID (lower is better)", "FID")
    if not evals:
        return no_data(ax)
    for series in sorted({_fid_series(e) for e in evals}):
        rows = sorted(
            (e for e in evals if _fid_series(e) == series), key=lambda e: e["images_seen"]
        )
        x, y = _column(rows, "images_seen"), _column(rows, "fid")
        samples = rows[-1].get("num_samples")
        label = f"{series} ({samples} samples)" if samples else series
        ax.plot(x, y, marker="o", markersize=4, label=label)
        if np.isfinite(y[-1]):
            falling = len(y) > 1 and y[-1] < y[-2]  # the curve comes from above: write below it
            ax.annotate(
                f"{y[-1]:.1f}",
                (x[-1], y[-1]),
                xytext=(-4, -6 if falling else 6),
                textcoords="offset points",
                ha="right",
                va="top" if falling else "bottom",
            )
    widen_single_x(ax, _column(evals, "images_seen"))
    ax.margins(y=0.15)  # room for the last value's label below (or above) the curve's end
    fids = _column(evals, "fid")
    fids = fids[np.isfinite(fids) & (fids > 0)]
    if len(fids) and fids.max() / fids.min() > 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    _legend(ax)


def _last_extractor_rows(evals: Sequence[Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
    """The rows measuring key with the extractor of the last such row, by images seen."""
    rows = [e for e in evals if key in e]
    if not rows:
        return []
    extractor = rows[-1].get("extractor")
    return sorted(
        (e for e in rows if e.get("extractor") == extractor), key=lambda e: e["images_seen"]
    )


def _plot_kid(ax: Axes, evals: Sequence[Mapping[str, Any]]) -> None:
    setup_axes(ax, "KID ± std (lower is better)", "KID")
    rows = _last_extractor_rows(evals, "kid")
    if not rows:
        return no_data(ax)
    x, y = _column(rows, "images_seen"), _column(rows, "kid")
    last = rows[-1]
    label = f"{last.get('extractor', '')} ({last.get('num_samples')} samples)"
    ax.errorbar(
        x, y, yerr=_column(rows, "kid_std"), marker="o", markersize=4, capsize=3, label=label
    )
    widen_single_x(ax, x)
    _legend(ax)


def _plot_scores(ax: Axes, evals: Sequence[Mapping[str, Any]]) -> None:
    setup_axes(ax, "Precision, recall, label accuracy", "share (higher is better)")
    drawn = False
    for key, label, color in (
        ("precision", "precision (realistic)", "tab:purple"),
        ("recall", "recall (coverage)", "tab:brown"),
        ("label_accuracy", "label accuracy", "tab:cyan"),
    ):
        rows = _last_extractor_rows(evals, key)
        if rows:
            x = _column(rows, "images_seen")
            ax.plot(x, _column(rows, key), marker="o", markersize=4, label=label, color=color)
            widen_single_x(ax, x)
            drawn = True
    if not drawn:
        return no_data(ax)
    ax.set_ylim(-0.02, 1.02)
    _legend(ax)


def _images_seen_by_step(records: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    return {
        int(r["step"]): int(r["images_seen"]) for r in records if "step" in r and "images_seen" in r
    }


def _show_grids(fig: Any, grids: list[tuple[int, bytes]], images_seen: dict[int, int]) -> None:
    if not grids:
        return
    axes = np.atleast_1d(fig.subplots(1, len(grids)))
    for ax, (step, png) in zip(axes, grids, strict=True):
        image = np.asarray(Image.open(io.BytesIO(png)))
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
        seen = images_seen.get(step)
        ax.set_title(f"step {step:,}" + (f"\n{seen:,} images" if seen is not None else ""))
        ax.axis("off")
