"""KID, precision/recall and label accuracy: the estimators on known features, and measure()
with stand-in generators that obey, ignore or collapse their labels."""

from __future__ import annotations

import math

import pytest
import torch

from job.infra.metrics import Metrics
from job.quality.evaluator import FidEvaluator, frechet_distance, measure
from job.quality.extractors import load_extractor
from job.quality.reference import real_reference
from job.quality.scores import FeatureTap, fid_metric, kid, precision_recall
from tests.helpers import Painter, idx_images, write_classifier, write_extractor

CPU = torch.device("cpu")


def gaussian(n: int, d: int = 16, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


def test_kid_is_zero_within_its_spread_for_one_distribution_and_positive_for_another():
    real = gaussian(400, seed=1)
    same = kid(real, gaussian(400, seed=2), subsets=50)
    other = kid(real, gaussian(400, shift=0.5, seed=2), subsets=50)
    assert same["kid_subset_size"] == 200 and same["kid_subsets"] == 50
    assert abs(same["kid"]) < 3 * same["kid_std"]
    assert other["kid"] > 10 * other["kid_std"] > 0
    # unbiased: the estimate from 20 samples is no larger than from 400, unlike FID
    small = [kid(gaussian(20, seed=s), gaussian(20, seed=100 + s), 20)["kid"] for s in range(20)]
    assert abs(sum(small) / len(small)) < 0.05


def test_precision_and_recall_are_one_for_identical_sets_and_zero_for_far_apart_ones():
    real = gaussian(300, seed=1)
    assert precision_recall(real, real.clone()) == {"precision": 1.0, "recall": 1.0, "pr_k": 3}
    far = precision_recall(real, gaussian(300, shift=100.0, seed=2))
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    # samples from a small part of the data: realistic (precision) but not covering it (recall)
    part = real[real[:, 0] > 1.0]
    collapsed = precision_recall(real, part[torch.arange(300) % len(part)] + 0.01, batch=64)
    assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.4


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """An extractor with a classifier head that is right on every write_idx image, real images
    and their reference, and a second set of images for the stand-in generators."""
    tmp = tmp_path_factory.mktemp("squares")
    extractor = load_extractor(str(write_classifier(tmp / "squares.pt")), 1, 28, CPU)
    images, _ = idx_images(300, seed=0)
    real = real_reference(extractor, images, CPU)
    return extractor, real, idx_images(300, seed=1)


@pytest.mark.parametrize(
    "mode,accuracy", [("obey", 1.0), ("ignore", 0.1), ("collapse", 0.1)]
)  # fmt: skip
def test_label_accuracy_of_samples_that_obey_ignore_or_collapse_their_labels(
    squares, mode, accuracy
):
    extractor, real, (images, labels) = squares
    assert extractor.num_classes == 10 and extractor.label_accuracy_problem(10) is None
    g = Painter(images, labels, mode)
    found = measure(extractor, real, g, 4, 10, 300, seed=3, device=CPU, batch=64,
                    labels_checked=True)  # fmt: skip
    assert found["label_accuracy"] == pytest.approx(accuracy, abs=0.06)
    per_class = found["label_accuracy_per_class"]
    assert len(per_class) == 10
    if mode == "obey":
        assert per_class == [1.0] * 10
        assert found["precision"] > 0.9 and found["recall"] > 0.8
    if mode == "collapse":  # every sample a class-0 image: only class 0 is "right"
        assert per_class == [1.0] + [0.0] * 9
        assert found["recall"] < 0.3 and found["kid"] > 10 * found["kid_std"]


def test_label_accuracy_is_skipped_with_a_reason_when_the_extractor_cannot_classify(tmp_path):
    plain = load_extractor(str(write_extractor(tmp_path / "plain.pt")), 1, 28, CPU)
    assert plain.classifier is None
    assert "exports no logits()" in plain.label_accuracy_problem(10)
    squares = load_extractor(str(write_classifier(tmp_path / "sq.pt", classes=10)), 1, 28, CPU)
    assert squares.label_accuracy_problem(4) == (
        "the extractor torchscript:sq classifies 10 classes, the run has 4"
    )
    assert squares.label_accuracy_problem(0) == "the model is unconditional"
    images, labels = idx_images(40)
    found = measure(squares, real_reference(squares, images, CPU), Painter(images, labels), 4,
                    10, 40, seed=0, device=CPU)  # fmt: skip
    assert "label_accuracy" not in found and "kid" in found  # labels_checked not given


def test_evaluator_rows_and_gauges_carry_every_metric_with_its_n(squares, tmp_path):
    from job.infra.distributed import World
    from job.infra.jsonl_log import JsonlLog
    from job.infra.stores import open_store
    from job.infra.writer import BackgroundWriter

    extractor, _, (images, labels) = squares
    store = open_store(str(tmp_path / "run"))
    writer = BackgroundWriter(store)
    metrics = Metrics()
    world = World(0, 1, 0, CPU)
    cache = store.child("stats")
    reference = dict(cache=cache, cache_key="key", real_images=lambda n: idx_images(n)[0])
    evaluator = FidEvaluator(extractor=extractor, history=JsonlLog("eval.jsonl", writer, store),
                             metrics=metrics, world=world, every=1, num=200, seed=1, latent_dim=4,
                             num_classes=10, **reference)  # fmt: skip
    evaluator.prepare()
    assert sorted(cache.list()) == ["key-features.pt", "key.pt"]
    evaluator.record(evaluator.evaluate(Painter(images, labels), 7, 70, stop=lambda: False))
    writer.close(10)
    (row,) = evaluator.records
    assert row["num_samples"] == 200 and row["num_real"] == 200
    assert row["kid_subset_size"] == 100 and row["pr_k"] == 3
    assert row["label_accuracy"] == 1.0 and len(row["label_accuracy_per_class"]) == 10
    assert {"fid", "kid", "kid_std", "precision", "recall"} <= set(row)
    text = metrics.render().decode()
    for gauge in ("gan_kid", "gan_kid_std", "gan_precision", "gan_recall", "gan_label_accuracy"):
        assert f'{gauge}{{extractor="torchscript:squares"}}' in text

    # a cached reference from before KID (statistics, no features) is rebuilt whole
    cache.delete("key-features.pt")
    again = FidEvaluator(extractor=extractor, history=JsonlLog("e2.jsonl", writer, store),
                         metrics=Metrics(False), world=world, every=1, num=200, seed=1,
                         latent_dim=4, num_classes=10, **reference)  # fmt: skip
    again.prepare()
    assert again.real.features.shape == (200, 10) and cache.exists("key-features.pt")


def test_fid_of_features_that_are_not_finite_is_nan_without_computing_it():
    """torcheval's eigenvalue solver aborts the process (SIGSEGV in MKL) on NaN sums: an
    extractor that gives NaN or inf must give FID NaN, which the best generator never keeps."""
    metric = fid_metric(FeatureTap(torch.nn.Identity()), 4, torch.device("cpu"))
    metric.real_sum = torch.full_like(metric.real_sum, float("nan"))
    assert math.isnan(frechet_distance(metric, world_size=1))
    metric.real_sum = torch.full_like(metric.real_sum, float("inf"))
    assert math.isnan(frechet_distance(metric, world_size=1))
