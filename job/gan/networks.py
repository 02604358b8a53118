"""G, D, the EMA generator and their optimizers: built, wrapped for DDP and compile, averaged,
saved and restored together."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from job.gan.models import Arch, build_discriminator, build_generator
from job.infra.errors import CheckpointError


class Networks:
    def __init__(
        self,
        arch: Arch,
        device: torch.device,
        *,
        seed: int,
        lr_g: float,
        lr_d: float,
        betas: tuple[float, float],
        ema_decay: float,
        channels_last: bool,
        fused_adam: bool,
    ):
        self.arch, self.device, self.ema_decay = arch, device, ema_decay
        self.base_lr = {"g": lr_g, "d": lr_d}
        self.lr_factors = [1.0, 1.0]  # the budget's (rollbacks, decay), a schedule's (follow)
        self.ema_beta: float | None = None  # a schedule's per-step EMA decay (follow)
        torch.manual_seed(seed)  # identical initial weights on every rank
        self.g = build_generator(arch).to(device)
        self.d = build_discriminator(arch).to(device)
        self.channels_last = channels_last and arch.model == "dcgan"
        if self.channels_last:
            self.g.to(memory_format=torch.channels_last)
            self.d.to(memory_format=torch.channels_last)
        self.g_ema = copy.deepcopy(self.g).requires_grad_(False)
        fast = {}
        if fused_adam:
            fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=lr_g, betas=betas, **fast)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=lr_d, betas=betas, **fast)

    def wrap(
        self, distributed: bool, sync_batchnorm: bool, compile: bool, penalties: bool = False
    ) -> None:
        """DDP for both nets (BatchNorm buffers stay per rank, or SyncBatchNorm), then compile:
        G alone when D's penalties (R1, R2) need a double backward, which torch.compile lacks."""
        if distributed:
            if sync_batchnorm and self.device.type == "cuda":
                self.g = nn.SyncBatchNorm.convert_sync_batchnorm(self.g)
                self.d = nn.SyncBatchNorm.convert_sync_batchnorm(self.d)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.g = DDP(self.g, device_ids=ids, broadcast_buffers=False)
            self.d = DDP(self.d, device_ids=ids, broadcast_buffers=False)
        if compile:
            self.g = torch.compile(self.g)
        if compile and not penalties:
            self.d = torch.compile(self.d)

    def scale_learning_rates(self, factor: float) -> None:
        """The configured rates times factor and a schedule's factor (restored optimizers keep
        the configured rates)."""
        self.lr_factors[0] = factor
        for opt, lr in ((self.opt_g, self.base_lr["g"]), (self.opt_d, self.base_lr["d"])):
            for group in opt.param_groups:
                group["lr"] = lr * factor * self.lr_factors[1]

    def follow(self, lr_factor: float, beta2: float, ema_beta: float) -> None:
        """A schedule's values for the next step (job/gan/r3schedule.py): its learning-rate
        factor (on top of scale_learning_rates'), Adam's beta2 and the EMA's decay."""
        self.lr_factors[1], self.ema_beta = lr_factor, ema_beta
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["betas"] = (group["betas"][0], beta2)
        self.scale_learning_rates(self.lr_factors[0])

    def learning_rates(self) -> dict[str, float]:
        """The rates the optimizers hold now, for the log record."""
        return {
            f"lr_{k}": opt.param_groups[0]["lr"]
            for k, opt in (("g", self.opt_g), ("d", self.opt_d))
        }

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        g = unwrap(self.g)
        # warm-up: early on the EMA follows G closely instead of lingering at the random init
        decay = min(self.ema_decay, (1 + step) / (10 + step))
        if self.ema_beta is not None:
            decay = self.ema_beta  # a schedule ramps the half-life up instead
        torch._foreach_lerp_(list(self.g_ema.parameters()), list(g.parameters()), 1.0 - decay)
        for eb, gb in zip(self.g_ema.buffers(), g.buffers(), strict=True):
            eb.copy_(gb)

    def state_dict(self) -> dict:
        return {
            "g": unwrap(self.g).state_dict(),
            "d": unwrap(self.d).state_dict(),
            "g_ema": self.g_ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        for name, net in (("g", unwrap(self.g)), ("d", unwrap(self.d)), ("g_ema", self.g_ema)):
            _check_fit(name, net, state[name])
        unwrap(self.g).load_state_dict(state["g"])
        unwrap(self.d).load_state_dict(state["d"])
        self.g_ema.load_state_dict(state["g_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])


def _check_fit(name: str, net: nn.Module, saved: dict) -> None:
    """Refuses, by name, weights that do not fit the model built from the settings, rather than
    with torch's size-mismatch traceback."""
    own = net.state_dict()
    if saved.keys() != own.keys():
        odd = sorted(saved.keys() ^ own.keys())
        raise CheckpointError(f"its {name} has other layers than this model ({', '.join(odd[:4])})")
    for key, tensor in saved.items():
        if tensor.shape != own[key].shape:
            why = _OLD_PROJECTION if name == "d" and key.startswith("head.") else ""
            raise CheckpointError(
                f"its {name}.{key} is {tuple(tensor.shape)}, this model's is "
                f"{tuple(own[key].shape)}{why}"
            )


_OLD_PROJECTION = (
    ": the checkpoint's projection discriminator sums its last block over space, as gan-job did "
    "before the 0.3 recipes; this version's sees the whole map and cannot continue it. Start "
    "another run (GAN_RUN_ID), or continue this one with the gan-job version that made it; "
    "its generator still samples and evaluates"
)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DDP wrappers."""
    module = getattr(module, "_orig_mod", module)
    return module.module if isinstance(module, DDP) else module


def no_sync(module: nn.Module):
    """DDP's no_sync for a (compiled) DDP module; nothing for a plain one."""
    module = getattr(module, "_orig_mod", module)
    return module.no_sync() if isinstance(module, DDP) else contextlib.nullcontext()
