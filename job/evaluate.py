"""Sample grids and FID (torcheval's FrechetInceptionDistance with a pluggable feature extractor)."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

with warnings.catch_warnings():  # torcheval still calls the deprecated torch.jit.script at import
    warnings.simplefilter("ignore", FutureWarning)
    from torcheval.metrics import FrechetInceptionDistance

from job import distributed
from job.errors import FIDError
from job.metrics import Metrics
from job.storage import JsonlLog, Store

log = logging.getLogger(__name__)

INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"  # torchvision's ImageNet InceptionV3


# ---------------------------------------------------------------- samples


def fixed_inputs(
    latent_dim: int, num: int, num_classes: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Noise (and labels cycling through the classes) that are the same for a given seed."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(num, latent_dim, generator=g).to(device)
    labels = torch.arange(num, device=device) % num_classes if num_classes else None
    return z, labels


@torch.no_grad()
def generate(g: nn.Module, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Images in [0, 1] from a generator in eval mode (restoring its mode afterwards)."""
    was_training = g.training
    g.eval()
    try:
        return (g(z, labels).float() + 1) / 2
    finally:
        g.train(was_training)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to uint8 pixels."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def grid_png(images: torch.Tensor, nrow: int) -> bytes:
    """A PNG grid of images in [0, 1]."""
    grid = torchvision.utils.make_grid(images.cpu(), nrow=nrow, padding=2, pad_value=1.0)
    from PIL import Image

    array = to_uint8(grid).permute(1, 2, 0).numpy()
    img = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- feature extractors


class InceptionFeatures(nn.Module):
    """InceptionV3's 2048-d pool features of [0, 1] images, resized to 299 px."""

    def __init__(self, weights: Path):
        super().__init__()
        net = torchvision.models.inception_v3(
            weights=None, aux_logits=True, init_weights=False, transform_input=False
        )
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        net.fc = nn.Identity()
        self.net = net.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the ImageNet weights were trained on [-1, 1] inputs (what transform_input does)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x * 2 - 1)


class ChannelAdapter(nn.Module):
    """torcheval feeds 3-channel images; a grayscale extractor gets its one channel back."""

    def __init__(self, model: nn.Module, channels: int):
        super().__init__()
        self.model, self.channels = model, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x[:, : self.channels])


@dataclass
class Extractor:
    model: nn.Module  # takes N x 3 x H x W in [0, 1]
    dim: int
    name: str  # recorded with every FID value
    identity: str  # changes when the weights change; keys the real-statistics cache


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_extractor(
    choice: str,
    channels: int,
    image_size: int,
    device: torch.device,
    inception_weights: str | None = None,
    required: bool = True,
) -> Extractor | None:
    """The FID feature extractor GAN_FID_FEATURES names (inception, none, or a TorchScript
    file), or None when FID is off.

    Unavailable and required: FIDError before training. Unavailable and not required (the
    default inception, offline without baked-in weights): a warning and no FID.
    """
    if choice == "none":
        return None
    if choice == "inception":
        weights = Path(
            inception_weights or Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        )
        if not weights.is_file():
            msg = (
                f"InceptionV3 weights not found at {weights}: put {INCEPTION_FILE} in "
                f"$TORCH_HOME/hub/checkpoints, set GAN_FID_INCEPTION_WEIGHTS, or set "
                f"GAN_FID_FEATURES to a TorchScript extractor (`gan-job features`) or none"
            )
            if required:
                raise FIDError(msg)
            log.warning("%s. Training goes on without FID.", msg)
            return None
        try:
            model = InceptionFeatures(weights)
        except Exception as exc:  # noqa: BLE001 - any load failure is a bad weights file
            raise FIDError(f"GAN_FID_INCEPTION_WEIGHTS={weights}: cannot load ({exc})") from exc
        return Extractor(
            model.to(device), 2048, "inception_v3", f"inception-{_file_digest(weights)}"
        )
    return _load_torchscript(Path(choice), channels, image_size, device)


def _load_torchscript(
    path: Path, channels: int, image_size: int, device: torch.device
) -> Extractor:
    if not path.is_file():
        raise FIDError(
            f"GAN_FID_FEATURES={path}: no such file (expected inception, none, or a TorchScript model)"
        )
    try:
        model = torch.jit.load(str(path), map_location=device).eval()
        with torch.no_grad():  # probe with images of the size FID will feed it
            out = model(torch.rand(2, channels, image_size, image_size, device=device))
    except Exception as exc:  # noqa: BLE001 - not TorchScript, or the wrong input or output
        raise FIDError(
            f"GAN_FID_FEATURES={path}: not a TorchScript model mapping "
            f"N x {channels} x {image_size} x {image_size} in [0,1] to N x D features ({exc})"
        ) from exc
    if out.ndim != 2:
        raise FIDError(f"GAN_FID_FEATURES={path}: output shape {tuple(out.shape)}, expected N x D")
    name = f"torchscript:{path.stem}"
    return Extractor(
        ChannelAdapter(model, channels), out.shape[1], name, f"ts-{_file_digest(path)}"
    )


# ---------------------------------------------------------------- FID


def fid_num_samples(setting: int | None, device: torch.device) -> int:
    """GAN_FID_NUM_SAMPLES, or its default: 10,000 on a GPU, 500 on a CPU."""
    if setting:
        return setting
    return 10_000 if device.type == "cuda" else 500


def _metric(extractor: Extractor, device: torch.device) -> FrechetInceptionDistance:
    return FrechetInceptionDistance(model=extractor.model, feature_dim=extractor.dim, device=device)


