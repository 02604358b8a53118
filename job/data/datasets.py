"""Datasets and the batch source that feeds the training loop.

Small datasets (the MNIST family, CIFAR-10) are held whole as a uint8 tensor on the training
device and batched by indexing; image folders stream through a DataLoader. Both draw batches
from the same deterministic, rank-sharded epoch order, so the data position saved in a
checkpoint resumes exactly, also under another world size.
"""

from __future__ import annotations

import gzip
import logging
import pickle
import struct
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from job.infra.errors import DataError
from job.settings import dataset_kind

log = logging.getLogger(__name__)

IDX_DATASETS = {"mnist": "MNIST", "kmnist": "KMNIST", "fashion-mnist": "FashionMNIST"}
SYSTEM_DIRS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")]}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
IDX_PREFIXES = {"train": "train", "test": "t10k"}  # file name prefixes of the IDX splits
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
NUM_CLASSES = {"mnist": 10, "kmnist": 10, "fashion-mnist": 10, "cifar10": 10}


@dataclass
class ImageData:
    """A training split. images: uint8 N x C x H x W (in memory) or None for folders."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    labels: torch.Tensor  # int64, N
    images: torch.Tensor | None = None
    folder: FolderDataset | None = None
    source: str = ""  # where the files were found
    shards: Any = None  # a shards dataset (job.data.shards.ShardSet): streamed, labels left empty

    def __len__(self) -> int:
        return self.shards.index.count if self.shards is not None else len(self.labels)

    @property
    def classes_found(self) -> int:
        """Distinct labels in the data."""
        if self.shards is not None:
            return self.shards.index.classes
        return len(torch.unique(self.labels))


# ---------------------------------------------------------------- IDX (MNIST family)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not), checking its magic number and its size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc}); the file may be truncated") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (wrong magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"{path}: IDX size mismatch: header says {shape} ({expected} bytes), file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def idx_files(split: str = "train") -> tuple[str, str]:
    """The image and label file names (without .gz) of an IDX split: train or test (t10k)."""
    prefix = IDX_PREFIXES[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_idx(name: str, roots: list[Path], split: str = "train") -> tuple[Path, Path] | None:
    for root in roots:
        found = []
        for stem in idx_files(split):
            path = next((p for p in (root / stem, root / f"{stem}.gz") if p.is_file()), None)
            found.append(path)
        if all(found):
            return found[0], found[1]
    return None


def _idx_roots(kind: str, data_dir: Path) -> list[Path]:
    tv = IDX_DATASETS.get(kind, "")
    roots = [data_dir, data_dir / kind, data_dir / tv / "raw"] if tv else [data_dir]
    return roots + SYSTEM_DIRS.get(kind, [])


def _download_torchvision(kind: str, data_dir: Path) -> None:
    """Try torchvision's download (needs internet); offline this fails fast and we say where to put files."""
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "kmnist": tvd.KMNIST, "fashion-mnist": tvd.FashionMNIST}[kind]
    try:
        cls(str(data_dir), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - any network failure means "offline"
        log.info("download of %s failed: %s", kind, exc)


def load_idx_dataset(
    kind: str, data_dir: Path, conditional: bool, split: str = "train"
) -> ImageData:
    """An IDX split: train (train-*) or test (t10k-*), from the same places."""
    roots = _idx_roots(kind, data_dir)
    files = _find_idx(kind, roots, split)
    if files is None and kind in IDX_DATASETS:
        _download_torchvision(kind, data_dir)
        files = _find_idx(kind, roots, split)
    if files is None:
        where = " or ".join(str(r) for r in roots[:3])
        names = idx_files(split)
        raise DataError(
            f"GAN_DATASET={kind}: no data found and it could not be downloaded. Put "
            f"{names[0]}[.gz] and {names[1]}[.gz] in {where} (GAN_DATA_DIR={data_dir})"
        )
    images, labels = (read_idx(p) for p in files)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{files[0]}, {files[1]}: expected N x H x W images and N labels, "
            f"got {images.shape} and {labels.shape}"
        )
    labels_t = torch.from_numpy(labels.astype(np.int64))
    return ImageData(
        name=kind,
        channels=1,
        image_size=images.shape[1],
        num_classes=check_labels(labels_t, files[1], NUM_CLASSES.get(kind), conditional),
        labels=labels_t,
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        source=str(files[0].parent),
    )


