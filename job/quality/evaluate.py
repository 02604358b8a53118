"""Sample grids and the evaluation of a generator on one set of features: FID (torcheval's
FrechetInceptionDistance with a pluggable feature extractor), KID, precision and recall, and, for
conditional models, label accuracy from the extractor's classifier head."""

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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

with warnings.catch_warnings():  # torcheval still calls the deprecated torch.jit.script at import
    warnings.simplefilter("ignore", FutureWarning)
    from torcheval.metrics import FrechetInceptionDistance, MulticlassAccuracy

import torch.distributed as dist

from job.infra import distributed, watchdog
from job.infra.errors import FIDError
from job.infra.metrics import Metrics
from job.infra.storage import JsonlLog, Store

if TYPE_CHECKING:
    from job.run.best import BestGenerator

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


# ---------------------------------------------------------------- metrics on features

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_NEIGHBOURS = 3


def kid(
    real: torch.Tensor,
    fake: torch.Tensor,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> dict[str, float | int]:
    """Kernel Inception Distance (Bińkowski et al., "Demystifying MMD GANs", ICLR 2018): the
    unbiased estimate of the squared MMD between real and generated features under the cubic
    polynomial kernel k(x, y) = (x.y / d + 1)^3, on `subsets` random subsets of m samples of
    each, averaged; kid_std is the standard deviation of the subset estimates.

    The estimator leaves out the k(x_i, x_i) terms, so its expectation is the true MMD^2 at any
    m (0 for the same distribution, where it can come out slightly negative); FID's plug-in
    estimate is biased upward by an amount that shrinks with N. m is at most half the smaller
    set, so that the subsets differ and their spread means something.
    """
    n = min(len(real), len(fake))
    m = min(subset_size, n // 2)
    if m < 2:
        raise ValueError(
            f"KID needs at least 4 samples of each set, got {len(real)} and {len(fake)}"
        )
    g = torch.Generator().manual_seed(seed)
    d = real.shape[1]
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=g)[:m].to(real.device)].float()
        y = fake[torch.randperm(len(fake), generator=g)[:m].to(fake.device)].float()
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        same = (kxx.sum(dtype=torch.float64) - kxx.diagonal().sum(dtype=torch.float64)) + (
            kyy.sum(dtype=torch.float64) - kyy.diagonal().sum(dtype=torch.float64)
        )
        values.append(same / (m * (m - 1)) - 2 * kxy.sum(dtype=torch.float64) / (m * m))
    v = torch.stack(values)
    return {
        "kid": float(v.mean()),
        "kid_std": float(v.std()) if subsets > 1 else 0.0,
        "kid_subset_size": m,
        "kid_subsets": subsets,
    }


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, k: int = PR_NEIGHBOURS, batch: int = 1000
) -> dict[str, float | int]:
    """Improved precision and recall (Kynkäänniemi et al., "Improved Precision and Recall Metric
    for Assessing Generative Models", NeurIPS 2019).

    Each set's manifold is the union of balls around its samples, each ball reaching the
    sample's k-th nearest neighbour in its own set. Precision: the share of generated samples
    inside the real manifold (are the samples realistic?); recall: the share of real samples
    inside the generated manifold (is all of the data covered?). Distances are computed batch
    by batch rows, so memory stays batch x N.
    """
    real, fake = real.float(), fake.float()
    real_radii, fake_radii = _knn_radii(real, k, batch), _knn_radii(fake, k, batch)
    return {
        "precision": float(_inside(fake, real, real_radii, batch).float().mean()),
        "recall": float(_inside(real, fake, fake_radii, batch).float().mean()),
        "pr_k": k,
    }


def _knn_radii(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    # the (k+1)-th smallest distance: each sample is its own nearest neighbour
    return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(batch)])


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch: int):
    return torch.cat([(torch.cdist(c, centres) <= radii).any(dim=1) for c in points.split(batch)])


