"""Images with transparency are laid over GAN_BACKGROUND wherever images are read (issue 40,
item 1). The test images hide a loud magenta under their fully transparent pixels, as icon and
sprite files do: it must never reach what the model sees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from job.data.datasets import load_dataset
from job.data.folder import background_rgb, to_rgb
from job.data.shards import read_shard
from tests.helpers import REPO

MAGENTA = (255, 0, 255)
GRAY = 96


def hidden_magenta(size: int = 32) -> np.ndarray:
    """RGBA: an opaque gray disc; everything around it transparent, magenta underneath."""
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    rgba = np.zeros((size, size, 4), dtype=np.uint8)
    rgba[..., :3] = MAGENTA
    rgba[disc, :3] = GRAY
    rgba[..., 3] = np.where(disc, 255, 0)
    return rgba


def transparent_images() -> dict[str, Image.Image]:
    """The same picture in every form of transparency PNG has."""
    rgba = Image.fromarray(hidden_magenta(), "RGBA")
    palette = rgba.convert("RGB").quantize(colors=2)  # magenta and gray, one index transparent
    magenta_index = palette.getpalette()[:6].index(255) // 3
    palette.info["transparency"] = magenta_index
    trns = rgba.convert("RGB")
    trns.info["transparency"] = MAGENTA
    la = Image.fromarray(hidden_magenta(), "RGBA").convert("LA")
    return {"rgba": rgba, "palette": palette, "trns": trns, "la": la}


def write_folder(root: Path, per_kind: int = 2) -> Path:
    for kind, img in transparent_images().items():
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_kind):
            img.save(folder / f"{i}.png", **({"transparency": img.info["transparency"]}
                                            if "transparency" in img.info else {}))  # fmt: skip
    opaque = root / "opaque"
    opaque.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 10)).save(opaque / "0.jpg")
    return root


def loud(pixels: torch.Tensor) -> int:
    """Pixels (C x H x W or N x C x H x W, uint8) that show the hidden magenta."""
    r, g, b = (pixels.movedim(-3, 0)[c].int() for c in range(3))
    return int(((r > 180) & (g < 90) & (b > 180)).sum())


@pytest.mark.parametrize("kind", ["rgba", "palette", "trns", "la"])
@pytest.mark.parametrize("background", ["white", "black", "#204060"])
def test_every_kind_of_transparency_is_laid_over_the_background(kind, background):
    img = transparent_images()[kind]
    rgb = np.array(to_rgb(img, background_rgb(background)))
    assert rgb[0, 0].tolist() == list(background_rgb(background))
    assert loud(torch.from_numpy(rgb).permute(2, 0, 1)) == 0
    centre = rgb[16, 16].tolist()
    assert centre == [GRAY] * 3


def test_without_compositing_the_magenta_would_show():
    """The test's own check: PIL's plain RGB conversion keeps what hides under alpha."""
    rgb = np.array(transparent_images()["rgba"].convert("RGB"))
    assert loud(torch.from_numpy(rgb).permute(2, 0, 1)) > 100


def test_a_folder_counts_its_transparent_images_and_its_batches_show_no_magenta(tmp_path):
    root = write_folder(tmp_path / "icons")
    data = load_dataset(f"folder:{root}", tmp_path, 16, background=background_rgb("white"))
    assert data.transparent == 8 and len(data) == 9
    images = torch.stack([data.folder.load(i)[0] for i in range(len(data))])
    assert loud(images) == 0
    assert (images[:, :, 0, 0] == 255).all(dim=1).sum() == 8  # corners: white where transparent


def test_a_background_is_white_black_or_a_hex_colour():
    assert background_rgb("#A0b0C0") == (160, 176, 192)
    for bad in ("pink", "#abc", "#12345g", ""):
        assert background_rgb(bad) is None


def test_bad_gan_background_exits_2_naming_it(tmp_path):
    env = {**os.environ, "GAN_BACKGROUND": "pink", "GAN_ARTIFACT_URI": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "job", "--dry-run"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "GAN_BACKGROUND='pink': expected white, black or a colour #rrggbb" in result.stdout


def test_gan_job_shard_writes_no_magenta_into_the_shards(tmp_path, s3, s3_bucket):
    root = write_folder(tmp_path / "icons")
    env = {**os.environ, **s3.env(), "GAN_DATA_DIR": str(tmp_path / "data")}
    dest = f"s3://{s3_bucket}/icons"
    result = subprocess.run(
        [sys.executable, "-m", "job", "shard", f"folder:{root}", dest, "--image-size", "16",
         "--background", "black"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    client = s3.client()
    images = []
    for obj in client.list_objects_v2(Bucket=s3_bucket, Prefix="icons/")["Contents"]:
        if obj["Key"].endswith(".tar"):
            path = tmp_path / Path(obj["Key"]).name
            client.download_file(s3_bucket, obj["Key"], str(path))
            images += [image for image, _ in read_shard(path, 3)]
    assert len(images) == 9
    assert loud(torch.stack(images)) == 0
    assert sum(int((i[:, 0, 0] == 0).all()) for i in images) == 8  # corners: black


def test_the_start_up_block_says_how_many_images_had_transparency_and_over_what(tmp_path):
    root = write_folder(tmp_path / "icons")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GAN_")},
        "GAN_DATASET": f"folder:{root}",
        "GAN_IMAGE_SIZE": "32",
        "GAN_BACKGROUND": "#102030",
        "GAN_ARTIFACT_URI": str(tmp_path / "runs"),
        "GAN_FID_FEATURES": "none",
        "GAN_METRICS_PORT": "0",
    }
    result = subprocess.run([sys.executable, "-m", "job", "--dry-run"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "9 images, 5 classes, 3x32x32, 8 with transparency laid over #102030" in result.stdout
