import io
import json

import numpy as np
import pytest
import torch
import torchvision

from job.gan.models import Arch, build_generator
from job.gan.sampling import fixed_inputs, generate
from job.infra.errors import FIDError
from job.quality.evaluator import compute_fid
from job.quality.extractors import Extractor, InceptionFeatures, load_extractor
from job.quality.reference import real_reference, real_statistics, stats_key
from tests.helpers import job_env, run_job, write_extractor, write_idx

CPU = torch.device("cpu")


def test_inception_weights_file_loads_offline_and_gives_2048_features(tmp_path):
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    weights = str(tmp_path / "inception.pth")
    extractor = load_extractor("inception", 3, 32, CPU, inception_weights=weights)
    assert isinstance(extractor.model, InceptionFeatures) and extractor.dim == 2048
    assert extractor.model(torch.rand(2, 3, 32, 32)).shape == (2, 2048)


def test_torchscript_extractor_gives_repeatable_real_stats_and_a_positive_fid(tmp_path):
    path = write_extractor(tmp_path / "f.pt", channels=1)
    extractor = load_extractor(str(path), 1, 28, CPU)
    assert extractor.dim == 32 and extractor.name == "torchscript:f"
    arch = Arch("mlp", 1, 28, 8, 8, 0)
    g = build_generator(arch)
    images = (torch.rand(200, 1, 28, 28) * 255).to(torch.uint8)
    state = real_statistics(extractor, images, CPU)
    fid_g = compute_fid(extractor, state, g, 8, 0, 200, seed=0, device=CPU)
    same = Extractor(extractor.model, 32, "x", "x")
    twin = real_statistics(same, images, CPU)
    assert all(torch.equal(twin[k], state[k]) for k in state)
    assert fid_g > 0.01


def test_fid_from_cached_real_statistics_equals_torcheval_fed_both_sets_at_once(tmp_path):
    """The cache holds torcheval's own state (its public state_dict): if torcheval changes what
    that state means, the two numbers part."""
    from torcheval.metrics import FrechetInceptionDistance

    extractor = load_extractor(str(write_extractor(tmp_path / "f.pt", channels=1)), 1, 28, CPU)
    g = build_generator(Arch("mlp", 1, 28, 8, 8, 0))
    real = (torch.rand(150, 1, 28, 28) * 255).to(torch.uint8)
    cached = compute_fid(extractor, real_statistics(extractor, real, CPU), g, 8, 0, 120, 3, CPU)

    direct = FrechetInceptionDistance(model=extractor.model, feature_dim=extractor.dim)
    direct.update(real.float().div(255).expand(-1, 3, -1, -1), is_real=True)
    z, _ = fixed_inputs(8, 120, 0, 3, CPU)
    direct.update(generate(g, z, None).expand(-1, 3, -1, -1), is_real=False)
    assert cached == pytest.approx(float(direct.compute()), rel=1e-3)  # summed in batches


class Offset(torch.nn.Module):
    """Features far from 0, as many extractors' are: where float32 sums lose the covariance."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + 100.0


def _frechet_float64(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).astype(complex)).real.sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * root)


def test_fid_matches_a_float64_reference_for_features_far_from_zero(tmp_path):
    tiny = load_extractor(str(write_extractor(tmp_path / "f.pt", channels=1)), 1, 28, CPU)
    extractor = Extractor(Offset(tiny.model), tiny.dim, "offset", "offset")
    g = build_generator(Arch("mlp", 1, 28, 8, 8, 0))
    real = (torch.rand(300, 1, 28, 28) * 255).to(torch.uint8)
    fid = compute_fid(extractor, real_statistics(extractor, real, CPU), g, 8, 0, 300, 3, CPU)

    z, _ = fixed_inputs(8, 300, 0, 3, CPU)
    with torch.no_grad():
        a = extractor.model(real.float().div(255).expand(-1, 3, -1, -1)).double().numpy()
        b = extractor.model(generate(g, z, None).expand(-1, 3, -1, -1)).double().numpy()
    assert fid == pytest.approx(_frechet_float64(a, b), rel=1e-6, abs=1e-6)


def test_fid_stops_within_a_batch_when_asked(tmp_path):
    extractor = load_extractor(str(write_extractor(tmp_path / "f.pt", channels=1)), 1, 28, CPU)
    g = build_generator(Arch("mlp", 1, 28, 8, 8, 0))
    real = real_statistics(extractor, (torch.rand(20, 1, 28, 28) * 255).to(torch.uint8), CPU)
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 2

    assert compute_fid(extractor, real, g, 8, 0, 1000, 0, CPU, batch=10, stop=stop) is None
    assert len(asked) == 3


def test_a_file_that_is_not_torchscript_is_a_clear_fid_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(FIDError, match="bad.pt"):
        load_extractor(str(bad), 1, 28, CPU)


def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unusable_cache(kind: str, extractor: Extractor) -> tuple[bytes, bytes]:
    """A damaged or unfitting cache entry: the bytes of its statistics and of its features."""
    real = real_reference(extractor, (torch.rand(40, 1, 28, 28) * 255).to(torch.uint8), CPU)
    state, features = _saved(real.state), _saved(real.features)
    if kind == "garbage":
        return b"\x00not a torch file" * 50, b"neither is this"
    if kind == "truncated":
        return state[: len(state) // 2], features
    if kind == "missing a key":
        return _saved({k: v for k, v in real.state.items() if k != "real_cov_sum"}), features
    return state, _saved(real.features[:, :8])  # another extractor's width


@pytest.mark.parametrize("kind", ["garbage", "truncated", "missing a key", "wrong shape"])
def test_an_unusable_cached_real_statistics_file_is_recomputed_and_replaced(tmp_path, kind):
    write_idx(tmp_path / "data", n=64)
    path = write_extractor(tmp_path / "features.pt", channels=1)
    extractor = load_extractor(str(path), 1, 28, CPU)
    key = stats_key("mnist", 28, extractor, 32, seed=0)  # what the job below uses
    cache = tmp_path / "runs/fid-stats"
    cache.mkdir(parents=True)
    stats, features = _unusable_cache(kind, extractor)
    (cache / f"{key}.pt").write_bytes(stats)
    (cache / f"{key}-features.pt").write_bytes(features)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=2, GAN_FID_FEATURES=path,
                  GAN_FID_NUM_SAMPLES=32, GAN_FID_EVERY=2)  # fmt: skip
    result = run_job(env)
    assert result.returncode == 0, result.stdout + result.stderr
    warning = [line for line in result.stdout.splitlines() if " WARNING " in line]
    assert any(f"{key}.pt" in line and "computing them again" in line for line in warning)
    rows = [json.loads(r) for r in (tmp_path / "runs/mnist-dcgan/eval.jsonl").open()]
    assert [r["step"] for r in rows] == [2] and rows[0]["fid"] > 0
    assert sorted(p.name for p in cache.iterdir()) == [f"{key}-features.pt", f"{key}.pt"]
    assert torch.load(cache / f"{key}-features.pt", weights_only=True).shape == (32, 32)