def _three_channels(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def real_statistics(
    extractor: Extractor, images: torch.Tensor, device: torch.device, batch: int = 100
) -> dict[str, torch.Tensor]:
    """The metric's state after only real uint8 images: cached, and loaded at every FID."""
    metric = _metric(extractor, device)
    for chunk in images.split(batch):
        metric.update(_three_channels(chunk.to(device).float() / 255), is_real=True)
    return {k: v.detach().cpu() for k, v in metric.state_dict().items()}


def stats_key(dataset: str, image_size: int, extractor: Extractor, num: int, seed: int) -> str:
    text = f"v2|{dataset}|{image_size}|{extractor.identity}|{num}|{seed}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@torch.no_grad()
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
    """FID of num generated images against the cached real statistics; None when stop()
    (asked before every batch, the same number of times on every rank) turned true.

    The noise for all num images is drawn from one seeded generator and each rank takes its
    stride of it, so FID over W ranks equals FID over one process for the same samples. Rank 0
    alone holds the real statistics: merging the ranks' states sums them once.
    """
    metric = _metric(extractor, device)
    if rank == 0:
        metric.load_state_dict({k: v.to(device) for k, v in real_state.items()})
    z, labels = fixed_inputs(latent_dim, num, num_classes, seed, torch.device("cpu"))
    z = z[rank::world_size]
    labels = labels[rank::world_size] if labels is not None else None
    for start in range(0, math.ceil(num / world_size), batch):
        if stop is not None and stop():
            return None
        zb = z[start : start + batch].to(device)
        if len(zb):
            lb = labels[start : start + batch].to(device) if labels is not None else None
            metric.update(_three_channels(generate(g, zb, lb)), is_real=False)
    if world_size > 1:
        from torcheval.metrics.toolkit import sync_and_compute

        return float(sync_and_compute(metric))
    return float(metric.compute())


# ---------------------------------------------------------------- the run's FID schedule


class FidEvaluator:
    """FID of the EMA generator every `every` steps and once more at the end of a run, against
    real statistics computed once per dataset and extractor and cached in the store; each
    result is a row of eval.jsonl and the gan_fid gauge.

    Every rank calls it: generation and feature extraction are split over ranks.
    """

    def __init__(
        self,
        extractor: Extractor | None,
        history: JsonlLog,
        metrics: Metrics,
        world: distributed.World,
        every: int,
        num: int,
        seed: int,
        latent_dim: int,
        num_classes: int,
    ):
        self.extractor, self.history, self.metrics, self.world = extractor, history, metrics, world
        self.every, self.num, self.seed = every, num, seed
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.real_state: dict[str, torch.Tensor] | None = None
        self.num_real = 0  # real images behind real_state

    def prepare(self, cache: Store, key: str, real_images: Callable[[int], torch.Tensor]) -> None:
        """Real statistics from the cache, or from real_images(num) (then cached)."""
        if self.extractor is None:
            return
        state = None
        if self.world.is_main:
            if cache.exists(f"{key}.pt"):
                state = torch.load(io.BytesIO(cache.get_bytes(f"{key}.pt")), weights_only=True)
            else:
                log.info(
                    "computing real-image FID statistics (%d images, %s)",
                    self.num, self.extractor.name,
                )  # fmt: skip
                state = real_statistics(self.extractor, real_images(self.num), self.world.device)
                buf = io.BytesIO()
                torch.save(state, buf)
                cache.put_bytes(f"{key}.pt", buf.getvalue())
        self.real_state = distributed.broadcast_object(state, self.world)
        self.num_real = int(self.real_state["num_real_images"])  # the dataset may have fewer
        if self.num_real < self.num and self.world.is_main:
            log.warning(
                "FID: real statistics from all %d images of the dataset, fewer than the %d "
                "generated (GAN_FID_NUM_SAMPLES); eval.jsonl records both",
                self.num_real, self.num,
            )  # fmt: skip

    def due(self, step: int, last: bool = False) -> bool:
        """At every `every` steps, and at the end unless this step was just evaluated."""
        if self.extractor is None:
            return False
        if last:
            return not any(row["step"] == step for row in self.history.rows)
        return bool(self.every) and step % self.every == 0

    def evaluate(
        self, g_ema: nn.Module, step: int, images_seen: int, stop: Callable[[], bool]
    ) -> bool:
        """One FID; False when a stop request cut it short (then nothing is recorded)."""
        t0 = time.monotonic()
        fid = compute_fid(
            self.extractor, self.real_state, g_ema, self.latent_dim, self.num_classes, self.num,
            self.seed, self.world.device, self.world.rank, self.world.world_size,
            stop=lambda: distributed.any_rank_each([stop()], self.world)[0],
        )  # fmt: skip
        if fid is None:
            log.info("FID at step %d cut short by a stop request", step)
            return False
        if self.world.is_main:
            self.history.append({
                "step": step, "images_seen": images_seen, "fid": round(fid, 4),
                "extractor": self.extractor.name, "num_samples": self.num,
                "num_real": self.num_real,
                "seconds": round(time.monotonic() - t0, 2),
            })  # fmt: skip
            log.info(
                "FID %.3f at step %d (%s, %d samples)", fid, step, self.extractor.name, self.num
            )
            self.metrics.observe_fid(fid, self.extractor.name, images_seen)
            self.history.sync()
        return True

    @property
    def records(self) -> list[dict]:
        return self.history.rows
