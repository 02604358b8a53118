"""report.png: KID with its spread and the 0..1 scores beside FID, once evaluations have them."""

from __future__ import annotations

import io

from PIL import Image

from job.report import report_figure, write_report


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