def check_labels(
    labels: torch.Tensor, path: Path, num_classes: int | None, conditional: bool
) -> int:
    """The number of classes a conditional model gets (0 otherwise). A known dataset's labels
    must lie in its classes 0..num_classes-1; other data (num_classes None) numbers its classes
    0..K-1, every one with images, when it is trained on conditionally."""
    found = torch.unique(labels)
    if num_classes is not None:
        outside = found[(found < 0) | (found >= num_classes)]
        if len(outside):
            raise DataError(
                f"{path}: labels {_some(outside)} outside the dataset's classes: "
                f"expected 0..{num_classes - 1}"
            )
    elif conditional:
        num_classes = int(found.max()) + 1 if len(found) else 0
        missing = sorted(set(range(num_classes)) - set(found.tolist()))
        if missing:
            raise DataError(
                f"{path}: labels must number the classes 0..K-1 (GAN_CONDITIONAL=true), but "
                f"{len(missing)} of 0..{num_classes - 1} have no image: {_some(torch.tensor(missing))}"
            )
    return (num_classes or 0) if conditional else 0


def _some(values: torch.Tensor, limit: int = 5) -> str:
    shown = ", ".join(str(v) for v in values[:limit].tolist())
    return shown + (f" (and {len(values) - limit} more)" if len(values) > limit else "")


# ---------------------------------------------------------------- CIFAR-10


def _cifar_batches(data_dir: Path, split: str = "train") -> list[Path] | None:
    folder = data_dir / "cifar-10-batches-py"
    if split == "test":
        files = [folder / "test_batch"]
    else:
        files = [folder / f"data_batch_{i}" for i in range(1, 6)]
    return files if all(f.is_file() for f in files) else None


def load_cifar10(data_dir: Path, conditional: bool, split: str = "train") -> ImageData:
    """A CIFAR-10 split (train: data_batch_1-5, test: test_batch) from cifar-10-batches-py/
    (extracted, packed, or downloaded)."""
    files = _cifar_batches(data_dir, split)
    archive = data_dir / "cifar-10-python.tar.gz"
    if files is None and archive.is_file():
        with tarfile.open(archive) as tar:
            tar.extractall(data_dir, filter="data")
        files = _cifar_batches(data_dir, split)
    if files is None:
        import torchvision.datasets as tvd

        try:
            tvd.CIFAR10(str(data_dir), train=True, download=True)
        except Exception as exc:  # noqa: BLE001 - no network
            log.info("download of CIFAR-10 failed: %s", exc)
        files = _cifar_batches(data_dir, split)
    if files is None:
        raise DataError(
            f"GAN_DATASET=cifar10: no data found in {data_dir} and it could not be downloaded. "
            f"Put cifar-10-python.tar.gz or its extracted cifar-10-batches-py/ in {data_dir}"
        )
    images, labels = [], []
    for path in files:
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch["labels"])
        except Exception as exc:  # noqa: BLE001 - truncated or foreign file
            raise DataError(f"{path}: not a CIFAR-10 batch file ({exc})") from exc
        check_labels(torch.tensor(batch["labels"]), path, NUM_CLASSES["cifar10"], conditional)
    return ImageData(
        "cifar10",
        3,
        32,
        NUM_CLASSES["cifar10"] if conditional else 0,
        torch.tensor(labels, dtype=torch.int64),
        images=torch.from_numpy(np.concatenate(images)),
        source=str(files[0].parent),
    )


# ---------------------------------------------------------------- image folders