def label_accuracy(
    predicted: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> dict[str, float | list[float]]:
    """Of the samples generated for label k, the share the classifier puts in class k, per
    class, and its mean over the classes (torcheval's MulticlassAccuracy, average=None)."""
    metric = MulticlassAccuracy(average=None, num_classes=num_classes)
    with warnings.catch_warnings():  # torcheval 0.0.7 calls a deprecated form of scatter_
        warnings.simplefilter("ignore", UserWarning)
        metric.update(predicted, labels)
        per_class = metric.compute()
    return {
        "label_accuracy": round(float(per_class.nanmean()), 4),
        "label_accuracy_per_class": [round(float(v), 4) for v in per_class],
    }


# ---------------------------------------------------------------- FID and the rest


def fid_num_samples(setting: int | None, device: torch.device) -> int:
    """GAN_FID_NUM_SAMPLES, or its default: 10,000 on a GPU, 500 on a CPU."""
    if setting:
        return setting
    return 10_000 if device.type == "cuda" else 500


class FeatureTap(nn.Module):
    """The extractor as torcheval's FID sees it, keeping the features it computes: the same
    features then feed KID, precision/recall and the classifier, extracted once."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.kept: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kept = self.model(x)
        return self.kept.double()


_SUM_STATES = ("real_sum", "real_cov_sum", "fake_sum", "fake_cov_sum")
FID_SUMS = "float64"  # recorded with every FID; records without it had float32 sums (see _metric)


def _metric(tap: FeatureTap, dim: int, device: torch.device) -> FrechetInceptionDistance:
    """torcheval's FID with its sums, and so the Frechet distance, in float64. In float32 the
    covariance (the sum of products less n times the product of the means) loses most of a
    point of FID at 10,000 images: two disjoint sets of real Fashion-MNIST images scored -0.66
    with the offline extractor, 0.26 in float64. torcheval has no dtype option: the states
    are registered again, in float64."""
    metric = FrechetInceptionDistance(model=tap, feature_dim=dim, device=device)
    for name in _SUM_STATES:
        metric._add_state(name, getattr(metric, name).double())
    return metric


def _three_channels(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


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
    metric = _metric(tap, extractor.dim, device)
    features = []
    for chunk in images.split(batch):
        each_batch()
        metric.update(_three_channels(chunk.to(device).float() / 255), is_real=True)
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
    metric = _metric(tap, extractor.dim, device)
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
            images = _three_channels(generate(g, zb, lb))
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
    if world_size > 1:
        from torcheval.metrics.toolkit import sync_and_compute

        result: dict = {"fid": float(sync_and_compute(fakes.metric))}
    else:
        result = {"fid": float(fakes.metric.compute())}
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


def round_metrics(values: dict) -> dict:
    """A measure() result as it is recorded: floats to 4 significant places past the point
    (KID to 6, it is small)."""
    out = {}
    for k, v in values.items():
        if isinstance(v, float):
            v = round(v, 6 if k.startswith("kid") else 4)
        out[k] = v
    return out


def _cached_reference(stats: bytes, features: bytes, dim: int) -> RealReference:
    """The reference cached as these two files; ValueError if they hold none of dim features."""
    try:
        state, feats = (torch.load(io.BytesIO(b), weights_only=True) for b in (stats, features))
    except Exception as e:  # a damaged file fails in pickle, zip or torch, in many ways
        raise ValueError(f"unreadable as a torch file: {type(e).__name__}") from e
    if problem := _state_problem(state, dim) or _features_problem(feats, state, dim):
        raise ValueError(problem)
    return RealReference(state, feats)


def _state_problem(state: object, dim: int) -> str | None:
    """Why state is not torcheval's FID state (float64 sums, see _metric) of dim features."""
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
        if name in _SUM_STATES and value.dtype != torch.float64:
            return f"{name} is {value.dtype}, not float64"
    return None if int(state["num_real_images"]) > 0 else "no real images in it"


def _features_problem(features: object, state: dict, dim: int) -> str | None:
    num = int(state["num_real_images"])
    if isinstance(features, torch.Tensor) and tuple(features.shape) == (num, dim):
        return None
    return f"the features are not a {num} x {dim} tensor (real images x features)"


# ---------------------------------------------------------------- the run's FID schedule


class FidEvaluator:
    """FID, KID, precision/recall and (conditional runs) label accuracy of the EMA generator
    every `every` steps and once more at the end of a run, against real statistics and features
    computed once per dataset and extractor and cached in the store; each result is a row of
    eval.jsonl and the gan_fid, gan_kid, ... gauges.

    Every rank calls it: generation and feature extraction are split over ranks. The
    checkpointer saves and restores its history (the rows of eval.jsonl).

    cache, cache_key: where the real reference is cached (stats_key); real_images(n): n real
    uint8 images, called only when the cache has no usable reference.
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
        best: BestGenerator | None = None,
    ):
        self.extractor, self.history, self.metrics, self.world = extractor, history, metrics, world
        self.every, self.num, self.seed = every, num, seed
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.cache, self.cache_key, self.real_images = cache, cache_key, real_images
        self.best = best  # judges each result: best/generator.pt, early stopping
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
            return _cached_reference(
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
    ) -> bool:
        """One evaluation; False when a stop request cut it short (then nothing is recorded)."""
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
            return False
        found, self.evaluated = score(fakes, self.real, **sampling), step
        if w.is_main:
            self._record(step, images_seen, found, time.monotonic() - t0, g_ema)
        return True

    def _record(
        self, step: int, images_seen: int, found: dict, seconds: float, g_ema: nn.Module
    ) -> None:
        """Rank 0: a row of eval.jsonl (with the best step so far), the log line, the gauges."""
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
        }
        log.info("%s at step %d (%s)", summary(values), step, self.extractor.name)
        if self.best is not None:
            row |= self.best.judge(step, row, g_ema)
        self.history.append(row)
        self.metrics.observe_fid(found["fid"], self.extractor.name, images_seen)
        self.metrics.observe_quality(values, self.extractor.name)
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


def summary(values: dict) -> str:
    """One line: FID, KID +- std, precision, recall, label accuracy (those present)."""
    parts = [f"FID {values['fid']:.3f}"]
    if "kid" in values:
        parts.append(f"KID {values['kid']:.5f} ± {values['kid_std']:.5f}")
        parts.append(f"precision {values['precision']:.3f} recall {values['recall']:.3f}")
    if "label_accuracy" in values:
        parts.append(f"label accuracy {values['label_accuracy']:.3f}")
    return ", ".join(parts)


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
