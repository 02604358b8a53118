"""RngStreams on its own: each rank's stream fixed by (seed, step, rank), saved and restored so a
resumed run draws what an uninterrupted one would, and a fresh stream under another world size."""

import torch

from job.infra.distributed import World
from job.run.rng import RngStreams


def world(rank: int = 0, size: int = 1) -> World:
    return World(rank=rank, world_size=size, local_rank=rank, device=torch.device("cpu"))


def draws(n: int = 4) -> torch.Tensor:
    return torch.randn(n)


def test_a_fresh_stream_is_fixed_by_the_seed_and_differs_by_seed_and_rank():
    RngStreams(7, world(), lambda: 0).start_fresh()
    first = draws()
    RngStreams(7, world(), lambda: 0).start_fresh()
    assert torch.equal(draws(), first)
    RngStreams(8, world(), lambda: 0).start_fresh()
    assert not torch.equal(draws(), first)
    RngStreams(7, world(1, 2), lambda: 0).start_fresh()
    assert not torch.equal(draws(), first)


def test_a_restored_stream_continues_where_the_saved_one_stood():
    streams = RngStreams(3, world(), lambda: 10)
    streams.start_fresh()
    draws()
    saved = streams.state_dict()
    expected = draws()
    torch.manual_seed(12345)  # anything drawn in between is forgotten on restore
    streams.load_state_dict(saved)
    assert torch.equal(draws(), expected)


def test_under_another_world_size_each_rank_reseeds_from_the_runs_step():
    saved_by_two_ranks = [{"cpu": torch.get_rng_state()}, {"cpu": torch.get_rng_state()}]
    RngStreams(3, world(), lambda: 40).load_state_dict(saved_by_two_ranks)
    after_restore = draws()
    RngStreams(3, world(), lambda: 0).reseed(40)
    assert torch.equal(draws(), after_restore)
    RngStreams(3, world(), lambda: 0).reseed(41)
    assert not torch.equal(draws(), after_restore)
