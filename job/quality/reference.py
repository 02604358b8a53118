"""The real reference every evaluation compares with: torcheval's FID state after the real
images and their features, computed in one pass of the extractor, its cache key, and the checks
that a cached reference is usable."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import torch

from job.quality.extractors import Extractor
from job.quality.scores import SUM_STATES, FeatureTap, fid_metric, three_channels

REFERENCE_BATCH = 100  # real images per pass of the extractor


@dataclass
class RealReference:
    """What every evaluation compares with: torcheval's FID state after the real images, and
    their features (float16, N x D) for KID and precision/recall; None where not kept."""

    state: dict[str, torch.Tensor]
    features: torch.Tensor | None = None

    @property
    def num(self) -> int:
        return int(self.state["num_real_images"])


def real_reference(
    extractor: Extractor,
    images: torch.Tensor,
    device: torch.device,
    batch: int = REFERENCE_BATCH,
    each_batch: Callable[[], object] = lambda: None,
) -> RealReference:
    """FID state and features of real uint8 images, in one pass of the extractor; each_batch()
    is called before every batch."""
    tap = FeatureTap(extractor.model)
    metric = fid_metric(tap, extractor.dim, device)
    features = []
    for chunk in images.split(batch):
        each_batch()
        metric.update(three_channels(chunk.to(device).float() / 255), is_real=True)
        features.append(tap.kept.cpu())
    state = {k: v.detach().cpu() for k, v in metric.state_dict().items()}
    feats = torch.cat(features) if features else torch.empty(0, extractor.dim)
    return RealReference(state, feats.to(torch.float16))


def real_statistics(
    extractor: Extractor, images: torch.Tensor, device: torch.device, batch: int = REFERENCE_BATCH
) -> dict[str, torch.Tensor]:
    """The FID state after only real uint8 images."""
    return real_reference(extractor, images, device, batch).state


def stats_key(dataset: str, image_size: int, extractor: Extractor, num: int, seed: int) -> str:
    text = f"v3|{dataset}|{image_size}|{extractor.identity}|{num}|{seed}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cached_reference(stats: bytes, features: bytes, dim: int) -> RealReference:
    """The reference cached as these two files; ValueError if they hold none of dim features."""
    try:
        state, feats = (torch.load(io.BytesIO(b), weights_only=True) for b in (stats, features))
    except Exception as e:  # a damaged file fails in pickle, zip or torch, in many ways
        raise ValueError(f"unreadable as a torch file: {type(e).__name__}") from e
    if problem := _state_problem(state, dim) or _features_problem(feats, state, dim):
        raise ValueError(problem)
    return RealReference(state, feats)


def _state_problem(state: object, dim: int) -> str | None:
    """Why state is not torcheval's FID state (float64 sums, see fid_metric) of dim features."""
    shapes = {
        "real_sum": (dim,),
        "real_cov_sum": (dim, dim),
        "fake_sum": (dim,),
        "fake_cov_sum": (dim, dim),
        "num_real_images": (),
        "num_fake_images": (),
    }
    if not isinstance(state, dict) or set(state) != set(shapes):
        return f"not a FID state: expected the tensors {', '.join(shapes)}"
    for name, shape in shapes.items():
        value = state[name]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            return f"{name} is not a tensor of shape {shape} ({dim} features)"
        if name in SUM_STATES and value.dtype != torch.float64:
            return f"{name} is {value.dtype}, not float64"
    return None if int(state["num_real_images"]) > 0 else "no real images in it"


def _features_problem(features: object, state: dict, dim: int) -> str | None:
    num = int(state["num_real_images"])
    if isinstance(features, torch.Tensor) and tuple(features.shape) == (num, dim):
        return None
    return f"the features are not a {num} x {dim} tensor (real images x features)"
