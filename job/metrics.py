"""Prometheus metrics of the training job: an HTTP endpoint on rank 0, a Pushgateway push at exit.

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
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CHECKPOINT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
PUSH_TIMEOUT_SECONDS = 10.0

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
    """The job's metrics. Rank 0 creates an enabled one; other ranks a disabled one."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._server: Any = None
        if not enabled:
            return
        inner = CollectorRegistry()
        self._label = _RunIdLabel(inner)
        self.registry = CollectorRegistry()
        self.registry.register(self._label)
        self._create(inner)

    def _create(self, r: CollectorRegistry) -> None:
        ProcessCollector(registry=r)
        self.run_info = Info(
            "gan_run", "The run: id, dataset, model, world size, job version", registry=r
        )

        self.step = Gauge("gan_step", "Optimizer steps done (restored on resume)", registry=r)
        self.epoch = Gauge("gan_epoch", "Current epoch over the training set", registry=r)
        self.images_seen = Gauge(
            "gan_images_seen", "Real images seen by D, all ranks (restored on resume)", registry=r
        )
        self.images_per_second = _nan_gauge(
            "gan_images_per_second", "Training throughput over the last logging interval", r
        )
        self.recent_step_seconds = _nan_gauge(
            "gan_recent_step_duration_seconds", "Mean step time over the last logging interval", r
        )
        self.step_seconds = Histogram(
            "gan_step_duration_seconds",
            "Wall time of one training step",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.d_loss = _nan_gauge("gan_discriminator_loss", "Discriminator loss, mean over ranks", r)
        self.g_loss = _nan_gauge("gan_generator_loss", "Generator loss, mean over ranks", r)
        self.d_real = _nan_gauge(
            "gan_discriminator_real_probability", "Mean D(x) on real images, 0..1", r
        )
        self.d_fake = _nan_gauge(
            "gan_discriminator_fake_probability", "Mean D(G(z)) on fakes, 0..1", r
        )
        self.grad_norm_d = _nan_gauge(
            "gan_discriminator_grad_norm", "Discriminator gradient L2 norm", r
        )
        self.grad_norm_g = _nan_gauge("gan_generator_grad_norm", "Generator gradient L2 norm", r)
        self.nonfinite = Counter(
            "gan_nonfinite_losses", "Steps whose loss was NaN or infinite", registry=r
        )

        self.fid = Gauge("gan_fid", "Latest FID (lower is better)", ["extractor"], registry=r)
        self.fid_images_seen = Gauge(
            "gan_fid_images_seen",
            "Images seen when the latest FID was measured",
            ["extractor"],
            registry=r,
        )

        self.checkpoint_seconds = Histogram(
            "gan_checkpoint_duration_seconds",
            "Time to write and commit a checkpoint",
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.checkpoint_last_seconds = _nan_gauge(
            "gan_checkpoint_last_duration_seconds", "Time the latest checkpoint took", r
        )
        self.checkpoint_step = Gauge(
            "gan_checkpoint_last_step", "Step of the latest complete checkpoint", registry=r
        )
        self.checkpoint_time = Gauge(
            "gan_checkpoint_last_success_timestamp_seconds",
            "Unix time of the latest complete checkpoint (0: none yet in this process)",
            registry=r,
        )
        self.upload_failures = Counter(
            "gan_upload_failures", "Artifact uploads that failed after their retries", registry=r
        )
        self.resumes = Counter(
            "gan_resumes", "1 when this process resumed from a checkpoint", registry=r
        )
        self.gpu_allocated = Gauge(
            "gan_gpu_memory_allocated_bytes", "GPU memory allocated by tensors", registry=r
        )
        self.gpu_peak = Gauge(
            "gan_gpu_memory_peak_bytes", "Peak GPU memory allocated by tensors", registry=r
        )

    @_if_enabled
    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        if port == 0 or self._server is not None:
            return
        self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
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
                "dataset": dataset,
                "model": model,
                "world_size": str(world_size),
                "version": version,
            }
        )

    @_if_enabled
    def observe_step(
        self,
        step: int,
        epoch: int,
        images_seen: int,
        images_per_second: float,
        step_seconds: float,
        d_loss: float,
        g_loss: float,
        d_real: float,
        d_fake: float,
        grad_norm_d: float,
        grad_norm_g: float,
    ) -> None:
        self.step.set(step)
        self.epoch.set(epoch)
        self.images_seen.set(images_seen)
        self.images_per_second.set(images_per_second)
        self.recent_step_seconds.set(step_seconds)
        self.d_loss.set(d_loss)
        self.g_loss.set(g_loss)
        self.d_real.set(d_real)
        self.d_fake.set(d_fake)
        self.grad_norm_d.set(grad_norm_d)
        self.grad_norm_g.set(grad_norm_g)

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
    def inc_resumes(self) -> None:
        self.resumes.inc()

    @_if_enabled
    def set_gpu_memory(self, allocated_bytes: int, peak_bytes: int) -> None:
        self.gpu_allocated.set(allocated_bytes)
        self.gpu_peak.set(peak_bytes)

    @_if_enabled
    def push(self, url: str, job: str, grouping: dict[str, str]) -> None:
        """Pushes every metric (replacing the group); logs and swallows any failure.

        The run id joins the grouping key unless the caller sets one, so each run's final
        values stay in the Pushgateway side by side instead of the next run replacing them.
        """
        if self._label.run_id:
            grouping = {"run_id": self._label.run_id, **grouping}
        try:
            push_to_gateway(
                url,
                job=job,
                registry=self.registry,
                grouping_key=grouping,
                timeout=PUSH_TIMEOUT_SECONDS,
            )
        except Exception as e:  # a failed push must never fail the job at exit
            log.warning("pushing metrics to %s failed: %s", url, e)
        else:
            log.info("pushed metrics to %s (job=%s, %s)", url, job, grouping)

    def render(self) -> bytes:
        return generate_latest(self.registry) if self.enabled else b""


def _nan_gauge(name: str, documentation: str, registry: CollectorRegistry) -> Gauge:
    gauge = Gauge(name, documentation, registry=registry)
    gauge.set(math.nan)
    return gauge
