"""Every setting of the job: read from GAN_* environment variables, validated before any work."""

from __future__ import annotations

import os
import re
from typing import Literal, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from job.data.folder import background_rgb
from job.data.naming import NATIVE_SIZE, SHARDS_PREFIX, dataset_kind, dataset_problem
from job.infra.errors import SettingsError
from job.infra.s3_store import s3_uri_problem
from job.infra.secrets import redact, redact_values

PREFIX = "GAN_"
DCGAN_SIZES = (28, 32, 64)
R3GAN_SIZES = (16, 28, 32, 64, 128, 256)  # powers of two, and 28 (a 7 x 7 start) for MNIST
DIFFAUGMENT_POLICIES = ("color", "translation", "cutout")  # job/gan/augment.py implements them
# upper bounds: a seed torch and numpy take (the noise streams add step offsets to it), step
# counts far beyond any run, and time settings (minutes) that a thread's wait can hold
MAX_SEED = 2**32 - 1
MAX_COUNT = 10**12
MAX_MINUTES = 525600.0  # a year

# Kubernetes injects <SERVICE>_SERVICE_HOST, <SERVICE>_PORT, <SERVICE>_PORT_<n>_TCP... for every
# Service in the namespace; a Service named gan-something must not look like a typo.
_SERVICE_LINK = re.compile(
    r"^GAN(_\w+)?_(SERVICE_HOST|SERVICE_PORT\w*|PORT|PORT_\d+_(TCP|UDP|SCTP)\w*)$"
)


