import pytest
import torch
import torchvision

from job.errors import FIDError
from job.evaluate import (
    Extractor,
    InceptionFeatures,
    compute_fid,
    load_extractor,
    real_statistics,
)
from job.models import Arch, build_generator
from job.settings import load_settings
from tests.helpers import write_extractor

CPU = torch.device("cpu")


def test_inception_weights_file_loads_offline_and_gives_2048_features(tmp_path):
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    settings = load_settings({"GAN_FID_INCEPTION_WEIGHTS": str(tmp_path / "inception.pth")})
    extractor = load_extractor(settings, channels=3, device=CPU)
    assert isinstance(extractor.model, InceptionFeatures) and extractor.dim == 2048
    assert extractor.model(torch.rand(2, 3, 32, 32)).shape == (2, 2048)


def test_torchscript_extractor_gives_repeatable_real_stats_and_a_positive_fid(tmp_path):
    path = write_extractor(tmp_path / "f.pt", channels=1)
    extractor = load_extractor(load_settings({"GAN_FID_FEATURES": str(path)}), 1, CPU)
    assert extractor.dim == 32 and extractor.name == "torchscript:f"
    arch = Arch("mlp", 1, 28, 8, 8, 0)
    g = build_generator(arch)
    images = (torch.rand(200, 1, 28, 28) * 255).to(torch.uint8)
    state = real_statistics(extractor, images, CPU)
    fid_g = compute_fid(extractor, state, g, 8, 0, 200, seed=0, device=CPU)
    same = Extractor(extractor.model, 32, "x", "x")
    twin = real_statistics(same, images, CPU)
    assert torch.equal(twin["real_sum"], state["real_sum"])
    assert fid_g > 0.01


def test_a_file_that_is_not_torchscript_is_a_clear_fid_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(FIDError, match="bad.pt"):
        load_extractor(load_settings({"GAN_FID_FEATURES": str(bad)}), 1, CPU)
