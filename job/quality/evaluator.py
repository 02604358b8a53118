"""The evaluation of a generator on one set of features: generate_features then score (FID with
torcheval, and from the same features KID, precision/recall and label accuracy), and the
FidEvaluator, which runs it on the run's schedule and keeps eval.jsonl."""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from job.gan.sampling import fixed_inputs, generate
from job.infra import distributed, watchdog
from job.infra.jsonl_log import JsonlLog
from job.infra.metrics import Metrics
from job.infra.store import Store
from job.quality.extractors import Extractor
from job.quality.reference import REFERENCE_BATCH, RealReference, cached_reference, real_reference
from job.quality.scores import (
    FID_SUMS,
    PR_NEIGHBOURS,
    SUM_STATES,
    FeatureTap,
    fid_metric,
    kid,
    label_accuracy,
    precision_recall,
    round_metrics,
    summary,
    three_channels,
)

if TYPE_CHECKING:
    from torcheval.metrics import FrechetInceptionDistance

log = logging.getLogger(__name__)


def fid_num_samples(setting: int | None, device: torch.device) -> int:
    """GAN_FID_NUM_SAMPLES, or its default: 10,000 on a GPU, 500 on a CPU."""
    if setting:
        return setting
    return 10_000 if device.type == "cuda" else 500


def _gather_on_main(part: torch.Tensor, num: int, rank: int, world_size: int):
    """The ranks' strides (rank r holds items r, r + W, ...) in their single-process order, on
    rank 0 (None on the others)."""
    if world_size == 1:
        return part
    parts = [None] * world_size if rank == 0 else None
    dist.gather_object(part.cpu(), parts, dst=0)
    if rank != 0:
        return None
    whole = part.new_empty((num, *part.shape[1:]), device="cpu")
    for r, p in enumerate(parts):
        whole[r::world_size] = p
    return whole


def frechet_distance(metric: FrechetInceptionDistance, world_size: int) -> float:
    """The Frechet distance of the ranks' merged states; NaN, without computing it, where any
    rank's feature sums are not finite (an extractor that gave NaN or inf): the eigenvalue
    solver aborts the whole process on them (SIGSEGV inside MKL), not just the evaluation."""
    finite = torch.tensor(
        [all(bool(torch.isfinite(getattr(metric, name)).all()) for name in SUM_STATES)],
        dtype=torch.int32,
        device=metric.real_sum.device,  # NCCL reduces tensors on the GPU
    )
    if world_size > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        return math.nan
    if world_size > 1:
        from torcheval.metrics.toolkit import sync_and_compute

        return float(sync_and_compute(metric))
    return float(metric.compute())


@dataclass
class Fakes:
    """One rank's share of the generated images, as the extractor saw them: the FID metric
    holding their statistics (on rank 0 the real ones too), and where asked for their features
    and predicted classes, in the rank's stride of the fixed noise."""

    metric: FrechetInceptionDistance
    features: torch.Tensor | None
    predicted: torch.Tensor | None


@torch.no_grad()
def generate_features(
    extractor: Extractor,
    real: RealReference,
    g: nn.Module,
    *,
    latent_dim: int,
    num_classes: int,
    num: int,
    seed: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    batch: int = 100,
    stop: Callable[[], bool] | None = None,
    keep: bool = False,
    classify: bool = False,
) -> Fakes | None:
    """num images from the noise of one seeded generator, each rank its stride of it, through
    the extractor; None when stop() (asked before every batch, the same number of times on
    every rank) turned true. keep: their features; classify: their predicted classes."""
    tap = FeatureTap(extractor.model)
    metric = fid_metric(tap, extractor.dim, device)
    if rank == 0:  # the real part is summed once when the ranks' states merge
        metric.load_state_dict({k: v.to(device) for k, v in real.state.items()})
    z, labels = fixed_inputs(latent_dim, num, num_classes, seed, torch.device("cpu"))
    z = z[rank::world_size]
    mine = labels[rank::world_size] if labels is not None else None
    classifier = extractor.classifier if classify and labels is not None else None
    features, predicted = [torch.empty(0, extractor.dim)], [torch.empty(0, dtype=torch.int64)]
    for start in range(0, math.ceil(num / world_size), batch):
        if stop is not None and stop():
            return None
        zb = z[start : start + batch].to(device)
        if len(zb):
            lb = mine[start : start + batch].to(device) if mine is not None else None
            images = three_channels(generate(g, zb, lb))
            metric.update(images, is_real=False)
            if keep:
                features.append(tap.kept.float().cpu())
            if classifier is not None:
                predicted.append(classifier(images, tap.kept).argmax(dim=1).cpu())
    return Fakes(
        metric,
        torch.cat(features) if keep else None,
        torch.cat(predicted) if classifier is not None else None,
    )