class FolderDataset(Dataset):
    """Every image under a folder, recursively; the first-level subfolder is the class.

    Files that are empty or not images at all are found by their header when the folder is
    indexed, so they never count as images; files that fail only when decoded (truncated) are
    found at their first draw. Either kind is skipped, warned about and counted once per file
    (skip_bad), or named in a one-line DataError raised in the main process.
    """

    def __init__(self, root: Path, image_size: int, skip_bad: bool = True):
        if not root.is_dir():
            raise DataError(f"GAN_DATASET=folder:{root}: no such folder")
        self.root, self.image_size, self.skip_bad = root, image_size, skip_bad
        files = sorted(
            p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        with ThreadPoolExecutor(8) as pool:  # one small read per file; I/O-bound
            problems = dict(zip(files, pool.map(_header_problem, files), strict=True))
        bad = {p: why for p, why in problems.items() if why}
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
                    img = _resize_center_crop(_to_rgb(img), self.image_size)
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


def _header_problem(path: Path) -> str | None:
    """Why a file is no image, from its size and header alone (no decoding); None if it is."""
    try:
        if path.stat().st_size == 0:
            return "empty image file"
        with Image.open(path):
            return None
    except UNREADABLE as exc:
        return f"unreadable image ({exc})"


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def _to_rgb(img: Image.Image) -> Image.Image:
    """img as 8-bit RGB, scaled from its own range: 16-bit integers by their bit depth (value
    >> 8), floats from [0, 1] (values outside clipped); other modes as PIL converts them."""
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


def load_folder(root: Path, image_size: int, conditional: bool, skip_bad: bool = True) -> ImageData:
    ds = FolderDataset(root, image_size, skip_bad)
    if conditional and len(ds.classes) < 2:
        raise DataError(
            f"GAN_CONDITIONAL=true needs labels: put the images of {root} in one subfolder per class"
        )
    return ImageData(
        name=f"folder:{root}",
        channels=3,
        image_size=image_size,
        num_classes=len(ds.classes) if conditional else 0,
        labels=ds.labels,
        folder=ds,
        source=str(root),
    )


# ---------------------------------------------------------------- entry point


def load_dataset(
    dataset: str,
    data_dir: str | Path,
    image_size: int,
    conditional: bool = False,
    skip_bad: bool = True,
    local_s3_copy: Path | None = None,
) -> ImageData:
    """The training split GAN_DATASET names (mnist, fashion-mnist, kmnist, cifar10,
    folder:PATH or s3://...), at image_size.

    local_s3_copy: for an s3:// dataset, the local folder it was already downloaded to.
    """
    kind, data_dir = dataset_kind(dataset), Path(data_dir)
    if kind == "folder":
        return load_folder(Path(dataset.removeprefix("folder:")), image_size, conditional, skip_bad)
    if kind == "s3":
        assert local_s3_copy is not None
        if _find_idx("s3", [local_s3_copy]):
            data = load_idx_dataset("s3", local_s3_copy, conditional)
        else:
            return load_folder(local_s3_copy, image_size, conditional, skip_bad)
    elif kind == "cifar10":
        data = load_cifar10(data_dir, conditional)
    else:
        data = load_idx_dataset(kind, data_dir, conditional)
    data.name = dataset
    if conditional and data.num_classes < 2:
        raise DataError(f"GAN_CONDITIONAL=true: {dataset} has fewer than 2 classes")
    return resize_in_memory(data, image_size)


def resize_in_memory(data: ImageData, size: int) -> ImageData:
    if data.image_size == size:
        return data
    data.images = torch.cat([resize_images(chunk, size) for chunk in data.images.split(4096)])
    data.image_size = size
    return data


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N x C x H x W at size x size (bilinear, antialiased), unchanged if already."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- batches


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The same permutation on every rank; each rank takes its own stride of it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


@dataclass
class Position:
    """Where a batch source is: the epoch, and the batches each rank took of it. Saved as the
    images all ranks consumed in the epoch, so that a checkpoint taken under one world size
    resumes under another (at the step where a run of that size had consumed as many)."""

    images_per_step: int  # the batch size times the world size
    epoch: int = 0
    batch_index: int = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "images_consumed": self.batch_index * self.images_per_step}

    def load_state_dict(self, state: dict, batches_in: Callable[[int], int]) -> None:
        """batches_in(epoch): the batches each rank takes of that epoch."""
        self.epoch = int(state["epoch"])
        consumed = int(state["images_consumed"]) // self.images_per_step
        self.batch_index = min(consumed, batches_in(self.epoch))

    def next_epoch_if_done(self, batches: int) -> bool:
        """Before a batch: on to the next epoch when this one's `batches` are taken."""
        if self.batch_index < batches:
            return False
        self.epoch, self.batch_index = self.epoch + 1, 0
        return True


