"""What a GAN_DATASET value names: its kind (mnist, folder:PATH, s3://..., shards:s3://...),
whether it is one at all, and the built-in datasets' native image sizes."""

from __future__ import annotations

SHARDS_PREFIX = "shards:"  # GAN_DATASET=shards:s3://bucket/prefix
NATIVE_SIZE = {"mnist": 28, "kmnist": 28, "fashion-mnist": 28, "cifar10": 32}


def dataset_kind(dataset: str) -> str:
    """mnist | kmnist | fashion-mnist | cifar10 | folder | s3 | shards."""
    if dataset.startswith("folder:"):
        return "folder"
    if dataset.startswith(SHARDS_PREFIX):
        return "shards"
    if dataset.startswith("s3://"):
        return "s3"
    return dataset


def dataset_problem(value: str) -> str | None:
    known = {*NATIVE_SIZE}
    if value.startswith(SHARDS_PREFIX):
        if value.startswith(SHARDS_PREFIX + "s3://") and len(value) > len(SHARDS_PREFIX) + 5:
            return None  # the bucket name is checked by Settings
        return "expected shards:s3://bucket/prefix (shards are read from S3)"
    if value in known or value.startswith(("s3://", "folder:")) and len(value) > 7:
        return None  # an s3:// bucket name is checked by Settings
    return (
        f"expected one of {', '.join(sorted(known))}, folder:/path, s3://bucket/prefix or "
        "shards:s3://bucket/prefix"
    )