class Settings(BaseSettings):
    """The job's knobs. Field descriptions are the one-line docs of --help and docs/settings.md."""

    # inf and nan are refused for every float: an endless wait is GAN_MAX_MINUTES=0, not inf
    model_config = SettingsConfigDict(extra="ignore", validate_default=True, allow_inf_nan=False)
    _recipe_filled: dict[str, object] = PrivateAttr(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        **other_sources: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the values passed in: load_settings reads the environment, once, so that a
        setting it leaves out (an invalid one, while the others' combinations are judged) is
        not read back from os.environ."""
        return (init_settings,)

    # data
    dataset: str = Field(
        "fashion-mnist",
        description="mnist, kmnist, fashion-mnist, cifar10, folder:/path/to/images, "
        "an s3:// prefix holding IDX files or an image folder, or shards:s3://bucket/prefix "
        "(tar shards written by gan-job shard, streamed: docs/data.md)",
    )
    data_dir: str = Field("./data", description="where datasets are read from / downloaded to")
    image_size: int | None = Field(
        None,
        ge=8,
        le=512,
        description="pixels per side; unset: the dataset's own (28, 32; 64 for folders); dcgan: "
        "28, 32 or 64, r3gan: 16, 28, 32, 64, 128 or 256",
    )
    num_workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="DataLoader workers for image folders; unset: half the process's threads "
        "(GAN_NUM_THREADS), 1 to 4",
    )
    shard_cache_mb: float = Field(
        1024.0,
        gt=0,
        le=1e9,
        description="shards datasets: the most disk each process's shard cache takes (MB; at "
        "least the largest shard); least recently used shards are deleted to stay under it",
    )
    shard_cache_dir: str | None = Field(
        None,
        description="shards datasets: where shards are cached (in rank-<rank>/ folders); unset: "
        "GAN_DATA_DIR/shards/<bucket>/<prefix>/<run id>",
    )

    # model
    model: Literal["mlp", "dcgan", "r3gan"] = Field(
        "dcgan",
        description="mlp (Goodfellow's MLP GAN), dcgan, or r3gan (the residual R3GAN baseline, "
        "no normalization; its conditional D always projects)",
    )
    conditional: bool = Field(False, description="class-conditional G and D (needs labels)")
    latent_dim: int = Field(100, ge=1, le=4096, description="size of the noise vector z")
    width: int = Field(
        64,
        ge=4,
        le=1024,
        description="DCGAN feature maps (ngf=ndf); MLP hidden base; r3gan: channels of the "
        "image-size stage, doubling per halving up to 8x",
    )
    depth: int = Field(
        0,
        ge=0,
        le=8,
        description="DCGAN: 3x3 convolution blocks added in G and D at each resolution between "
        "the input and the output (0: the classic DCGAN)",
    )
    blocks: int = Field(1, ge=1, le=16, description="r3gan: residual blocks per stage")

    # optimisation
    batch_size: int = Field(64, ge=1, le=65536, description="images per step per process")
    global_batch_size: int | None = Field(
        None,
        ge=1,
        le=1048576,
        description="images per step over all processes: each takes GAN_GLOBAL_BATCH_SIZE / world "
        "size (GAN_BATCH_SIZE, if set, must equal that); unset: GAN_BATCH_SIZE x world size, "
        "and a resumed run keeps its checkpoint's global batch",
    )
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        le=65536,
        description="the most images a process puts through G and D at once: a larger batch per "
        "process accumulates gradients over equal micro-batches (unset: no limit)",
    )
    lr_g: float = Field(2e-4, gt=0, le=1, description="generator Adam learning rate")
    lr_d: float = Field(2e-4, gt=0, le=1, description="discriminator Adam learning rate")
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam beta1 for both optimizers")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2 for both optimizers")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="one-sided: D's target for real images is 1 - this"
    )
    ema_decay: float = Field(
        0.999,
        ge=0,
        lt=1,
        description="decay of the EMA generator, warmed up as min(this, (1+step)/(10+step)); 0: plain copy",
    )
    lr_decay: Literal["none", "linear", "cosine"] = Field(
        "none",
        description="bring both learning rates down to 0 by the end of the budget (GAN_MAX_STEPS, "
        "or GAN_MAX_MINUTES when that comes first), from GAN_LR_DECAY_START on",
    )
    lr_decay_start: float = Field(
        0.0, ge=0, lt=1, description="fraction of the budget after which the decay begins"
    )
    schedule: Literal["none", "r3gan"] = Field(
        "none",
        description="r3gan: R3GAN's schedule over GAN_SCHEDULE_IMAGES images seen (half a cosine "
        "each): learning rates down to a quarter of GAN_LR_G/GAN_LR_D, Adam beta2 from GAN_BETA2 "
        "up to 0.99, GAN_R1_GAMMA and GAN_R2_GAMMA down tenfold, the EMA half-life up from 0 to "
        "the one GAN_EMA_DECAY gives at the global batch; not with GAN_LR_DECAY",
    )
    schedule_images: int | None = Field(
        None,
        ge=1,
        le=MAX_COUNT,
        description="GAN_SCHEDULE=r3gan: the images seen at which its values reach their ends "
        "(unset: GAN_MAX_STEPS x the global batch; set it when a run will be continued with a "
        "larger GAN_MAX_STEPS, so that the curves do not move)",
    )
    max_steps: int = Field(10000, ge=1, le=MAX_COUNT, description="stop after this many D+G steps")
    max_minutes: float = Field(
        0.0,
        ge=0,
        le=MAX_MINUTES,
        description="wall-time budget of this process: stop cleanly, checkpoint, exit 0 (0: none)",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed for weights, noise and data order")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="auto picks cuda when usable; cuda without a usable GPU stops before any work (exit 9)",
    )

    # training recipe
    recipe: Literal["auto", "custom", "seed", "fast28", "color32"] = Field(
        "auto",
        description="auto: fast28 for 28 px grayscale data (the MNIST family at its own size with dcgan), "
        "color32 for color data at 32 px with dcgan (an image folder at GAN_IMAGE_SIZE=32, CIFAR-10 "
        "at its own size; measured on emoji only), custom otherwise; custom: the settings as "
        "given; seed: the seed tutorials' DCGAN (bce, Adam 2e-4, betas 0.5/0.999, no EMA); "
        "fast28: the measured 28 px recipe of docs/quality.md; color32: its values, measured on "
        "32 px color emoji. A recipe fills in only the GAN_* variables that are not set",
    )
    loss: Literal["bce", "hinge", "rpgan"] = Field(
        "bce",
        description="bce (non-saturating), hinge, or rpgan (R3GAN's relativistic pairing: "
        "softplus of D(fake) - D(real), and the reverse for G, over real and fake images paired "
        "by index; G's step sees D's logits of the step's real batch); label smoothing applies "
        "to bce only",
    )
    spectral_norm: bool = Field(
        False, description="spectral norm on every Conv/Linear of D, whose BatchNorm is dropped"
    )
    r1_gamma: float = Field(
        0.0,
        ge=0,
        le=1e4,
        description="R1 penalty gamma/2 * mean squared norm of grad_x D(real x), in D's step (0: off)",
    )
    r2_gamma: float = Field(
        0.0,
        ge=0,
        le=1e4,
        description="R2 penalty gamma/2 * mean squared norm of grad_x D(fake x), in D's step "
        "(0: off; R3GAN: as GAN_R1_GAMMA)",
    )
    r1_every: int = Field(
        16,
        ge=1,
        le=1000,
        description="R1 and R2 every this many steps, scaled by it (lazy, StyleGAN2); 1: every "
        "step, as R3GAN",
    )
    diffaugment: str = Field(
        "",
        description="DiffAugment policies for D's inputs, real and fake: a comma list of color, "
        "translation, cutout (empty: off)",
    )
    augment: Literal["none", "ada"] = Field(
        "none",
        description="ada: adaptive augmentation (StyleGAN2-ADA) for small datasets: flips, "
        "translation, color and cutout, each applied to each of D's images with a probability p "
        "that rises while D is too sure of the real images (GAN_ADA_TARGET) and falls when it is "
        "not; not with GAN_DIFFAUGMENT",
    )
    ada_target: float = Field(
        0.6,
        gt=0,
        lt=1,
        description="GAN_AUGMENT=ada: the mean sign of D's outputs on real images that p is moved "
        "toward (0: D cannot tell them from fakes; 1: sure of every one)",
    )
    ada_interval: int = Field(
        4, ge=1, le=10000, description="GAN_AUGMENT=ada: steps between two moves of p"
    )
    ada_speed_images: int = Field(
        500_000,
        ge=1,
        le=MAX_COUNT,
        description="GAN_AUGMENT=ada: real images over which p can go from 0 to 1 at the fastest",
    )
    conditioning: Literal["concat", "projection"] = Field(
        "concat",
        description="how a conditional D sees labels: concat (embedding beside the input) or "
        "projection (Miyato & Koyama); projection needs GAN_CONDITIONAL=true",
    )

    # reliability
    nonfinite: Literal["rollback", "fail"] = Field(
        "rollback",
        description="on a non-finite loss: roll back to the last checkpoint with halved learning rates, or fail (exit 7)",
    )
    nonfinite_max_rollbacks: int = Field(
        3, ge=0, le=100, description="rollbacks allowed before a non-finite loss fails the job"
    )
    bad_images: Literal["skip", "fail"] = Field(
        "skip",
        description="unreadable or empty files in an image folder: skip and count, or fail (exit 3)",
    )
    background: str = Field(
        "white",
        description="images with transparency (RGBA, LA, transparent palette) are laid over this "
        "colour: white, black or #rrggbb",
    )
    grace_seconds: int = Field(
        110,
        ge=1,
        le=86400,
        description="after SIGTERM/SIGINT, how long the job may take to store its checkpoint (exit 75; "
        "not stored in time: exit 10); torchrun kills workers 5 s later. Keep it 10 s under the pod's "
        "terminationGracePeriodSeconds (120)",
    )

    # speed
    data_on_device: bool = Field(
        True,
        description="hold in-memory datasets on the training device as uint8 (GPU: no copies per step)",
    )
    amp: Literal["auto", "bf16", "off"] = Field(
        "auto", description="bf16 autocast; auto: on for GPUs that support bf16, off on CPU"
    )
    channels_last: bool = Field(
        True, description="channels-last memory format for DCGAN (faster convolutions, GPU and CPU)"
    )
    fused_adam: bool = Field(True, description="fused Adam on GPU (foreach on CPU)")
    compile: bool = Field(
        False,
        description="torch.compile G and D (slow first steps; no gain on CPU); with R1 or R2 "
        "penalties G only: their double backward through D is one torch.compile lacks",
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch threads per process; unset: OMP_NUM_THREADS if set, else the CPUs the "
        "process may use (affinity, cgroup CPU quota) over the processes of the node, at least 1",
    )

    # artifacts
    artifact_uri: str = Field(
        "./runs", description="local folder or s3://bucket/prefix for all artifacts"
    )
    run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="folder name of this run; unset: <dataset>-<model>[-cond], so a restart "
        "resumes (<dataset>: the last path segment, without query string or credentials)",
    )
    resume: str = Field(
        "auto",
        description="auto (newest complete checkpoint, if any), never (a fresh run: refused "
        "where this run id already has artifacts), or a checkpoint path",
    )
    dry_run: bool = Field(
        False,
        description="print what the run would do (start-up block) and exit without training, "
        "writing or locking",
    )
    run_lease_seconds: float = Field(
        60.0,
        ge=2,
        le=86400,
        description="lease of the run lock that keeps a second job off this run id; a killed "
        "job's lock is taken over after this long",
    )
    upload_timeout_minutes: float = Field(
        30.0,
        gt=0,
        le=MAX_MINUTES,
        description="how long to keep retrying queued uploads with none stored, mid-run "
        "(training meanwhile), at exit and before a rollback, before failing (exit 4)",
    )
    checkpoint_every: int = Field(500, ge=1, le=MAX_COUNT, description="steps between checkpoints")
    keep_checkpoints: int = Field(
        3, ge=1, le=10000, description="complete checkpoints kept; older ones are deleted"
    )
    log_every: int = Field(50, ge=1, le=MAX_COUNT, description="steps between progress lines")
    sample_every: int = Field(500, ge=1, le=MAX_COUNT, description="steps between sample grids")

    # evaluation
    fid_every: int = Field(
        1000, ge=0, le=MAX_COUNT, description="steps between FID evaluations (0: only at the end)"
    )
    fid_num_samples: int = Field(
        0,
        ge=0,
        le=10_000_000,
        description="generated and real images per FID; 0: 10000 on cuda, 500 on cpu",
    )
    fid_features: str = Field(
        "inception",
        description="inception, none, or the path of a TorchScript model mapping NxCxHxW in [0,1] to NxD",
    )
    fid_inception_weights: str | None = Field(
        None, description="InceptionV3 weights file; unset: the torch hub cache"
    )
    early_stop_patience: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="evaluations without an improvement of the best score of at least "
        "GAN_EARLY_STOP_MIN_DELTA after which training stops (reason plateau); 0: never",
    )
    early_stop_min_delta: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="the smallest fall of the best score (KID, or FID where there is no KID) "
        "that counts as an improvement",
    )
    target_fid: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description="stop once an evaluation's FID is at most this (reason target)",
    )
    target_kid: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description="stop once an evaluation's KID is at most this (reason target)",
    )

    # cluster
    nproc_per_node: int = Field(
        1,
        ge=1,
        le=64,
        description="processes (GPUs) on this node, or auto: one per visible GPU (1 on CPU); >1 "
        "or GAN_NNODES > 1, and not under torchrun: gan-job starts torchrun",
    )
    nnodes: int = Field(
        1,
        ge=1,
        le=1024,
        description="nodes (pods) in the run; >1: gan-job starts torchrun with a c10d rendezvous "
        "hosted by node 0 at GAN_RDZV_ENDPOINT",
    )
    node_rank: int = Field(
        0,
        ge=0,
        le=1023,
        description="this node's index, 0 to GAN_NNODES-1; node 0 hosts the rendezvous "
        "(on Kubernetes: the pod's completion index)",
    )
    rdzv_endpoint: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9.-]+:[0-9]{1,5}$",
        description="host:port of node 0's rendezvous store (needed when GAN_NNODES > 1)",
    )
    rdzv_timeout_seconds: int = Field(
        900,
        ge=1,
        le=86400,
        description="how long nodes wait for each other, at the start and for node 0's store "
        "(pods can start minutes apart: image pulls, scheduling)",
    )
    stall_timeout_seconds: int = Field(
        600,
        ge=5,
        le=86400,
        description="a rank that makes no progress (no step, FID batch or stored checkpoint part) "
        "for this long logs where it waits and exits 10; also the process group's timeout. Above "
        "the longest pause (a first torch.compile), under the stall alert (15 min)",
    )
    sync_batchnorm: bool = Field(
        False,
        description="SyncBatchNorm across ranks (GPU only); false: each rank keeps its own BN statistics",
    )
    metrics_port: int = Field(
        9090, ge=0, le=65535, description="Prometheus metrics port on rank 0 (0: off)"
    )
    pushgateway_url: str | None = Field(
        None,
        description="Pushgateway to push final metrics to at exit (unset: no push); a "
        "user:password@ in it is sent as basic auth",
    )
    tensorboard: bool = Field(
        False,
        description="TensorBoard event files under RUN/tensorboard/ (scalars of metrics.jsonl "
        "and eval.jsonl, the sample grids); off by default: it needs the tensorboard extra "
        "(pip install 'gan-job[tensorboard]', in the image) and adds an object to the store per "
        "grid, evaluation, checkpoint and 30 s of records, where metrics.jsonl, report.png and "
        "Prometheus already watch every run",
    )
    s3_endpoint_url: str | None = Field(
        None,
        description="S3 endpoint for non-AWS stores; unset: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL",
    )

    @field_validator("diffaugment")
    @classmethod
    def _check_diffaugment(cls, value: str) -> str:
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if any(p not in DIFFAUGMENT_POLICIES for p in parts):
            raise PydanticCustomError(
                "diffaugment", "a comma list of color, translation, cutout, or empty for none"
            )
        return ",".join(parts)

    @field_validator("background")
    @classmethod
    def _check_background(cls, value: str) -> str:
        if background_rgb(value) is None:
            raise PydanticCustomError("background", "white, black or a colour #rrggbb")
        return value.lower()

    @property
    def background_color(self) -> tuple[int, int, int]:
        return background_rgb(self.background)

    @field_validator("fid_num_samples")
    @classmethod
    def _check_fid_num_samples(cls, value: int) -> int:
        if value == 1:  # one image has no covariance: every FID would be NaN
            raise PydanticCustomError("fid_num_samples", "0 (the default count) or at least 2")
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_s3_endpoint(cls, value: str | None) -> str | None:
        if value is not None and (why := endpoint_problem(value)) is not None:
            raise PydanticCustomError("s3_endpoint_url", why)
        return value

    @field_validator("artifact_uri", "dataset", "resume")
    @classmethod
    def _check_bucket(cls, value: str) -> str:
        if (why := s3_uri_problem(value.removeprefix(SHARDS_PREFIX))) is not None:
            raise PydanticCustomError("s3_bucket", why)
        return value

    @field_validator("nproc_per_node", mode="before")
    @classmethod
    def _resolve_nproc_auto(cls, value: object, info: ValidationInfo) -> object:
        """auto becomes a number here: the launcher and config.json see how many it meant."""
        if value != "auto":
            try:
                int(value)
            except (TypeError, ValueError):
                raise PydanticCustomError("nproc_per_node", "an integer or auto") from None
            return value
        if info.data.get("device") == "cpu":
            return 1
        import torch

        return max(torch.cuda.device_count(), 1)

    @model_validator(mode="wrap")
    @classmethod
    def _apply_recipe(cls, data: object, handler) -> Settings:
        """Fill in the recipe's values for the settings that were not given explicitly."""
        if not isinstance(data, dict):
            return handler(data)
        recipe = data.get("recipe") or "auto"
        if recipe == "auto":
            recipe = (
                "fast28" if _grayscale_28px(data) else "color32" if _color_32px(data) else "custom"
            )
            data = {**data, "recipe": recipe}
        preset = dict(RECIPES.get(recipe, {}))  # an unknown name fails validation
        if str(data.get("conditional", "false")).lower() not in TRUE_WORDS:
            preset.pop("conditioning", None)  # for conditional models only
        if data.get("model", preset.get("model")) != "dcgan":
            preset.pop("depth", None)  # DCGAN blocks
        if data.get("schedule") == "r3gan":
            preset.pop("lr_decay", None)  # the schedule decays the rates itself
            preset.pop("lr_decay_start", None)
        settings = handler({**preset, **data})
        settings._recipe_filled = {k: v for k, v in preset.items() if k not in data}
        return settings

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        """Settings valid alone but not together. Each message names every setting it involves
        (as GAN_X=), so that load_settings can drop those that involve an invalid one."""
        problems = []
        shards_size_unset = self.dataset_kind == "shards" and self.image_size is None
        if (
            self.model == "dcgan"
            and self.resolved_image_size not in DCGAN_SIZES
            and not shards_size_unset  # the index's size: checked when it is read
        ):
            problems.append(
                f"GAN_IMAGE_SIZE={self.resolved_image_size} is not supported by GAN_MODEL=dcgan: "
                f"expected one of {', '.join(map(str, DCGAN_SIZES))} "
                f"(GAN_MODEL=r3gan takes {', '.join(map(str, R3GAN_SIZES))})"
            )
        if (
            self.model == "r3gan"
            and self.resolved_image_size not in R3GAN_SIZES
            and not shards_size_unset
        ):
            problems.append(
                f"GAN_IMAGE_SIZE={self.resolved_image_size} is not supported by GAN_MODEL=r3gan: "
                f"expected one of {', '.join(map(str, R3GAN_SIZES))}"
            )
        if self.model == "r3gan" and self.spectral_norm:
            problems.append(
                "GAN_SPECTRAL_NORM=true does not go with GAN_MODEL=r3gan (no normalization)"
            )
        if "blocks" in self.model_fields_set and self.model != "r3gan":
            problems.append(f"GAN_BLOCKS={self.blocks} needs GAN_MODEL=r3gan")
        if self.depth and self.model != "dcgan":
            problems.append(f"GAN_DEPTH={self.depth} needs GAN_MODEL=dcgan (r3gan: GAN_BLOCKS)")
        if self.resume not in ("auto", "never") and not self.resume:
            problems.append("GAN_RESUME= must be auto, never, or a checkpoint path")
        if self.conditioning == "projection" and not self.conditional:
            problems.append(
                "GAN_CONDITIONING=projection needs GAN_CONDITIONAL=true (a projection "
                "discriminator is class-conditional)"
            )
        if self.nnodes > 1 and not self.rdzv_endpoint:
            problems.append(
                f"GAN_NNODES={self.nnodes} needs GAN_RDZV_ENDPOINT (host:port of node 0)"
            )
        if self.node_rank >= self.nnodes:
            problems.append(f"GAN_NODE_RANK={self.node_rank} is not below GAN_NNODES={self.nnodes}")
        stops = [
            f"GAN_{name.upper()}={getattr(self, name)}"
            for name in ("early_stop_patience", "target_fid", "target_kid")
            if getattr(self, name)
        ]
        if stops and self.fid_features == "none":
            problems.append(
                f"{' and '.join(stops)} needs evaluations: GAN_FID_FEATURES=none turns them off"
            )
        if self.augment == "ada" and self.diffaugment:
            problems.append(
                f"GAN_AUGMENT=ada does not go with GAN_DIFFAUGMENT={self.diffaugment} (both "
                "augment D's images): set one of them"
            )
        problems += self._schedule_problems()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _schedule_problems(self) -> list[str]:
        if self.schedule != "r3gan":
            given = "schedule_images" in self.model_fields_set
            return [f"GAN_SCHEDULE_IMAGES={self.schedule_images} needs GAN_SCHEDULE=r3gan"] * given
        problems = []
        if self.lr_decay != "none":
            problems.append(
                f"GAN_SCHEDULE=r3gan does not go with GAN_LR_DECAY={self.lr_decay} (the "
                "schedule decays the learning rates itself): set GAN_LR_DECAY=none"
            )
        if self.beta2 > 0.99:
            problems.append(
                f"GAN_SCHEDULE=r3gan raises Adam beta2 from GAN_BETA2={self.beta2} to 0.99: "
                "expected GAN_BETA2 at most 0.99 (R3GAN: 0.9)"
            )
        return problems

    @model_validator(mode="after")
    def _check_global_batch(self) -> Settings:
        """GAN_GLOBAL_BATCH_SIZE over the world gan-job's launcher starts (build() checks it
        again against the world that joined), and micro-batches the model can train on."""
        from job.data.batching import batch_size_given, check_micro_batch, plan_from_settings

        try:
            chosen = plan_from_settings(
                self.batch_size,
                batch_size_given(self.model_fields_set, self.recipe_filled),
                self.global_batch_size,
                self.nproc_per_node * self.nnodes,
                self.micro_batch_size,
            )
            given = ("batch_size", "global_batch_size", "micro_batch_size", "nproc_per_node")
            named = [
                f"GAN_{k.upper()}={getattr(self, k)}" for k in given if k in self.model_fields_set
            ]
            check_micro_batch(chosen, self.model, ", ".join(named or ["the defaults"]))
        except SettingsError as e:
            raise ValueError("\n".join(e.problems)) from None
        return self

    @property
    def recipe_filled(self) -> dict[str, object]:
        """The settings GAN_RECIPE gave a value because they were not set."""
        return dict(self._recipe_filled)

    @property
    def dataset_kind(self) -> str:
        return dataset_kind(self.dataset)

    @property
    def resolved_image_size(self) -> int:
        return self.image_size or NATIVE_SIZE.get(self.dataset_kind, 64)

    @property
    def resolved_run_id(self) -> str:
        """GAN_RUN_ID, or <dataset>-<model>[-cond] named after the dataset's last path segment,
        without its query string or any credential redact() finds in it."""
        if self.run_id:
            return self.run_id
        path = redact(self.dataset).split("?", 1)[0]
        name = re.sub(r"[^A-Za-z0-9]+", "-", path.split("/")[-1]).strip("-") or "data"
        return f"{name}-{self.model}" + ("-cond" if self.conditional else "")


TRUE_WORDS = ("1", "true", "t", "yes", "y", "on")  # what pydantic reads as a true bool

# settings that may differ between the nodes of one run: where a node keeps its own files, its
# processes, threads and DataLoader workers, its metrics port and how long it waits for the
# others. Every other setting must be the same on every node (agree.agree_settings).
PER_NODE_SETTINGS = frozenset(
    {
        "node_rank",
        "nproc_per_node",
        "num_workers",
        "num_threads",
        "metrics_port",
        "data_dir",
        "shard_cache_dir",
        "shard_cache_mb",
        "fid_inception_weights",
        "rdzv_timeout_seconds",
        "dry_run",
    }
)

# GAN_RECIPE presets: the values a recipe gives the settings that were not set explicitly
RECIPES: dict[str, dict[str, object]] = {
    "seed": {
        "model": "dcgan",
        "loss": "bce",
        "lr_g": 2e-4,
        "lr_d": 2e-4,
        "beta1": 0.5,
        "beta2": 0.999,
        "label_smoothing": 0.0,
        "ema_decay": 0.0,
        "lr_decay": "none",
        "lr_decay_start": 0.0,
        "spectral_norm": False,
        "r1_gamma": 0.0,
        "diffaugment": "",
        "conditioning": "concat",
        "depth": 0,
    },
    # measured on Fashion-MNIST on one core of a 2-core CPU, 10 minutes: docs/quality.md
    "fast28": {
        "model": "dcgan",
        "width": 24,
        "depth": 1,
        "loss": "bce",
        "lr_g": 8e-4,
        "lr_d": 8e-4,
        "beta1": 0.5,
        "beta2": 0.999,
        "label_smoothing": 0.0,
        "ema_decay": 0.999,
        "lr_decay": "linear",
        "lr_decay_start": 0.5,
        "spectral_norm": False,
        "r1_gamma": 0.1,
        "r1_every": 16,
        "diffaugment": "",
        "conditioning": "projection",
    },
}
# measured on 32 px color emoji (an image folder) on one CPU thread, 10 CPU-minutes against the
# seed recipe and the settings as given: docs/quality.md#color-at-32-px-emoji. fast28's values
# won there over adaptive augmentation, r3gan with the R3GAN objective, and the seed's width 64
# with the same decay and R1
RECIPES["color32"] = dict(RECIPES["fast28"])


def _grayscale_28px(data: dict) -> bool:
    """What fast28 was measured on: a MNIST-family dataset at its own 28 px, with DCGAN."""
    return (
        data.get("dataset", "fashion-mnist") in ("mnist", "kmnist", "fashion-mnist")
        and str(data.get("image_size") or 28) == "28"
        and data.get("model", "dcgan") == "dcgan"
    )


def _color_32px(data: dict) -> bool:
    """What color32 was measured on (an image folder at 32 px, with DCGAN), and CIFAR-10 at its
    own 32 px: the 3-channel datasets known as such before any image is read (an s3:// or
    shards: dataset may hold either kind)."""
    dataset = str(data.get("dataset", "fashion-mnist"))
    own = "32" if dataset == "cifar10" else None
    return (
        (dataset == "cifar10" or dataset.startswith("folder:"))
        and str(data.get("image_size") or own) == "32"
        and data.get("model", "dcgan") == "dcgan"
    )


def _unknown_variables(environ: dict[str, str]) -> list[str]:
    fields = {PREFIX + name.upper() for name in Settings.model_fields}
    return sorted(
        key
        for key in environ
        if key.startswith(PREFIX) and key not in fields and not _SERVICE_LINK.match(key)
    )


def endpoint_problem(url: str) -> str | None:
    """What is wrong with an S3 endpoint URL, or None. botocore takes any: a user:password@ is no
    S3 credential (those are AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) and fails only at the
    first request, in an error that quotes it; a query fails as "Invalid region"."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # out of range or not a number
        port = 0
    if port == 0:
        return _ENDPOINT + "; its port is not a number from 1 to 65535"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return _ENDPOINT
    if "@" in parts.netloc:
        return _ENDPOINT + "; it has a user:password@"
    if "?" in url or "#" in url:
        return _ENDPOINT + "; it has a ?query or #fragment"
    return None


_ENDPOINT = (
    "an http:// or https:// URL of a host and an optional port (http://host:8333), with no "
    "user:password@ (S3 keys go in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) and no ?query"
)


def _expected(error: dict) -> str:
    ctx = error.get("ctx") or {}
    kind = error["type"]
    if kind == "literal_error":
        return f"one of {ctx.get('expected')}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {
            "greater_than_equal": ">=",
            "greater_than": ">",
            "less_than_equal": "<=",
            "less_than": "<",
        }[kind]
        return f"a number {op} {next(iter(ctx.values()))}"
    if kind == "finite_number":
        return "a finite number (not inf or nan)"
    if kind.startswith("int"):
        return "an integer"
    if kind.startswith("float"):
        return "a number"
    if kind.startswith("bool"):
        return "true or false"
    if kind == "string_pattern_mismatch":
        return f"a value matching {ctx.get('pattern')}"
    return error["msg"]


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Read and validate every GAN_* variable; raise SettingsError listing all the bad ones."""
    environ = dict(os.environ if environ is None else environ)
    problems = [
        f"{key}: unknown setting (a typo?); see `gan-job --help` for the list"
        for key in _unknown_variables(environ)
    ]
    dataset = environ.get(PREFIX + "DATASET")
    if dataset is not None and (why := dataset_problem(dataset)):
        problems.append(f"{PREFIX}DATASET={dataset!r}: {why}")
    gan_env = {k: v for k, v in environ.items() if k.startswith(PREFIX)}
    values = _from_env(gan_env)
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        invalid = set()
        for err in exc.errors():
            if err["loc"]:
                invalid.add(str(err["loc"][0]))
                name = PREFIX + str(err["loc"][0]).upper()
                given = redact(gan_env.get(name, "<default>"))
                hint = _service_link_hint(given)
                problems.append(f"{name}={given!r}: expected {_expected(err)}{hint}")
            else:
                problems += _combination_lines(err)
        if invalid:
            problems += _combination_problems(values, invalid)
        settings = None
    if problems:
        raise SettingsError(problems)
    return settings


def _combination_lines(error: dict) -> list[str]:
    return error["msg"].removeprefix("Value error, ").splitlines()


def _combination_problems(values: dict[str, str], invalid: set[str]) -> list[str]:
    """Combination problems among the settings valid alone, so that they are reported with the
    invalid ones at once; those that involve an invalid setting are left out."""
    try:
        Settings(**{k: v for k, v in values.items() if k not in invalid})
    except ValidationError as exc:
        names = {PREFIX + name.upper() for name in invalid}
        lines = [line for err in exc.errors() if not err["loc"] for line in _combination_lines(err)]
        return [line for line in lines if not names & set(re.findall(r"\b(GAN_\w+)=", line))]
    return []


def _from_env(gan_env: dict[str, str]) -> dict[str, str]:
    """Pass values explicitly so that validation errors are attributed to their variable."""
    fields = set(Settings.model_fields)
    out = {}
    for key, value in gan_env.items():
        name = key[len(PREFIX) :].lower()
        if name in fields:
            out[name] = None if value == "" and _optional(name) else value
    return out


def _optional(name: str) -> bool:
    return Settings.model_fields[name].default is None


def _service_link_hint(value: str) -> str:
    if value.startswith(("tcp://", "udp://")):
        return " (this looks like a Kubernetes service link: set enableServiceLinks: false)"
    return ""


def describe() -> list[tuple[str, str, str, str]]:
    """(variable, type, default, description) for every setting, in declaration order."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = "" if field.default is None else str(field.default)
        rows.append(
            (PREFIX + name.upper(), _type_name(field.annotation), default, field.description or "")
        )
    return rows


def _type_name(annotation: object) -> str:
    """int, str, bool, float; `one of a, b` for a Literal; `int, optional` for `int | None`."""
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(str, args))
    if type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + ", optional"
    return getattr(annotation, "__name__", str(annotation))


def help_text() -> str:
    lines = ["gan-job: train a GAN. Every setting is an environment variable:", ""]
    for var, kind, default, desc in describe():
        lines.append(f"  {var:<28} {desc}")
        lines.append(f"  {'':<28} type: {kind}; default: {default or '(unset)'}")
    lines += [
        "",
        "Subcommands:",
        "  gan-job sample --checkpoint PATH --num N --out FILE [--seed S] [--label K]",
        "  gan-job features --dataset NAME --out FILE [--data-dir D] [--epochs E] [--image-size S] [--seed S]",
        "  gan-job sweep FILE [--parallel N] [--index I]   (rows of GAN_* settings, each its own run)",
        "  gan-job compare URI... [--out DIR]   (runs or sweep prefixes: a CSV table and a PNG)",
        "  gan-job shard SOURCE s3://bucket/prefix [--shard-size N] [--image-size PX] [--force]",
        "        (any GAN_DATASET as tar shards for GAN_DATASET=shards:s3://bucket/prefix)",
        "",
        "S3 credentials come from the standard AWS_* variables and are never logged.",
    ]
    return "\n".join(lines)


def settings_markdown() -> str:
    """docs/settings.md's table, generated from the model so the two cannot drift apart."""
    rows = ["| variable | type | default | description |", "| --- | --- | --- | --- |"]
    for var, kind, default, desc in describe():
        cells = [f"`{var}`", kind, default and f"`{default}`", desc]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def public_dict(settings: Settings) -> dict:
    """The settings as written to config.json and checkpoints: secrets in them redacted."""
    return redact_values(settings.model_dump(mode="json"))


if __name__ == "__main__":
    print(settings_markdown())
