"""The training run: set-up, the D/G loop and its schedule, and the final exports.

One readable loop. Every rank runs it; rank 0 alone writes artifacts and serves metrics, and
every decision to stop is agreed by all ranks so no rank is left waiting in a collective.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from job import augment, checkpoint, data, distributed, evaluate, losses
from job.errors import (
    EXIT_OK,
    EXIT_PREEMPTED,
    CheckpointError,
    DiskFullError,
    NonFiniteLossError,
    StorageError,
)
from job.metrics import Metrics
from job.models import Arch, build_discriminator, build_generator
from job.report import write_report
from job.settings import Settings, public_dict
from job.storage import BackgroundWriter, Store, download_prefix, open_store

log = logging.getLogger(__name__)
VERSION = "0.1.0"
GRID_SIZE = 64
STOP_CHECK_EVERY = 10  # steps between agreements on stopping when distributed
NONFINITE_LR_FACTOR = 0.5
# settings that change what a checkpoint means: resuming across a change is refused
COMPATIBLE_SETTINGS = ("dataset", "model", "conditional", "latent_dim", "width", "image_size")


@dataclass
class RunState:
    """What the loop advances and a checkpoint restores, besides the models and optimizers."""

    step: int = 0
    images_seen: int = 0
    records: list[dict] = field(default_factory=list)  # progress lines, as in metrics.jsonl
    evals: list[dict] = field(default_factory=list)  # FID records, as in eval.jsonl
    rollbacks: int = 0  # times a non-finite loss rolled the run back (each halves the LRs)


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes its step, checkpoints and exits for a retry."""

    def __init__(self):
        self.signal: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum


