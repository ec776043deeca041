"""Shared pytest setup: the `gpu` marker and the `rank_pool` fixture.

torch is imported lazily so that CLI unit tests do not pay for it.
"""

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped when none is available")


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def rank_pool():
    """Factory: `rank_pool(world_size)` returns a session-wide RankPool of that size.

    Pools start on first use and stay up for the session, so a case pays only for itself.
    Case functions must be module-level in an importable module (e.g. tests.distributed.test_ddp).
    """
    from tests.rankpool import RankPool

    pools: dict[int, RankPool] = {}

    def get(world_size: int) -> RankPool:
        if world_size not in pools:
            pools[world_size] = RankPool(world_size)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()
