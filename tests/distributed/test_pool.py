"""Tests of the RankPool harness itself: ordering, collectives, seeding, failures, timeouts.

    pytest tests/distributed/test_pool.py -q
"""

import os
import pickle
import random
import time

import pytest
import torch
import torch.distributed as dist

from tests.rankpool import _GRACE_S, RankError, RankPool

SHORT_TIMEOUT_S = 4


# Cases: module-level so ranks can import them by qualified name; not named test_* on purpose.


def case_identity():
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    return dist.get_rank(), dist.get_world_size(), env, torch.get_num_threads()


def case_all_reduce_rank():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t


def case_random_draws():
    return torch.randn(4), random.random()


def case_nested_tensors(scale):
    w = torch.ones(3, requires_grad=True)
    y = w * scale
    return {"y": y, "pair": (w, [y.sum()]), "rank": dist.get_rank()}


def case_raise_on_rank_1():
    if dist.get_rank() == 1:
        raise ValueError("boom-from-rank-1")
    return "ok"


def case_rank_0_waits_alone():
    if dist.get_rank() == 0:
        dist.barrier()  # rank 1 never joins: gloo times out on rank 0


def case_rank_1_sleeps():
    if dist.get_rank() == 1:
        time.sleep(600)


def case_rank_1_dies():
    if dist.get_rank() == 1:
        os._exit(3)


# Tests.


@pytest.fixture(scope="module")
def short_pool():
    pool = RankPool(2, timeout_s=SHORT_TIMEOUT_S)
    yield pool
    pool.close()


def test_results_in_rank_order(rank_pool):
    results = rank_pool(2).run(case_identity)
    assert [r[:2] for r in results] == [(0, 2), (1, 2)]
    assert [r[2]["RANK"] for r in results] == ["0", "1"]
    assert all(r[2]["WORLD_SIZE"] == r[2]["LOCAL_WORLD_SIZE"] == "2" for r in results)
    assert [r[3] for r in results] == [1, 1]


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce_sums_ranks(rank_pool, world_size):
    results = rank_pool(world_size).run(case_all_reduce_rank)
    expected = float(sum(range(world_size)))
    assert [t.item() for t in results] == [expected] * world_size


def test_seed_is_shared_across_ranks_and_reset_per_case(rank_pool):
    pool = rank_pool(2)
    first = pool.run(case_random_draws)
    pool.run(case_all_reduce_rank)  # an unrelated case in between must not shift the streams
    second = pool.run(case_random_draws)
    for (t0, r0), (t1, r1) in [(first[0], first[1]), (first[0], second[0]), (first[0], second[1])]:
        assert torch.equal(t0, t1) and r0 == r1


def test_results_are_detached_cpu_tensors(rank_pool):
    results = rank_pool(2).run(case_nested_tensors, scale=2.0)
    for rank, out in enumerate(results):
        assert out["rank"] == rank
        assert torch.equal(out["y"], torch.full((3,), 2.0))
        w, (total,) = out["pair"]
        assert not (w.requires_grad or out["y"].requires_grad or total.requires_grad)
        assert total.item() == 6.0


def test_error_names_rank_and_pool_recovers(rank_pool):
    pool = rank_pool(2)
    with pytest.raises(RankError, match="boom-from-rank-1") as info:
        pool.run(case_raise_on_rank_1)
    assert info.value.rank == 1 and "rank 1" in str(info.value)
    assert "ValueError" in info.value.remote_traceback
    assert [r[0] for r in pool.run(case_identity)] == [0, 1]


def test_hung_collective_fails_fast(short_pool):
    with pytest.raises(RankError) as info:
        short_pool.run(case_rank_0_waits_alone)
    assert info.value.ranks == [0] and "rank 0" in str(info.value)
    # gloo's own timeout fired, and it is the pool's short one (not gloo's 30 min default, nor the pool's reply
    # deadline): what makes the failure fast, checked without reading a clock
    assert f"Timed out waiting {SHORT_TIMEOUT_S * 1000}ms" in info.value.remote_traceback, info.value.remote_traceback
    assert "no answer" not in str(info.value)


def test_silent_rank_times_out_by_name(short_pool):
    # the pool's deadline for replies: timeout_s plus the grace that lets gloo's error (with a traceback) come first
    with pytest.raises(RankError, match=f"^rank 1: no answer within {SHORT_TIMEOUT_S + _GRACE_S:.0f} s$") as info:
        short_pool.run(case_rank_1_sleeps)
    assert info.value.ranks == [1]


def test_dead_rank_is_detected(short_pool):
    with pytest.raises(RankError, match="died") as info:
        short_pool.run(case_rank_1_dies)
    assert info.value.ranks == [1] and "3" in str(info.value)
    assert [r[0] for r in short_pool.run(case_identity)] == [0, 1]


def test_unpicklable_case_fails_in_the_parent(rank_pool):
    with pytest.raises((pickle.PicklingError, AttributeError), match="lambda"):
        rank_pool(2).run(lambda: 0)
