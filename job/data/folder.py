"""Image folders as a dataset: every image under a folder, the first-level subfolder its
class, decoded to 8-bit RGB and resized by DataLoader workers; files that are no image are
skipped (and counted) or named in one DataError. Images with transparency (RGBA, LA, a palette
or a tRNS chunk with a transparent colour) are laid over a background colour first: dropping
alpha would train on whatever colour each file happens to store under its transparent pixels."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from job.infra.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)
NAMED_BACKGROUNDS: dict[str, RGB] = {"white": WHITE, "black": (0, 0, 0)}
_HEX = re.compile(r"^#([0-9a-fA-F]{6})$")


def background_rgb(value: str) -> RGB | None:
    """The colour GAN_BACKGROUND names (white, black or #rrggbb), or None when it names none."""
    if value.lower() in NAMED_BACKGROUNDS:
        return NAMED_BACKGROUNDS[value.lower()]
    match = _HEX.match(value)
    if match is None:
        return None
    code = int(match.group(1), 16)
    return (code >> 16, (code >> 8) & 0xFF, code & 0xFF)


class FolderDataset(Dataset):
    """Every image under a folder, recursively; the first-level subfolder is the class.

    Files that are empty or not images at all are found by their header when the folder is
    indexed, so they never count as images; files that fail only when decoded (truncated) are
    found at their first draw. Either kind is skipped, warned about and counted once per file
    (skip_bad), or named in a one-line DataError raised in the main process.
    """

    def __init__(self, root: Path, image_size: int, skip_bad: bool = True, background: RGB = WHITE):
        if not root.is_dir():
            raise DataError(f"GAN_DATASET=folder:{root}: no such folder")
        self.root, self.image_size, self.skip_bad = root, image_size, skip_bad
        self.background = background
        files = sorted(
            p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        with ThreadPoolExecutor(8) as pool:  # one small read per file; I/O-bound
            headers = dict(zip(files, pool.map(_read_header, files), strict=True))
        bad = {p: why for p, (why, _) in headers.items() if why}
        if bad:
            path, why = next(iter(bad.items()))
            if not skip_bad:
                raise DataError(
                    f"{path}: {why} ({len(bad)} such files in {root}); "
                    f"set GAN_BAD_IMAGES=skip to train on the rest"
                )
            log.warning(
                "skipping %d unreadable image files in %s (empty or not images), e.g. %s: %s",
                len(bad),
                root,
                path,
                why,
            )
        self.skipped_at_start = len(bad)
        self.files = [p for p in files if p not in bad]
        self.transparent = sum(1 for p in self.files if headers[p][1])  # laid over background
        if not self.files:
            raise DataError(
                f"GAN_DATASET=folder:{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        self.unreadable: dict[int, str] = {}  # main process: files that failed on a draw
        classes = sorted({p.relative_to(root).parts[0] for p in self.files if p.parent != root})
        index = {name: i for i, name in enumerate(classes)}
        self.classes = classes
        self.labels = torch.tensor(
            [index.get(p.relative_to(root).parts[0], 0) for p in self.files], dtype=torch.int64
        )

    def __len__(self) -> int:
        return len(self.files)

    @property
    def skipped(self) -> int:
        """Files skipped so far: at indexing, and unreadable on a draw."""
        return self.skipped_at_start + len(self.unreadable)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, list[tuple[int, str]]]:
        """(image, label, the unreadable files met as (index, why)). When skipping, an
        unreadable file is replaced by the next readable one, so batches keep their size;
        otherwise image is None and note() raises in the main process (raised in a DataLoader
        worker, the error would arrive as a worker traceback)."""
        met = []
        for offset in range(len(self.files)):
            j = (i + offset) % len(self.files)
            try:
                with Image.open(self.files[j]) as img:
                    img = _resize_center_crop(to_rgb(img, self.background), self.image_size)
            except UNREADABLE as exc:
                met.append((j, f"unreadable image ({exc})"))
                if not self.skip_bad:
                    break
                continue
            array = np.asarray(img, dtype=np.uint8).copy()
            return torch.from_numpy(array).permute(2, 0, 1), int(self.labels[j]), met
        return None, 0, met

    def note(self, met: list[tuple[int, str]]) -> None:
        """In the main process, what __getitem__ met: a warning the first time a file fails,
        or, not skipping, a DataError naming it."""
        for j, why in met:
            if j in self.unreadable:
                continue
            self.unreadable[j] = why
            if not self.skip_bad:
                raise DataError(
                    f"{self.files[j]}: {why}; set GAN_BAD_IMAGES=skip to skip such files"
                )
            log.warning("skipping %s: %s (warned once)", self.files[j], why)

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        """Image i (or the next readable one) and its label, in the main process."""
        image, label, met = self[i]
        self.note(met)
        if image is None:
            raise DataError(f"{self.root}: no readable image")
        return image, label


def folder_batches(
    folder: FolderDataset, batches: list[list[int]], num_workers: int, pin_memory: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) of each batch of indices, decoded by DataLoader workers; the
    unreadable files they meet are reported here, in the main process (FolderDataset.note)."""
    loader = DataLoader(
        folder,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    for images, labels, met in loader:
        folder.note(met)
        if images is None:
            raise DataError(f"{folder.root}: no readable image")
        yield images, labels


def _collate(items: list) -> tuple[torch.Tensor | None, torch.Tensor | None, list]:
    images, labels, met = zip(*items, strict=True)
    met = [m for found in met for m in found]
    if any(image is None for image in images):
        return None, None, met
    return torch.stack(images), torch.tensor(labels), met


# what PIL raises for a file that is no image it can decode; DecompressionBombError: more than
# twice Image.MAX_IMAGE_PIXELS (a 30,000 x 30,000 PNG), refused before any memory is taken
UNREADABLE = (
    OSError,
    UnidentifiedImageError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)


def _read_header(path: Path) -> tuple[str | None, bool]:
    """Why a file is no image (None if it is one) and whether it has transparency, from its
    size and header alone (no decoding)."""
    try:
        if path.stat().st_size == 0:
            return "empty image file", False
        with Image.open(path) as img:
            return None, has_transparency(img)
    except UNREADABLE as exc:
        return f"unreadable image ({exc})", False


def has_transparency(img: Image.Image) -> bool:
    """An alpha channel (RGBA, LA, PA...) or a transparent colour or palette index (tRNS)."""
    return "A" in img.getbands() or "transparency" in img.info


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def to_rgb(img: Image.Image, background: RGB = WHITE) -> Image.Image:
    """img as 8-bit RGB, scaled from its own range: 16-bit integers by their bit depth (value
    >> 8), floats from [0, 1] (values outside clipped); transparency laid over background;
    other modes as PIL converts them."""
    if has_transparency(img):
        over = Image.new("RGBA", img.size, (*background, 255))
        return Image.alpha_composite(over, img.convert("RGBA")).convert("RGB")
    if img.mode in SIXTEEN_BIT_MODES:
        img = Image.fromarray((np.clip(np.asarray(img), 0, 65535) >> 8).astype(np.uint8))
    elif img.mode == "F":
        unit = np.clip(np.nan_to_num(np.asarray(img)), 0, 1)
        img = Image.fromarray(np.round(unit * 255).astype(np.uint8))
    return img.convert("RGB")


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))
