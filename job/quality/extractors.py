"""The FID feature extractors: InceptionV3's pool features, or a TorchScript file (`gan-job
features`) with, where it exports one, the classifier head that label accuracy needs."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from job.infra.errors import FIDError

log = logging.getLogger(__name__)

INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"  # torchvision's ImageNet InceptionV3


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


Classifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images, features) -> logits


@dataclass
class Extractor:
    model: nn.Module  # takes N x 3 x H x W in [0, 1]
    dim: int
    name: str  # recorded with every FID value
    identity: str  # changes when the weights change; keys the real-statistics cache
    classifier: Classifier | None = (
        None  # the head of a `gan-job features` file, for label accuracy
    )
    num_classes: int = 0  # the classifier's
    no_classifier: str = "it has no classifier head"  # why classifier is None

    def label_accuracy_problem(self, num_classes: int) -> str | None:
        """Why label accuracy cannot be measured for a run with num_classes labels, or None."""
        if not num_classes:
            return "the model is unconditional"
        if self.classifier is None:
            return f"the extractor {self.name}: {self.no_classifier}"
        if self.num_classes != num_classes:
            return (
                f"the extractor {self.name} classifies {self.num_classes} classes, "
                f"the run has {num_classes}"
            )
        return None


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
            model.to(device),
            2048,
            "inception_v3",
            f"inception-{_file_digest(weights)}",
            no_classifier="its ImageNet classes are not the dataset's",
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
        with warnings.catch_warnings():  # deprecated, but the way to read TorchScript files
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location=device).eval()
        probe = torch.rand(2, channels, image_size, image_size, device=device)
        with torch.no_grad():  # probe with images of the size FID will feed it
            out = model(probe)
    except Exception as exc:  # noqa: BLE001 - not TorchScript, or the wrong input or output
        raise FIDError(
            f"GAN_FID_FEATURES={path}: not a TorchScript model mapping "
            f"N x {channels} x {image_size} x {image_size} in [0,1] to N x D features ({exc})"
        ) from exc
    if out.ndim != 2:
        raise FIDError(f"GAN_FID_FEATURES={path}: output shape {tuple(out.shape)}, expected N x D")
    name = f"torchscript:{path.stem}"
    classifier, classes, why = _classifier(model, probe, out, channels)
    return Extractor(
        ChannelAdapter(model, channels),
        out.shape[1],
        name,
        f"ts-{_file_digest(path)}",
        classifier,
        classes,
        why,
    )


def _classifier(
    model: torch.jit.ScriptModule, probe: torch.Tensor, features: torch.Tensor, channels: int
) -> tuple[Classifier | None, int, str]:
    """The classifier head of a TorchScript extractor (its exported logits(images), as
    `gan-job features` writes them), its class count, and why there is none.

    When the file's `head` maps the features to the same logits (FeatureNet), the head is applied
    to the features already extracted, instead of running the network a second time.
    """
    if not hasattr(model, "logits"):
        return None, 0, "the TorchScript file exports no logits() (files of `gan-job features` do)"
    try:
        with torch.no_grad():
            logits = model.logits(probe)
    except Exception as exc:  # noqa: BLE001 - a logits() that does not take the images
        return None, 0, f"its logits() failed on {tuple(probe.shape)} images ({exc})"
    if logits.ndim != 2 or logits.shape[0] != probe.shape[0] or logits.shape[1] < 2:
        return None, 0, f"its logits() gave shape {tuple(logits.shape)}, expected N x classes"
    head = getattr(model, "head", None)
    if head is not None:
        try:
            with torch.no_grad():
                same = torch.allclose(head(features), logits, rtol=1e-4, atol=1e-5)
        except Exception:  # noqa: BLE001 - a head of another kind: use logits()
            same = False
        if same:
            return (lambda images, feats: head(feats)), logits.shape[1], ""
    return (lambda images, feats: model.logits(images[:, :channels])), logits.shape[1], ""