def score(
    fakes: Fakes,
    real: RealReference,
    *,
    num: int,
    num_classes: int,
    seed: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """FID from the ranks' merged states; on rank 0, from the features gathered there, KID and
    precision/recall (when features were kept) and label accuracy (when classes were
    predicted): every number equals that of one process for the same samples."""
    result: dict = {"fid": frechet_distance(fakes.metric, world_size)}
    keep, classify = fakes.features is not None, fakes.predicted is not None
    fake = _gather_on_main(fakes.features, num, rank, world_size) if keep else None
    pred = _gather_on_main(fakes.predicted, num, rank, world_size) if classify else None
    if rank != 0:
        return result
    few = min(len(real.features), num) if keep else 0
    if few:  # on the evaluation's device: a GPU makes short work of 10,000 x 10,000 distances
        real_features, fake = real.features.to(device), fake.to(device)
    if few >= 4:  # KID needs two samples per subset; precision/recall k + 1 neighbours
        result |= kid(real_features, fake, seed=seed)
    if few > PR_NEIGHBOURS:
        result |= precision_recall(real_features, fake)
    if classify:
        result |= label_accuracy(pred, torch.arange(num) % num_classes, num_classes)
    return result


def measure(
    extractor: Extractor,
    real: RealReference,
    g: nn.Module,
    latent_dim: int,
    num_classes: int,
    num: int,
    seed: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    batch: int = 100,
    stop: Callable[[], bool] | None = None,
    labels_checked: bool = False,
    keep_features: bool | None = None,
) -> dict | None:
    """generate_features, then score: FID of num generated images against the real reference,
    and on rank 0 KID and precision/recall (keep_features, by default: real.features is kept;
    the same on every rank) and label accuracy (labels_checked: the extractor's classifier fits
    the run's classes). None when stop() turned true."""
    keep = real.features is not None if keep_features is None else keep_features
    sampling = {
        "num": num,
        "num_classes": num_classes,
        "seed": seed,
        "device": device,
        "rank": rank,
        "world_size": world_size,
    }
    fakes = generate_features(
        extractor,
        real,
        g,
        latent_dim=latent_dim,
        batch=batch,
        stop=stop,
        keep=keep,
        classify=labels_checked,
        **sampling,
    )
    return None if fakes is None else score(fakes, real, **sampling)


def compute_fid(
    extractor: Extractor,
    real_state: dict[str, torch.Tensor],
    g: nn.Module,
    latent_dim: int,
    num_classes: int,
    num: int,
    seed: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    batch: int = 100,
    stop: Callable[[], bool] | None = None,
) -> float | None:
    """FID alone (see measure)."""
    found = measure(
        extractor,
        RealReference(real_state),
        g,
        latent_dim,
        num_classes,
        num,
        seed,
        device,
        rank,
        world_size,
        batch,
        stop,
    )
    return None if found is None else found["fid"]


class FidEvaluator:
    """FID, KID, precision/recall and (conditional runs) label accuracy of the EMA generator
    every `every` steps and once more at the end of a run, against real statistics and features
    computed once per dataset and extractor and cached in the store; each result is a row of
    eval.jsonl and the gan_fid, gan_kid, ... gauges.

    Every rank calls it: generation and feature extraction are split over ranks. The
    checkpointer saves and restores its history (the rows of eval.jsonl).

    cache, cache_key: where the real reference is cached (stats_key); real_images(n): n real
    uint8 images, called only when the cache has no usable reference; row_fields(): what else
    each row holds (GAN_AUGMENT=ada: augment_p).
    """

    def __init__(
        self,
        *,
        extractor: Extractor | None,
        history: JsonlLog,
        metrics: Metrics,
        world: distributed.World,
        every: int,
        num: int,
        seed: int,
        latent_dim: int,
        num_classes: int,
        cache: Store | None = None,
        cache_key: str = "",
        real_images: Callable[[int], torch.Tensor] | None = None,
        row_fields: Callable[[], dict] = dict,
    ):
        self.extractor, self.history, self.metrics, self.world = extractor, history, metrics, world
        self.row_fields = row_fields
        self.every, self.num, self.seed = every, num, seed
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.cache, self.cache_key, self.real_images = cache, cache_key, real_images
        self.real: RealReference | None = None
        self.num_real = 0  # real images behind the reference
        self.labels_checked = False
        self.evaluated: int | None = None  # the last step evaluated, the same on every rank

    @property
    def real_state(self) -> dict[str, torch.Tensor] | None:
        return self.real.state if self.real is not None else None

    def prepare(self) -> None:
        """Real statistics and features from the cache, or from real_images(num) (then cached).
        Rank 0 alone keeps the features: KID and precision/recall are computed there."""
        if self.extractor is None:
            return
        stats, feats = f"{self.cache_key}.pt", f"{self.cache_key}-features.pt"
        real = images = None
        if self.world.is_main:
            real = self._from_cache(self.cache, stats, feats)
            images = None if real is not None else self.real_images(self.num)
            problem = self.extractor.label_accuracy_problem(self.num_classes)
            self.labels_checked = problem is None
            if problem and self.num_classes:
                log.warning("no label accuracy: %s", problem)
        batches = 0 if images is None else math.ceil(len(images) / REFERENCE_BATCH)
        batches = distributed.broadcast_object(batches, self.world)
        if images is not None:
            real = self._compute_reference(images, stats, feats)
        else:
            for _ in range(batches):  # rank 0's batches, in step with it: no rank waits alone
                _reference_batch_done(self.world)
        state = distributed.broadcast_object(real.state if real else None, self.world)
        self.real = real if real is not None else RealReference(state)
        self.labels_checked = distributed.broadcast_object(self.labels_checked, self.world)
        self.num_real = self.real.num  # the dataset may have fewer
        if self.num_real < self.num and self.world.is_main:
            log.warning(
                "FID: real statistics from all %d images of the dataset, fewer than the %d "
                "generated (GAN_FID_NUM_SAMPLES); eval.jsonl records both",
                self.num_real,
                self.num,
            )

    def _compute_reference(self, images: torch.Tensor, stats: str, feats: str) -> RealReference:
        """The reference of these real images, cached as stats and feats (rank 0)."""
        log.info(
            "computing real-image statistics and features (%d images, %s)",
            len(images),
            self.extractor.name,
        )
        real = real_reference(
            self.extractor,
            images,
            self.world.device,
            each_batch=lambda: _reference_batch_done(self.world),
        )
        for name, obj in ((stats, real.state), (feats, real.features)):
            buf = io.BytesIO()
            torch.save(obj, buf)
            self.cache.put_bytes(name, buf.getvalue())
        return real

    def _from_cache(self, cache: Store, stats: str, feats: str) -> RealReference | None:
        """The cached reference; None if absent or unusable (damaged, another extractor's):
        then it is computed again and replaces what is there."""
        if not (cache.exists(stats) and cache.exists(feats)):
            return None
        try:
            return cached_reference(
                cache.get_bytes(stats), cache.get_bytes(feats), self.extractor.dim
            )
        except ValueError as e:
            log.warning(
                "FID: cannot use the cached real statistics %s/%s and %s (%s): computing them "
                "again",
                cache.uri,
                stats,
                feats,
                e,
            )
            return None

    def due(self, step: int, last: bool = False) -> bool:
        """At every `every` steps, and at the end unless this step was just evaluated."""
        if self.extractor is None:
            return False
        if last:
            return step != self.evaluated
        return bool(self.every) and step % self.every == 0

    def evaluate(
        self, g_ema: nn.Module, step: int, images_seen: int, stop: Callable[[], bool]
    ) -> dict | None:
        """One evaluation: on rank 0 its row of eval.jsonl (which record() stores) after the log
        line and the gauges, {} on the other ranks; None when a stop request cut it short."""
        t0, w = time.monotonic(), self.world
        sampling = {
            "num": self.num,
            "num_classes": self.num_classes,
            "seed": self.seed,
            "device": w.device,
            "rank": w.rank,
            "world_size": w.world_size,
        }
        fakes = generate_features(
            self.extractor,
            self.real,
            g_ema,
            latent_dim=self.latent_dim,
            keep=True,
            stop=lambda: _batch_done(stop, w),
            classify=self.labels_checked,
            **sampling,
        )
        if fakes is None:
            log.info("FID at step %d cut short by a stop request", step)
            return None
        found, self.evaluated = score(fakes, self.real, **sampling), step
        if not w.is_main:
            return {}
        return self._row(step, images_seen, found, time.monotonic() - t0)

    def _row(self, step: int, images_seen: int, found: dict, seconds: float) -> dict:
        """Rank 0: the row of eval.jsonl, the log line, the gauges."""
        values = round_metrics(found)
        row = {
            "step": step,
            "images_seen": images_seen,
            **values,
            "extractor": self.extractor.name,
            "num_samples": self.num,
            "num_real": self.num_real,
            "fid_sums": FID_SUMS,
            "seconds": round(seconds, 2),
            **self.row_fields(),
        }
        log.info("%s at step %d (%s)", summary(values), step, self.extractor.name)
        self.metrics.observe_fid(found["fid"], self.extractor.name, images_seen)
        self.metrics.observe_quality(values, self.extractor.name)
        return row

    def record(self, row: dict) -> None:
        """Rank 0: an evaluation's row (with what the best generator adds), a row of eval.jsonl."""
        if self.world.is_main:
            self.history.append(row)
            self.history.sync()

    @property
    def records(self) -> list[dict]:
        return self.history.rows

    def state_dict(self) -> dict:
        return self.history.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.history.load_state_dict(state)
        self.evaluated = self.history.rows[-1]["step"] if self.history.rows else None

    def start_fresh(self) -> None:
        self.history.start_fresh()
        self.evaluated = None

    def sync(self) -> None:
        self.history.sync()


def _reference_batch_done(world: distributed.World) -> None:
    """Before each batch of the real reference, which rank 0 alone computes: progress for the
    watchdog on every rank, and a collective that ends the other ranks' wait when rank 0 is gone
    (a wait for the whole reference could outlast GAN_STALL_TIMEOUT_SECONDS)."""
    watchdog.beat("FID real-image statistics")
    distributed.barrier(world)


def _batch_done(stop: Callable[[], bool], world: distributed.World) -> bool:
    """Before each FID batch: progress for the watchdog; whether any rank was asked to stop."""
    watchdog.beat("FID evaluation")
    return distributed.any_rank_each([stop()], world)[0]
