"""Sample grids and FID (torcheval's FrechetInceptionDistance with a pluggable feature extractor)."""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

with warnings.catch_warnings():  # torcheval still calls the deprecated torch.jit.script at import
    warnings.simplefilter("ignore", FutureWarning)
    from torcheval.metrics import FrechetInceptionDistance

from job.errors import FIDError
from job.settings import Settings

log = logging.getLogger(__name__)

INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"  # torchvision's ImageNet InceptionV3
REAL_STATE = ("real_sum", "real_cov_sum", "num_real_images")


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


def _inception_weights(settings: Settings) -> Path:
    if settings.fid_inception_weights:
        return Path(settings.fid_inception_weights)
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_extractor(settings: Settings, channels: int, device: torch.device) -> Extractor | None:
    """The FID feature extractor, or None when FID is off.

    Asked for explicitly and unavailable: FIDError before training. Left at the default
    (inception) and unavailable, as offline without baked-in weights: a warning and no FID.
    """
    choice = settings.fid_features
    if choice == "none":
        return None
    explicit = "fid_features" in settings.model_fields_set or settings.fid_inception_weights
    if choice == "inception":
        weights = _inception_weights(settings)
        if not weights.is_file():
            msg = (
                f"InceptionV3 weights not found at {weights}: put {INCEPTION_FILE} in "
                f"$TORCH_HOME/hub/checkpoints, set GAN_FID_INCEPTION_WEIGHTS, or set "
                f"GAN_FID_FEATURES to a TorchScript extractor (`gan-job features`) or none"
            )
            if explicit:
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
    return _load_torchscript(Path(choice), channels, settings.resolved_image_size, device)


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


def fid_num_samples(settings: Settings, device: torch.device) -> int:
    if settings.fid_num_samples:
        return settings.fid_num_samples
    return 10_000 if device.type == "cuda" else 500


def _metric(extractor: Extractor, device: torch.device) -> FrechetInceptionDistance:
    return FrechetInceptionDistance(model=extractor.model, feature_dim=extractor.dim, device=device)


def _three_channels(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def real_statistics(
    extractor: Extractor, images: torch.Tensor, device: torch.device, batch: int = 100
) -> dict[str, torch.Tensor]:
    """torcheval's running sums for real uint8 images, to be cached and reused at every FID."""
    metric = _metric(extractor, device)
    for chunk in images.split(batch):
        metric.update(_three_channels(chunk.to(device).float() / 255), is_real=True)
    return {k: getattr(metric, k).detach().cpu() for k in REAL_STATE}


def stats_key(dataset: str, image_size: int, extractor: Extractor, num: int, seed: int) -> str:
    text = f"{dataset}|{image_size}|{extractor.identity}|{num}|{seed}"
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
) -> float:
    """FID of num generated images against the cached real statistics.

    The noise for all num images is drawn from one seeded generator and each rank takes its
    stride of it, so FID over W ranks equals FID over one process for the same samples.
    """
    metric = _metric(extractor, device)
    z, labels = fixed_inputs(latent_dim, num, num_classes, seed, torch.device("cpu"))
    z = z[rank::world_size]
    labels = labels[rank::world_size] if labels is not None else None
    for start in range(0, len(z), batch):
        zb = z[start : start + batch].to(device)
        lb = labels[start : start + batch].to(device) if labels is not None else None
        metric.update(_three_channels(generate(g, zb, lb)), is_real=False)
    if world_size > 1:
        from torcheval.metrics.toolkit import sync_and_compute

        metric.real_sum = metric.real_sum.zero_()
        metric.real_cov_sum = metric.real_cov_sum.zero_()
        metric.num_real_images = metric.num_real_images.zero_()
        if rank == 0:
            _load_real(metric, real_state, device)
        return float(sync_and_compute(metric))
    _load_real(metric, real_state, device)
    return float(metric.compute())


def _load_real(metric: FrechetInceptionDistance, state: dict, device: torch.device) -> None:
    for k in REAL_STATE:
        setattr(metric, k, state[k].to(device))
