"""Prometheus metrics of the training job.

Every sample carries a `run_id` label (set by `set_info`), so dashboards and alerts filter with
`{run_id="..."}` directly instead of joining each query with `gan_run_info`. The label is added
at collection time by a wrapper around a private registry: the metric objects stay label-free
and callers never deal with it.

Gauges that only mean something once training has reported (losses, D outputs, gradient norms,
throughput) start as NaN rather than 0, so that a job still starting up does not look like
"D(G(z)) = 0" to the alerts. `gan_step` starts at 0: no progress yet is a real value.

Series pushed to a Pushgateway keep their values there forever after the job exits; scraped
with `honor_labels: true` they carry no `instance` label, which is how the alerts
(monitoring/alerts.yaml) tell a live job (`instance!=""`) from a finished run's final values.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
    push_to_gateway,
    start_http_server,
)
from prometheus_client.exposition import basic_auth_handler, default_handler
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from job.infra.errors import SettingsError
from job.infra.secrets import redact

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CHECKPOINT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
PUSH_TIMEOUT_SECONDS = 10.0

# A log record's fields and the gauge each one sets: (metric name, help, starts as NaN).
RECORD_GAUGES: dict[str, tuple[str, str, bool]] = {
    "step": ("gan_step", "Optimizer steps done (restored on resume)", False),
    "epoch": ("gan_epoch", "Current epoch over the training set", False),
    "images_seen": (
        "gan_images_seen",
        "Real images seen by D, all ranks (restored on resume)",
        False,
    ),
    "images_per_s": (
        "gan_images_per_second",
        "Training throughput over the last logging interval",
        True,
    ),
    "step_s": (
        "gan_recent_step_duration_seconds",
        "Mean step time over the last logging interval",
        True,
    ),
    "d_loss": ("gan_discriminator_loss", "Discriminator loss, mean over ranks", True),
    "g_loss": ("gan_generator_loss", "Generator loss, mean over ranks", True),
    "d_real": ("gan_discriminator_real_probability", "Mean D(x) on real images, 0..1", True),
    "d_fake": ("gan_discriminator_fake_probability", "Mean D(G(z)) on fakes, 0..1", True),
    "grad_norm_d": ("gan_discriminator_grad_norm", "Discriminator gradient L2 norm", True),
    "grad_norm_g": ("gan_generator_grad_norm", "Generator gradient L2 norm", True),
    # 0 unless GAN_AUGMENT=ada: no augmentation is a real value
    "augment_p": (
        "gan_augment_p",
        "Probability of each adaptive augmentation (GAN_AUGMENT=ada; 0: none)",
        False,
    ),
    "gpu_memory_bytes": (
        "gan_gpu_memory_allocated_bytes",
        "GPU memory allocated by tensors",
        False,
    ),
    "gpu_memory_peak_bytes": (
        "gan_gpu_memory_peak_bytes",
        "Peak GPU memory allocated by tensors",
        False,
    ),
    # shards datasets (job/data/shards.py), rank 0's
    "data_images_per_s": (
        "gan_data_images_per_second",
        "Images the shard stream delivered per second of waiting on it",
        True,
    ),
    "data_downloaded_bytes": (
        "gan_data_downloaded_bytes",
        "Shard bytes downloaded by this process so far",
        True,
    ),
    "data_download_bytes_per_s": (
        "gan_data_download_bytes_per_second",
        "Shard download throughput while downloading",
        True,
    ),
    "data_cache_bytes": ("gan_data_cache_bytes", "Bytes in this process's shard cache", True),
}

# An evaluation's fields (eval.jsonl) and their gauges, labelled by extractor like gan_fid.
QUALITY_GAUGES: dict[str, tuple[str, str]] = {
    "kid": ("gan_kid", "Latest KID, unbiased MMD^2 (lower is better)"),
    "kid_std": ("gan_kid_std", "Standard deviation of the latest KID over its subsets"),
    "precision": ("gan_precision", "Latest precision: share of samples on the real manifold"),
    "recall": ("gan_recall", "Latest recall: share of real images on the samples' manifold"),
    "label_accuracy": (
        "gan_label_accuracy",
        "Latest share of conditional samples classified as their label",
    ),
}

F = TypeVar("F", bound=Callable[..., Any])


def _if_enabled(method: F) -> F:
    """Turns a method into a no-op (returning None) on a disabled Metrics."""

    @functools.wraps(method)
    def wrapper(self: Metrics, *args: Any, **kwargs: Any) -> Any:
        if self.enabled:
            return method(self, *args, **kwargs)
        return None

    return wrapper  # type: ignore[return-value]


class _RunIdLabel(Collector):
    """Collects an inner registry and adds `run_id` to every sample."""

    def __init__(self, inner: CollectorRegistry):
        self.inner = inner
        self.run_id = ""

    def collect(self) -> Iterator[Metric]:
        for family in self.inner.collect():
            if self.run_id:
                family.samples = [
                    s._replace(labels={"run_id": self.run_id, **s.labels}) for s in family.samples
                ]
            yield family


class Metrics:
    """The job's Prometheus metrics. Rank 0 creates an enabled one; other ranks a disabled one."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._server: Any = None
        if not enabled:
            return
        r = CollectorRegistry()
        self._label = _RunIdLabel(r)
        self.registry = CollectorRegistry()
        self.registry.register(self._label)
        ProcessCollector(registry=r)
        self.run_info = Info(
            "gan_run", "The run: id, dataset, model, world size, job version", registry=r
        )
        self._training_metrics(r)
        self._quality_metrics(r)
        self._checkpoint_metrics(r)

    def _training_metrics(self, r: CollectorRegistry) -> None:
        self.gauges = {
            field: _gauge(name, doc, r, math.nan if nan else 0.0)
            for field, (name, doc, nan) in RECORD_GAUGES.items()
        }
        self.step_seconds = Histogram(
            "gan_step_duration_seconds",
            "Wall time of one training step",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.nonfinite = Counter(
            "gan_nonfinite_losses", "Steps whose loss was NaN or infinite", registry=r
        )
        self.resumes = Counter(
            "gan_resumes", "1 when this process resumed from a checkpoint", registry=r
        )

    def _quality_metrics(self, r: CollectorRegistry) -> None:
        self.fid = Gauge("gan_fid", "Latest FID (lower is better)", ["extractor"], registry=r)
        self.fid_images_seen = Gauge(
            "gan_fid_images_seen",
            "Images seen when the latest FID was measured",
            ["extractor"],
            registry=r,
        )
        self.quality = {
            field: Gauge(name, doc, ["extractor"], registry=r)
            for field, (name, doc) in QUALITY_GAUGES.items()
        }
        self.best_step = Gauge(
            "gan_best_step",
            "Step of the best evaluation so far (best/generator.pt)",
            ["score"],
            registry=r,
        )
        self.best_value = Gauge(
            "gan_best_score", "The best evaluation's score (lower is better)", ["score"], registry=r
        )

    def _checkpoint_metrics(self, r: CollectorRegistry) -> None:
        self.checkpoint_seconds = Histogram(
            "gan_checkpoint_duration_seconds",
            "Time to write and commit a checkpoint",
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.checkpoint_last_seconds = _gauge(
            "gan_checkpoint_last_duration_seconds", "Time the latest checkpoint took", r, math.nan
        )
        self.checkpoint_step = _gauge(
            "gan_checkpoint_last_step", "Step of the latest complete checkpoint", r
        )
        self.checkpoint_time = _gauge(
            "gan_checkpoint_last_success_timestamp_seconds",
            "Unix time of the latest complete checkpoint (0: none yet in this process)",
            r,
        )
        self.upload_failures = Counter(
            "gan_upload_failures", "Artifact uploads that failed after their retries", registry=r
        )
        self.checkpoints_skipped = Counter(
            "gan_checkpoints_skipped",
            "Checkpoints not taken because earlier ones were still waiting to be stored",
            registry=r,
        )

    @_if_enabled
    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        if port == 0 or self._server is not None:
            return
        try:
            self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            problem = (
                f"GAN_METRICS_PORT={port}: cannot serve metrics on {addr}:{port} ({e.strerror}): "
                "expected a free port, or 0 for no metrics endpoint"
            )
            raise SettingsError([problem]) from e
        log.info("serving metrics on %s:%d/metrics", addr, port)

    def close(self) -> None:
        """Stops the HTTP endpoint, if any."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @_if_enabled
    def set_info(
        self, run_id: str, dataset: str, model: str, world_size: int, version: str
    ) -> None:
        self._label.run_id = run_id
        self.run_info.info(
            {
                "run_id": run_id,
                "dataset": redact(dataset),
                "model": model,
                "world_size": str(world_size),
                "version": version,
            }
        )

    @_if_enabled
    def observe_record(self, record: dict[str, Any]) -> None:
        """Sets the gauge of every field of a log record that has one."""
        for field, value in record.items():
            if field in self.gauges:
                self.gauges[field].set(value)

    @_if_enabled
    def observe_step_seconds(self, seconds: float) -> None:
        if math.isfinite(seconds):
            self.step_seconds.observe(seconds)

    @_if_enabled
    def inc_nonfinite(self) -> None:
        self.nonfinite.inc()

    @_if_enabled
    def observe_fid(self, value: float, extractor: str, images_seen: int) -> None:
        self.fid.labels(extractor).set(value)
        self.fid_images_seen.labels(extractor).set(images_seen)

    @_if_enabled
    def observe_quality(self, values: dict[str, Any], extractor: str) -> None:
        """Sets the gauge of every evaluation field that has one (KID, precision, ...)."""
        for field, value in values.items():
            if field in self.quality:
                self.quality[field].labels(extractor).set(value)

    @_if_enabled
    def observe_best(self, step: int, value: float, score: str) -> None:
        self.best_step.labels(score).set(step)
        self.best_value.labels(score).set(value)

    @_if_enabled
    def observe_checkpoint(self, seconds: float, step: int) -> None:
        if math.isfinite(seconds):
            self.checkpoint_seconds.observe(seconds)
        self.checkpoint_last_seconds.set(seconds)
        self.checkpoint_step.set(step)
        self.checkpoint_time.set(time.time())

    @_if_enabled
    def inc_upload_failures(self, n: int = 1) -> None:
        self.upload_failures.inc(n)

    @_if_enabled
    def inc_checkpoints_skipped(self) -> None:
        self.checkpoints_skipped.inc()

    @_if_enabled
    def inc_resumes(self) -> None:
        self.resumes.inc()

    @_if_enabled
    def push(
        self,
        url: str,
        job: str,
        grouping: dict[str, str],
        timeout: float = PUSH_TIMEOUT_SECONDS,
    ) -> None:
        """Pushes every metric (replacing the group), waiting at most timeout seconds on each
        connection; logs and swallows any failure.

        The run id joins the grouping key unless the caller sets one, so each run's final
        values stay in the Pushgateway side by side instead of the next run replacing them.
        A user:password in the URL is sent as HTTP basic auth, and never shown.
        """
        if timeout <= 0:
            log.warning("metrics not pushed to %s: no time left to wait on it", redact(url))
            return
        if self._label.run_id:
            grouping = {"run_id": self._label.run_id, **grouping}
        gateway, handler = _push_target(url)
        try:
            push_to_gateway(
                gateway,
                job=job,
                registry=self.registry,
                grouping_key=grouping,
                timeout=timeout,
                handler=handler,
            )
        except Exception as e:  # a failed push must never fail the job at exit
            log.warning("pushing metrics to %s failed: %s", redact(url), redact(str(e)))
        else:
            log.info("pushed metrics to %s (job=%s, %s)", redact(url), job, grouping)

    def render(self) -> bytes:
        return generate_latest(self.registry) if self.enabled else b""


def _push_target(url: str) -> tuple[str, Callable[..., Callable[[], None]]]:
    """The Pushgateway URL as prometheus_client takes it, and the handler that sends the rest.

    prometheus_client appends the grouping path to the URL's text: it gets the URL without its
    user:password (it would take them for a host name), query and fragment. The handler sends
    the user:password as HTTP basic auth and the query after the grouping path."""
    parts = urlsplit(url)
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment=""))
    auth = (
        None if parts.username is None else (unquote(parts.username), unquote(parts.password or ""))
    )

    def handler(url, method, timeout, headers, data):
        if parts.query:
            url = urlunsplit(urlsplit(url)._replace(query=parts.query))
        if auth is None:
            return default_handler(url, method, timeout, headers, data)
        return basic_auth_handler(url, method, timeout, headers, data, *auth)

    return bare, handler


def _gauge(name: str, doc: str, registry: CollectorRegistry, start: float = 0.0) -> Gauge:
    gauge = Gauge(name, doc, registry=registry)
    gauge.set(start)
    return gauge
