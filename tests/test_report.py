"""report.png: KID with its spread and the 0..1 scores beside FID, once evaluations have them."""

from __future__ import annotations

import io

from matplotlib.text import Text
from PIL import Image

from job.run.report import report_figure, write_report


def evals(conditional: bool) -> list[dict]:
    rows = []
    for i, s in enumerate((100, 200, 300)):
        row = {"step": s, "images_seen": 64 * s, "fid": 50 / (1 + i), "extractor": "cnn",
               "num_samples": 500, "kid": 0.05 / (1 + i), "kid_std": 0.004,
               "precision": 0.5 + 0.1 * i, "recall": 0.3 + 0.1 * i}  # fmt: skip
        if conditional:
            row |= {"label_accuracy": 0.6 + 0.1 * i, "label_accuracy_per_class": [0.7] * 10}
        rows.append(row)
    return rows


def titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def test_report_shows_kid_with_error_bars_and_label_accuracy_beside_fid(tmp_path):
    records = [{"step": s, "images_seen": 64 * s, "d_loss": 1.0, "g_loss": 0.7, "d_real": 0.6,
                "d_fake": 0.4} for s in range(0, 301, 10)]  # fmt: skip
    fig = report_figure(records, evals(conditional=True), [])
    kid_ax = next(ax for ax in fig.axes if ax.get_title().startswith("KID"))
    assert kid_ax.containers and kid_ax.containers[0].has_yerr  # error bars
    scores = next(ax for ax in fig.axes if ax.get_title().startswith("Precision"))
    assert [t.get_text() for t in scores.get_legend().get_texts()] == [
        "precision (realistic)", "recall (coverage)", "label accuracy",
    ]  # fmt: skip
    png = write_report(records, evals(conditional=False), [], tmp_path / "r.png")
    assert Image.open(io.BytesIO(png)).format == "PNG"


def test_report_of_fid_only_evaluations_keeps_its_three_plots():
    old = [{k: v for k, v in e.items() if k in ("step", "images_seen", "fid", "extractor")}
           for e in evals(False)]  # fmt: skip
    assert len(report_figure([], old, []).axes) == 3
    assert len(report_figure([], evals(False), []).axes) == 5


def resumed_evals() -> list[dict]:
    """A run resumed by a newer gan-job: float32 FID sums, then float64 ones (two series)."""
    rows = evals(conditional=True) + [
        {**e, "step": e["step"] + 300, "images_seen": e["images_seen"] + 19200, "fid_sums": "float64"}
        for e in evals(conditional=True)
    ]  # fmt: skip
    return [{**r, "extractor": "fashion-mnist-cnn-features"} for r in rows]


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_legends_cover_no_title_no_plot_and_stay_inside_the_picture():
    records = [{"step": s, "images_seen": 64 * s, "d_loss": 1.0 + (s % 7) / 10, "g_loss": 0.7,
                "d_real": 0.6, "d_fake": 0.4} for s in range(0, 601, 2)]  # fmt: skip
    for rows in (evals(conditional=False)[:1], resumed_evals()):
        fig = report_figure(records, rows, [], title="fashion-mnist-dcgan")
        renderer = fig.canvas.get_renderer()
        fig.draw(renderer)
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()]
        assert len(legends) == len(fig.axes)
        page = fig.bbox
        (suptitle,) = [t for t in fig.findobj(Text) if t.get_text() == "fashion-mnist-dcgan"]
        covered = [suptitle.get_window_extent(renderer)]
        covered += [ax.title.get_window_extent(renderer) for ax in fig.axes]
        covered += [ax.patch.get_window_extent(renderer) for ax in fig.axes]
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0, box
            assert not any(overlaps(box, other) for other in covered), box
            assert not any(overlaps(box, other.get_window_extent(renderer))
                           for other in legends if other is not legend)  # fmt: skip


def test_the_last_fid_is_written_beside_its_curve_not_on_it():
    for fids in ((220.0, 113.0, 56.0, 43.0, 26.0, 21.0, 17.5), (30.0, 20.0, 25.0)):  # down, up
        rows = [{"step": 250 * (i + 1), "images_seen": 16000 * (i + 1), "fid": f, "extractor": "cnn",
                 "num_samples": 500} for i, f in enumerate(fids)]  # fmt: skip
        fig = report_figure([], rows, [])
        fig.draw(renderer := fig.canvas.get_renderer())
        ax = next(ax for ax in fig.axes if ax.get_title().startswith("FID"))
        (label,) = [t for t in ax.texts if t.get_text() == f"{fids[-1]:.1f}"]
        box = label.get_window_extent(renderer)
        (line,) = ax.get_lines()
        points = ax.transData.transform(line.get_xydata())
        along = [points[-2] + (points[-1] - points[-2]) * t / 50 for t in range(51)]  # last segment
        assert not any(box.contains(x, y) for x, y in [*points, *along]), (fids, box)
        inside = ax.get_window_extent(renderer)  # not across the frame or the tick labels
        assert inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1), (fids, box)
