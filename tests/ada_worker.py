"""Run under torchrun by test_ada.py: trains with the real parts and GAN_AUGMENT=ada, then saves
this rank's p after every step, for the test to compare across ranks."""

import json
import sys
from pathlib import Path

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
history = []
for _ in range(settings.max_steps):
    trainer.gan_step.train(*trainer.source.next(), trainer.budget.step)
    trainer.budget.state.advance(settings.batch_size * world.world_size)
    history.append(trainer.gan_step.ada.p)
trainer.close()
(out / f"p-rank{world.rank}.json").write_text(json.dumps(history))
distributed.leave(0)