class Trainer:
    def __init__(self, settings: Settings, world: distributed.World):
        self.s, self.world, self.device = settings, world, world.device
        self.run_id = settings.resolved_run_id
        self.root = open_store(settings.artifact_uri, settings.s3_endpoint_url)
        self.store: Store = self.root.child(self.run_id)
        if world.is_main:
            self.store.check()
        self.data = self._load_data()
        self.arch = Arch(
            model=settings.model,
            channels=self.data.channels,
            image_size=self.data.image_size,
            latent_dim=settings.latent_dim,
            width=settings.width,
            num_classes=self.data.num_classes,
            spectral_norm=settings.spectral_norm,
            projection=settings.conditioning == "projection",
        )
        self.extractor = evaluate.load_extractor(settings, self.data.channels, self.device)
        torch.manual_seed(settings.seed)  # identical initial weights on every rank
        self.g = build_generator(self.arch).to(self.device)
        self.d = build_discriminator(self.arch).to(self.device)
        self.amp = _amp_enabled(settings.amp, self.device)
        self.channels_last = settings.channels_last and settings.model == "dcgan"
        if self.channels_last:
            self.g.to(memory_format=torch.channels_last)
            self.d.to(memory_format=torch.channels_last)
        self.g_ema = copy.deepcopy(self.g).requires_grad_(False)
        self.opt_g = self._adam(self.g, settings.lr_g)
        self.opt_d = self._adam(self.d, settings.lr_d)
        self.source = data.BatchSource(
            self.data,
            settings.batch_size,
            settings.seed,
            self.device,
            world.rank,
            world.world_size,
            settings.num_workers,
            on_device=settings.data_on_device,
        )
        self.state = RunState()
        reporting = settings.metrics_port > 0 or settings.pushgateway_url is not None
        self.metrics = Metrics(enabled=world.is_main and reporting)
        self.writer = (
            BackgroundWriter(self.store, on_failure=self._upload_failed) if world.is_main else None
        )
        self.stop = StopFlag()
        self.real_fid_state: dict | None = None
        self.grids: dict[int, bytes] = {}  # step -> sample grid PNG, for the report
        # set on the device inside a step, read where the loop syncs anyway (no per-step sync)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.store_failure: Exception | None = None  # a failure retrying cannot fix (disk full)

    # ------------------------------------------------------------ set-up

    def _adam(self, module: nn.Module, lr: float) -> torch.optim.Adam:
        fast = {}
        if self.s.fused_adam:
            fast = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        betas = (self.s.beta1, self.s.beta2)
        return torch.optim.Adam(module.parameters(), lr=lr, betas=betas, **fast)

    def _load_data(self) -> data.ImageData:
        local = None
        if self.s.dataset_kind == "s3":
            cache = Path(self.s.data_dir) / "s3" / self.s.dataset.removeprefix("s3://")
            local = download_prefix(self.s.dataset, cache, self.s.s3_endpoint_url)
        return data.load_dataset(self.s, local)

    def _upload_failed(self, exc: Exception) -> None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            self.store_failure = exc
        self.metrics.inc_upload_failures()  # the writer logs the failure itself

    def resume(self) -> None:
        found = self._find_checkpoint()
        if found is None:
            self._reseed_for_rank(self.state.step)
            return
        step, state = found
        self._check_compatible(step, state)
        self._load_state(step, state)
        self.metrics.inc_resumes()
        if self.world.is_main:
            self._reload_grids(step)
        log.info("resumed from step %d (%d images seen)", step, self.state.images_seen)

    def _check_compatible(self, step: int, state: dict) -> None:
        """Refuse to continue a checkpoint on top of settings that would change what it means."""
        saved, now = state["settings"], public_dict(self.s)
        changed = [
            f"GAN_{key.upper()}: {saved.get(key)!r} in the checkpoint, {now[key]!r} now"
            for key in COMPATIBLE_SETTINGS
            if saved.get(key) != now[key]
        ]
        if state["arch"] != self.arch.to_dict() and not changed:
            changed.append(f"model {state['arch']} in the checkpoint, {self.arch.to_dict()} now")
        if changed:
            raise CheckpointError(
                f"{self.store.uri}: checkpoint at step {step} was made with other settings ("
                + "; ".join(changed)
                + "): restore them, or use another GAN_RUN_ID or GAN_RESUME=never"
            )

    def _load_state(self, step: int, state: dict) -> None:
        _unwrap(self.g).load_state_dict(state["g"])
        _unwrap(self.d).load_state_dict(state["d"])
        self.g_ema.load_state_dict(state["g_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.source.load_state_dict(state["data"])
        self.state = RunState(
            step, state["images_seen"], state["records"], state["evals"], state["rollbacks"]
        )
        self._set_learning_rates()
        rng = state["rng"]
        if len(rng) == self.world.world_size:
            _set_rng(rng[self.world.rank], self.device)
        else:  # another world size: fresh per-rank streams, still determined by seed and step
            self._reseed_for_rank(step)
        self.nonfinite.zero_()

    def _set_learning_rates(self) -> None:
        """The settings' rates (so a restart may change them), halved once per rollback."""
        scale = NONFINITE_LR_FACTOR**self.state.rollbacks
        for opt, lr in ((self.opt_g, self.s.lr_g), (self.opt_d, self.s.lr_d)):
            for group in opt.param_groups:
                group["lr"] = lr * scale

    def _reload_grids(self, step: int) -> None:
        for key in self.store.list("samples/"):
            if (grid_step := int(key[len("samples/step-") : -len(".png")])) <= step:
                self.grids[grid_step] = self.store.get_bytes(key)

    def _find_checkpoint(self) -> tuple[int, dict] | None:
        if self.s.resume == "never":
            return None
        if self.s.resume == "auto":
            return checkpoint.load_latest(self.store)
        found = checkpoint.load_from(self.s.resume, self.s.s3_endpoint_url, self.run_id)
        if found is None:
            raise CheckpointError(f"GAN_RESUME={self.s.resume}: no complete checkpoint there")
        return found

    def _reseed_for_rank(self, step: int) -> None:
        torch.manual_seed(self.s.seed * 1_000_003 + step * 1009 + self.world.rank + 1)

    def wrap(self) -> None:
        """DDP for both nets (BatchNorm buffers stay per rank, or SyncBatchNorm), then compile."""
        if self.world.distributed:
            if self.s.sync_batchnorm and self.device.type == "cuda":
                self.g = nn.SyncBatchNorm.convert_sync_batchnorm(self.g)
                self.d = nn.SyncBatchNorm.convert_sync_batchnorm(self.d)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.g = DDP(self.g, device_ids=ids, broadcast_buffers=False)
            self.d = DDP(self.d, device_ids=ids, broadcast_buffers=False)
        if self.s.compile:
            self.g, self.d = torch.compile(self.g), torch.compile(self.d)

    # ------------------------------------------------------------ the loop

    def train_step(self) -> dict[str, torch.Tensor]:
        s, b = self.s, self.s.batch_size
        real, labels = self.source.next()
        if self.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        z = torch.randn(b, s.latent_dim, device=self.device)
        fake_labels = self._random_labels(b)
        aug = s.diffaugment  # DiffAugment before every D forward, real and fake ("": none)
        # lazy R1 (StyleGAN2): every r1_every steps, scaled by the interval; in this same
        # backward, so that DDP sees one backward per set of forwards
        r1_now = s.r1_gamma > 0 and self.state.step % s.r1_every == 0
        with self._autocast():
            fake = self.g(z, fake_labels)
            real_in = augment.diff_augment(real, aug)
            if r1_now:
                real_in = real_in.detach().requires_grad_(True)
            d_real = self.d(real_in, labels if self.arch.num_classes else None)
            d_fake = self.d(augment.diff_augment(fake.detach(), aug), fake_labels)
            loss_d = losses.d_loss(s.loss, d_real, d_fake, s.label_smoothing)
            if r1_now:
                loss_d = loss_d + s.r1_every * losses.r1_penalty(d_real, real_in, s.r1_gamma)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()

        # G's step needs gradients through D but not D's own (half of D's backward), and
        # must not average D's gradients over ranks
        self.d.requires_grad_(False)
        with self._no_sync(self.d), self._autocast():
            loss_g = losses.g_loss(s.loss, self.d(augment.diff_augment(fake, aug), fake_labels))
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.d.requires_grad_(True)
        self.opt_g.step()
        self._update_ema()
        self.nonfinite |= ~(torch.isfinite(loss_d) & torch.isfinite(loss_g))
        return {
            "d_loss": loss_d.detach(),
            "g_loss": loss_g.detach(),
            "d_real": torch.sigmoid(d_real.detach()).mean(),
            "d_fake": torch.sigmoid(d_fake.detach()).mean(),
        }

    def _random_labels(self, n: int) -> torch.Tensor | None:
        if not self.arch.num_classes:
            return None
        return torch.randint(self.arch.num_classes, (n,), device=self.device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    @staticmethod
    def _no_sync(module: nn.Module):
        module = getattr(module, "_orig_mod", module)
        return module.no_sync() if isinstance(module, DDP) else contextlib.nullcontext()

    @torch.no_grad()
    def _update_ema(self) -> None:
        g = _unwrap(self.g)
        ema_p, g_p = list(self.g_ema.parameters()), list(g.parameters())
        # warm-up: early on the EMA follows G closely instead of lingering at the random init
        decay = min(self.s.ema_decay, (1 + self.state.step) / (10 + self.state.step))
        torch._foreach_lerp_(ema_p, g_p, 1.0 - decay)
        for eb, gb in zip(self.g_ema.buffers(), g.buffers(), strict=True):
            eb.copy_(gb)

    def run(self) -> int:
        s = self.s
        self.stop.install()
        if self.world.is_main:
            self.metrics.serve(s.metrics_port)
            self.metrics.set_info(self.run_id, s.dataset, s.model, self.world.world_size, VERSION)
            self._write_config()
        self._prepare_fid()
        images_per_step = s.batch_size * self.world.world_size
        self.started = time.monotonic()
        window_start, window_steps = self.started, 0
        stop_reason = "max_steps" if self.state.step >= s.max_steps else None
        while stop_reason is None:
            t0 = time.monotonic()
            stats = self.train_step()
            self.state.step += 1
            self.state.images_seen += images_per_step
            window_steps += 1
            self.metrics.observe_step_seconds(time.monotonic() - t0)
            if self.store_failure is not None:
                raise DiskFullError(f"{self.store.uri}: {self.store_failure}")
            stop_reason = self._should_stop()
            log_now = self.state.step % s.log_every == 0 or stop_reason is not None
            if (log_now or self.state.step % s.checkpoint_every == 0) and self._rolled_back():
                window_start, window_steps = time.monotonic(), 0
                stop_reason = None if stop_reason == "max_steps" else stop_reason
                continue
            if log_now:
                elapsed = time.monotonic() - window_start
                self._log(
                    stats,
                    window_steps * images_per_step / max(elapsed, 1e-9),
                    elapsed / window_steps,
                )
                window_start, window_steps = time.monotonic(), 0
            if self.state.step % s.sample_every == 0:
                self._samples()
            if s.fid_every and self.state.step % s.fid_every == 0:
                self._fid()
            if self.state.step % s.checkpoint_every == 0 and stop_reason is None:
                self._checkpoint()
        return self._finish(stop_reason)

    def _rolled_back(self) -> bool:
        """After a non-finite loss on any rank: roll back to the last checkpoint, or fail."""
        (bad,) = distributed.any_rank_each([bool(self.nonfinite)], self.world)
        if not bad:
            return False
        st = self.state
        self.metrics.inc_nonfinite()
        what = f"non-finite loss by step {st.step}"
        if self.s.nonfinite == "fail" or st.rollbacks >= self.s.nonfinite_max_rollbacks:
            raise NonFiniteLossError(
                f"{what} (after {st.rollbacks} rollbacks; GAN_NONFINITE={self.s.nonfinite}): "
                f"lower GAN_LR_G / GAN_LR_D"
            )
        if self.writer is not None:
            self.writer.flush()
        distributed.barrier(self.world)
        found = checkpoint.load_latest(self.store)
        if found is None:
            raise NonFiniteLossError(f"{what}, and no checkpoint to roll back to")
        rollbacks = st.rollbacks + 1
        found[1]["rollbacks"] = rollbacks
        self._load_state(*found)
        log.warning(
            "%s: rolled back to step %d with learning rates x%g (rollback %d of %d)",
            what, found[0], NONFINITE_LR_FACTOR**rollbacks, rollbacks,
            self.s.nonfinite_max_rollbacks,
        )  # fmt: skip
        return True

    def _time_left(self) -> float:
        """Seconds left of GAN_MAX_MINUTES (infinite without a budget)."""
        if not self.s.max_minutes:
            return math.inf
        return self.s.max_minutes * 60 - (time.monotonic() - self.started)

    def _should_stop(self) -> str | None:
        s = self.s
        if self.state.step >= s.max_steps:
            return "max_steps"
        if self.world.distributed and self.state.step % STOP_CHECK_EVERY:
            return None  # agreeing costs a collective and a host sync: not every step
        signalled = self.stop.signal is not None
        over_time = self._time_left() < 0
        signalled, over_time = distributed.any_rank_each([signalled, over_time], self.world)
        if signalled:
            return "signal"
        return "max_minutes" if over_time else None

    def _finish(self, reason: str) -> int:
        log.info("stopping at step %d: %s", self.state.step, reason)
        if reason != "signal":
            self._samples()
            if self.extractor is not None and not self._evaluated_at(self.state.step):
                self._fid()
        self._checkpoint()
        if self.world.is_main and reason != "signal":
            self._export_generator()
            self._report()
        return EXIT_PREEMPTED if reason == "signal" else EXIT_OK

    def close(self, timeout: float | None = None) -> bool:
        """Wait for every queued upload; False when they did not all finish in time."""
        if self.writer is None:
            return True
        return self.writer.close(timeout)

    # ------------------------------------------------------------ progress

    def _log(self, stats: dict[str, torch.Tensor], images_per_s: float, step_s: float) -> None:
        st = self.state
        values = distributed.mean_over_ranks(torch.stack(list(stats.values())).float(), self.world)
        v = dict(zip(stats, values.tolist(), strict=True))
        record = {
            "step": st.step,
            "epoch": self.source.epoch,
            "images_seen": st.images_seen,
            "images_per_s": round(images_per_s, 1),
            "skipped_images": self.source.skipped_images,
            **{k: round(x, 5) for k, x in v.items()},
            "time": round(time.time(), 3),
        }
        st.records.append(record)
        if not self.world.is_main:
            return
        eta = min((self.s.max_steps - st.step) * step_s, self._time_left())
        log.info(
            "step %d/%d | %.0f img/s | D %.3f G %.3f | D(x) %.3f D(G(z)) %.3f | epoch %d | ETA %s",
            st.step, self.s.max_steps, images_per_s, v["d_loss"], v["g_loss"], v["d_real"],
            v["d_fake"], self.source.epoch, _duration(eta),
        )  # fmt: skip
        self.metrics.observe_step(
            step=st.step, epoch=self.source.epoch, images_seen=st.images_seen,
            images_per_second=images_per_s, step_seconds=step_s, d_loss=v["d_loss"],
            g_loss=v["g_loss"], d_real=v["d_real"], d_fake=v["d_fake"],
            grad_norm_d=_grad_norm(self.d), grad_norm_g=_grad_norm(self.g),
        )  # fmt: skip
        if self.device.type == "cuda":
            self.metrics.set_gpu_memory(
                torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
            )
        else:
            self.metrics.set_gpu_memory(0, 0)  # truthfully none, rather than "unknown"
        self._put_jsonl("metrics.jsonl", st.records)

    def _put_jsonl(self, key: str, rows: list[dict]) -> None:
        self.writer.submit(key, data="".join(json.dumps(r) + "\n" for r in rows).encode())

    def _write_config(self) -> None:
        config = {
            "settings": public_dict(self.s),
            "run_id": self.run_id,
            "arch": self.arch.to_dict(),
            "world_size": self.world.world_size,
            "version": VERSION,
        }
        self.writer.submit("config.json", data=json.dumps(config, indent=2).encode())

    def _samples(self) -> None:
        if not self.world.is_main:
            return
        z, labels = evaluate.fixed_inputs(
            self.arch.latent_dim, GRID_SIZE, self.arch.num_classes, self.s.seed, self.device
        )
        images = evaluate.generate(self.g_ema, z, labels)
        nrow = self.arch.num_classes if self.arch.num_classes else 8
        png = evaluate.grid_png(images, nrow=nrow)
        self.grids[self.state.step] = png
        self.writer.submit(f"samples/step-{self.state.step:08d}.png", data=png)

    def _report(self) -> None:
        """report.png: losses, D outputs and FID against images seen, and the grids over time."""
        if not self.world.is_main:
            return
        st = self.state
        png = write_report(st.records, st.evals, sorted(self.grids.items()), title=self.run_id)
        self.writer.submit("report.png", data=png)

    # ------------------------------------------------------------ FID

    def _prepare_fid(self) -> None:
        """Real-image statistics, computed once per dataset and extractor and cached in the store."""
        if self.extractor is None:
            return
        num = evaluate.fid_num_samples(self.s, self.device)
        key = evaluate.stats_key(
            self.s.dataset, self.arch.image_size, self.extractor, num, self.s.seed
        )
        cache = self.root.child("fid-stats")
        state = None
        if self.world.is_main:
            if cache.exists(f"{key}.pt"):
                state = torch.load(io.BytesIO(cache.get_bytes(f"{key}.pt")), weights_only=True)
            else:
                log.info(
                    "computing real-image FID statistics (%d images, %s)", num, self.extractor.name
                )
                images, _ = data.real_images(self.data, num, self.s.seed)
                state = evaluate.real_statistics(self.extractor, images, self.device)
                cache.put_bytes(f"{key}.pt", checkpoint.serialize(state))
        self.real_fid_state = distributed.broadcast_object(state, self.world)

    def _evaluated_at(self, step: int) -> bool:
        return any(e["step"] == step for e in self.state.evals)

    def _fid(self) -> None:
        if self.extractor is None:
            return
        num = evaluate.fid_num_samples(self.s, self.device)
        t0 = time.monotonic()
        fid = evaluate.compute_fid(
            self.extractor, self.real_fid_state, self.g_ema, self.arch.latent_dim,
            self.arch.num_classes, num, self.s.seed + 1, self.device, self.world.rank,
            self.world.world_size,
        )  # fmt: skip
        if not self.world.is_main:
            return
        st = self.state
        record = {
            "step": st.step,
            "images_seen": st.images_seen,
            "fid": round(fid, 4),
            "extractor": self.extractor.name,
            "num_samples": num,
            "seconds": round(time.monotonic() - t0, 2),
        }
        st.evals.append(record)
        log.info("FID %.3f at step %d (%s, %d samples)", fid, st.step, self.extractor.name, num)
        self.metrics.observe_fid(fid, self.extractor.name, st.images_seen)
        self._put_jsonl("eval.jsonl", st.evals)
        self._report()

    # ------------------------------------------------------------ checkpoints and exports

    def _checkpoint(self) -> None:
        rng = distributed.gather_objects(_get_rng(self.device), self.world)
        if not self.world.is_main:
            return
        t0 = time.monotonic()
        st = self.state
        state = {
            "step": st.step,
            "images_seen": st.images_seen,
            "arch": self.arch.to_dict(),
            "settings": public_dict(self.s),
            "world_size": self.world.world_size,
            "g": _unwrap(self.g).state_dict(),
            "d": _unwrap(self.d).state_dict(),
            "g_ema": self.g_ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "data": self.source.state_dict(),
            "rng": rng,
            "records": st.records,
            "evals": st.evals,
            "rollbacks": st.rollbacks,
        }

        def stored(step: int) -> None:
            seconds = time.monotonic() - t0
            self.metrics.observe_checkpoint(seconds, step)
            log.info("checkpoint at step %d stored (%.2f s after it was taken)", step, seconds)

        checkpoint.save(self.writer, st.step, state, self.s.keep_checkpoints, on_stored=stored)

    def _export_generator(self) -> None:
        export = {
            "arch": self.arch.to_dict(),
            "g_ema": self.g_ema.state_dict(),
            "step": self.state.step,
        }
        self.writer.submit("final/generator.pt", data=checkpoint.serialize(export))


def _unwrap(module: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DDP wrappers."""
    module = getattr(module, "_orig_mod", module)
    return module.module if isinstance(module, DDP) else module


def _amp_enabled(setting: str, device: torch.device) -> bool:
    if setting == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return setting == "bf16"


def _grad_norm(module: nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0


def _get_rng(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def train(settings: Settings) -> int:
    """The whole job for one process: returns its exit status."""
    world = distributed.setup(settings.device)
    try:
        trainer = Trainer(settings, world)
        trainer.resume()
        trainer.wrap()
        try:
            code = trainer.run()
        finally:
            # a job that failed does not wait on storage that cannot take more (disk full)
            failed = trainer.store_failure is not None
            uploaded = trainer.close(timeout=5 if failed else settings.upload_timeout_minutes * 60)
            if world.is_main and settings.pushgateway_url:
                trainer.metrics.push(
                    settings.pushgateway_url, "gan-job", {"run_id": trainer.run_id}
                )
        if not uploaded and code == EXIT_OK:
            raise StorageError(
                f"{trainer.store.uri}: artifacts still not stored after "
                f"GAN_UPLOAD_TIMEOUT_MINUTES={settings.upload_timeout_minutes}"
            )
        return code
    finally:
        distributed.teardown()
