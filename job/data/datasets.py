"""The datasets GAN_DATASET names, loaded as ImageData: the MNIST family (IDX files) and
CIFAR-10 held whole as a uint8 tensor, image folders (job/data/folder.py) indexed to stream
through a DataLoader, at the image size training asks for.
"""

from __future__ import annotations

import gzip
import logging
import pickle
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from job.data.folder import RGB, WHITE, FolderDataset
from job.data.naming import dataset_kind
from job.infra.errors import DataError

log = logging.getLogger(__name__)

IDX_DATASETS = {"mnist": "MNIST", "kmnist": "KMNIST", "fashion-mnist": "FashionMNIST"}
SYSTEM_DIRS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")]}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
IDX_PREFIXES = {"train": "train", "test": "t10k"}  # file name prefixes of the IDX splits
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

    def describe(self, background: str) -> str:
        """The start-up block's account of the images (background: what transparency is laid
        over, as GAN_BACKGROUND names it)."""
        size = f"{self.channels}x{self.image_size}x{self.image_size}"
        text = f"{len(self)} images, {self.classes_found} classes, {size}"
        if self.transparent:
            text += f", {self.transparent} with transparency laid over {background}"
        return text

    @property
    def transparent(self) -> int:
        """Images with transparency, laid over the background colour as they are read."""
        return self.folder.transparent if self.folder is not None else 0

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


class _BatchUnpickler(pickle.Unpickler):
    """CIFAR-10's batch files are pickles of a dict of lists and one numpy array: this
    unpickler builds those and refuses any other Python object a file names (a full unpickler
    would call it: a planted batch file would run code)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in a protocol-2 pickle written by Python 3
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names the Python object {module}.{name}, refused")
        return super().find_class(module, name)


def extract_archive(archive: Path, data_dir: Path) -> None:
    """archive's files and folders into data_dir, or DataError naming it, before anything is
    written, when it is no tar or a member would land outside data_dir (an absolute path, ..,
    a link or device). tarfile's "data" filter, where this Python has it, checks again."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            root = data_dir.resolve()
            for m in members:
                where = (root / m.name).resolve()
                if not (m.isfile() or m.isdir()):
                    why = "is a link or special file (only files and folders are extracted)"
                elif not where.is_relative_to(root):
                    why = "would land outside the data folder"
                else:
                    continue
                raise DataError(
                    f"{archive}: member {m.name!r} {why}: nothing extracted, nothing written "
                    f"outside {data_dir}; expected CIFAR-10's cifar-10-python.tar.gz"
                )
            if hasattr(tarfile, "data_filter"):
                tar.extractall(data_dir, members=members, filter="data")
            else:  # Python before 3.12: the checks above are all there is
                tar.extractall(data_dir, members=members)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive}: not a tar archive, or damaged ({exc})") from exc


def load_cifar10(data_dir: Path, conditional: bool, split: str = "train") -> ImageData:
    """A CIFAR-10 split (train: data_batch_1-5, test: test_batch) from cifar-10-batches-py/
    (extracted, packed, or downloaded)."""
    files = _cifar_batches(data_dir, split)
    archive = data_dir / "cifar-10-python.tar.gz"
    if files is None and archive.is_file():
        extract_archive(archive, data_dir)
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
                batch = _BatchUnpickler(f, encoding="latin1").load()
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


def load_folder(
    root: Path, image_size: int, conditional: bool, skip_bad: bool = True, background: RGB = WHITE
) -> ImageData:
    ds = FolderDataset(root, image_size, skip_bad, background)
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
    background: RGB = WHITE,
) -> ImageData:
    """The training split GAN_DATASET names (mnist, fashion-mnist, kmnist, cifar10,
    folder:PATH or s3://...), at image_size.

    local_s3_copy: for an s3:// dataset, the local folder it was already downloaded to;
    background: the colour images with transparency are laid over (GAN_BACKGROUND).
    """
    kind, data_dir = dataset_kind(dataset), Path(data_dir)
    if kind == "folder":
        folder = Path(dataset.removeprefix("folder:"))
        return load_folder(folder, image_size, conditional, skip_bad, background)
    if kind == "s3":
        assert local_s3_copy is not None
        if _find_idx("s3", [local_s3_copy]):
            data = load_idx_dataset("s3", local_s3_copy, conditional)
        else:
            return load_folder(local_s3_copy, image_size, conditional, skip_bad, background)
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
