"""Run under torchrun by test_distributed.py: a rank's last collectives as at the end of a job
(DDP steps, objects gathered from every rank), rank 0 still busy after them while the others end
through distributed.leave, as the entrypoint ends them."""

import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from job.infra import distributed

world = distributed.setup("cpu")
model = DistributedDataParallel(torch.nn.Linear(4, 4))
for _ in range(3):
    model(torch.randn(2, 4)).sum().backward()
distributed.gather_objects(world.rank, world)
if world.is_main:
    time.sleep(0.5)  # storing the last checkpoint
sys.exit(distributed.leave(0))