class BatchSource:
    """Endless batches of (images in [-1, 1] on the device, labels), epoch after epoch, from
    images in memory or a folder; its position is a Position."""

    def __init__(
        self,
        data: ImageData,
        batch_size: int,
        *,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        on_device: bool = True,
    ):
        self.data, self.seed = data, seed
        self.device, self.rank, self.world_size = device, rank, world_size
        self.num_workers = num_workers
        self.per_rank = len(data) // world_size
        self.position = Position(batch_size * world_size)
        self.resize(batch_size)
        self.in_memory = data.images is not None
        if self.in_memory:
            home = device if on_device else torch.device("cpu")
            self.images, self.labels = data.images.to(home), data.labels.to(home)
            if home.type == "cpu" and device.type == "cuda":
                self.images, self.labels = self.images.pin_memory(), self.labels.pin_memory()
        self._iter = None

    def resize(self, batch_size: int) -> None:
        """Batches of batch_size per process from the next one on (a resumed run that keeps
        its checkpoint's global batch under another world size; before its position loads)."""
        self.batch_size = batch_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{self.data.name}: {len(self.data)} images are fewer than one batch per process "
                f"({batch_size} per process x {self.world_size} processes)"
            )
        self.position.images_per_step = batch_size * self.world_size
        self._iter = None

    @property
    def skipped_images(self) -> int:
        """Image files skipped as unreadable so far (each counted once)."""
        return self.data.folder.skipped if self.data.folder is not None else 0

    @property
    def images_per_epoch(self) -> int:
        return self.batches_per_epoch * self.batch_size * self.world_size

    def stats(self) -> dict:
        """Data throughput for the log record: nothing to add for images in memory or a folder
        (ShardSource reports its downloads)."""
        return {}

    def state_dict(self) -> dict:
        return self.position.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.position.load_state_dict(state, lambda epoch: self.batches_per_epoch)
        self._iter = None

    def _rank_batches(self) -> list[torch.Tensor]:
        order = epoch_order(len(self.data), self.seed, self.position.epoch)
        mine = order[self.rank :: self.world_size][: self.per_rank]
        usable = self.batches_per_epoch * self.batch_size
        return list(mine[:usable].view(self.batches_per_epoch, self.batch_size))

    def _loader(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = [b.tolist() for b in self._rank_batches()[self.position.batch_index :]]
        return folder_batches(
            self.data.folder, batches, self.num_workers, pin_memory=self.device.type == "cuda"
        )

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self.position
        if pos.next_epoch_if_done(self.batches_per_epoch):
            self._iter = None
        if self.in_memory:
            if self._iter is None:
                self._iter = self._rank_batches()
            idx = self._iter[pos.batch_index].to(self.images.device, non_blocking=True)
            x = self.images[idx].to(self.device, non_blocking=True)
            y = self.labels[idx].to(self.device, non_blocking=True)
        else:
            if self._iter is None:
                self._iter = self._loader()
            x, y = next(self._iter)
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
        pos.batch_index += 1
        return x.float().div_(127.5).sub_(1.0), y


def real_images(data: ImageData, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset of real images (uint8) and labels, e.g. for FID statistics."""
    if data.shards is not None:
        return data.shards.real_images(num, seed)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[: min(num, len(data))]
    if data.images is not None:
        return data.images[idx], data.labels[idx]
    items = [data.folder.load(int(i)) for i in idx]
    return torch.stack([item[0] for item in items]), torch.tensor([item[1] for item in items])
