"""Run by test_global_batch.py, under torchrun or as one process: the real Trainer's first step
on the same noise whatever the world size, then what the test compares (this rank's real
images, the gradients that step left and the weights it made)."""

import sys
from pathlib import Path

import torch

from job.gan.networks import unwrap
from job.infra import distributed
from job.run.build import build
from job.run.train import Trainer
from job.settings import load_settings

out = Path(sys.argv[1])
settings = load_settings()
world = distributed.setup("cpu")
trainer = Trainer(build(settings, world))
trainer.resume()
trainer.wrap()
real, labels = trainer.source.next()
# the noise of the whole global batch from one stream: rank r's share comes after r shares
torch.manual_seed(7)
torch.randn(world.rank * real.shape[0] * settings.latent_dim)
trainer.gan_step.train(real, labels, 0)
g, d = unwrap(trainer.nets.g), unwrap(trainer.nets.d)
torch.save(
    {"real": real, "micro_batches": trainer.gan_step.micro_batches,
     "grads": {f"{k}.{n}": p.grad for k, m in (("g", g), ("d", d)) for n, p in m.named_parameters()},
     "weights": {f"{k}.{n}": p.detach() for k, m in (("g", g), ("d", d)) for n, p in m.named_parameters()}},
    out / f"rank{world.rank}.pt",
)  # fmt: skip
trainer.close()
distributed.leave(0)
