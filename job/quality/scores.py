"""The scores of generated images' features against real ones: KID, precision and recall,
label accuracy, torcheval's FID metric (its sums in float64) fed through a FeatureTap, and how a
result is rounded and summed up in one line."""

from __future__ import annotations

import warnings

import torch
from torch import nn

with warnings.catch_warnings():  # torcheval still calls the deprecated torch.jit.script at import
    warnings.simplefilter("ignore", FutureWarning)
    from torcheval.metrics import FrechetInceptionDistance, MulticlassAccuracy

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


SUM_STATES = ("real_sum", "real_cov_sum", "fake_sum", "fake_cov_sum")
# recorded with every FID; records without it had float32 sums (see fid_metric)
FID_SUMS = "float64"


def fid_metric(tap: FeatureTap, dim: int, device: torch.device) -> FrechetInceptionDistance:
    """torcheval's FID with its sums, and so the Frechet distance, in float64. In float32 the
    covariance (the sum of products less n times the product of the means) loses most of a
    point of FID at 10,000 images: two disjoint sets of real Fashion-MNIST images scored -0.66
    with the offline extractor, 0.26 in float64. torcheval has no dtype option: the states
    are registered again, in float64."""
    metric = FrechetInceptionDistance(model=tap, feature_dim=dim, device=device)
    for name in SUM_STATES:
        metric._add_state(name, getattr(metric, name).double())
    return metric


def three_channels(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def round_metrics(values: dict) -> dict:
    """A measure() result as it is recorded: floats to 4 significant places past the point
    (KID to 6, it is small)."""
    out = {}
    for k, v in values.items():
        if isinstance(v, float):
            v = round(v, 6 if k.startswith("kid") else 4)
        out[k] = v
    return out


def summary(values: dict) -> str:
    """One line: FID, KID +- std, precision, recall, label accuracy (those present)."""
    parts = [f"FID {values['fid']:.3f}"]
    if "kid" in values:
        parts.append(f"KID {values['kid']:.5f} ± {values['kid_std']:.5f}")
        parts.append(f"precision {values['precision']:.3f} recall {values['recall']:.3f}")
    if "label_accuracy" in values:
        parts.append(f"label accuracy {values['label_accuracy']:.3f}")
    return ", ".join(parts)
