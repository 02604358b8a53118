"""Run under torchrun by test_distributed.py: trains with the real Trainer, then dumps what the
test compares across ranks (each rank's G and D weights, and a distributed FID)."""

import sys
from pathlib import Path

import torch

from job.gan.networks import unwrap
from job.infra import distributed
from job.quality import evaluator, extractors, reference
from job.run.build import build
from job.run.train import Trainer
from job.settings import load_settings
from tests.helpers import TinyFeatures

out = Path(sys.argv[1])
settings = load_settings()
world = distributed.setup("cpu")
trainer = Trainer(build(settings, world))
trainer.resume()
trainer.wrap()
for _ in range(settings.max_steps):
    trainer.gan_step.train(*trainer.source.next(), trainer.budget.step)
    trainer.budget.state.advance(settings.batch_size * world.world_size)
trainer.close()

torch.manual_seed(0)
extractor = extractors.Extractor(extractors.ChannelAdapter(TinyFeatures(1), 1), 32, "tiny", "tiny")
images = (torch.rand(64, 1, 28, 28) * 255).to(torch.uint8)
real = reference.real_statistics(extractor, images, world.device)
fid = evaluator.compute_fid(
    extractor, real, trainer.nets.g_ema, 16, 0, 48, seed=5, device=world.device,
    rank=world.rank, world_size=world.world_size, batch=10,
)  # fmt: skip
torch.save(
    {"g": unwrap(trainer.nets.g).state_dict(), "d": unwrap(trainer.nets.d).state_dict(),
     "fid": fid, "g_ema": trainer.nets.g_ema.state_dict(), "arch": trainer.nets.arch.to_dict()},
    out / f"rank{world.rank}-of-{world.world_size}.pt",
)  # fmt: skip
distributed.leave(0)
