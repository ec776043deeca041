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


_POOLS: dict = {}  # world size -> RankPool, for the session (pytest runs one session per process)


@pytest.fixture(scope="session")
def rank_pool():
    """Factory: `rank_pool(world_size)` returns a session-wide RankPool of that size.

    Pools start on first use, so a case pays only for itself; their ranks stop at the end of each test
    module (`_stop_idle_pools`) and respawn in ~0.1 s when the next module needs them.
    Case functions must be module-level in an importable module (e.g. tests.distributed.test_ddp).
    """
    from tests.rankpool import RankPool

    def get(world_size: int) -> RankPool:
        if world_size not in _POOLS:
            _POOLS[world_size] = RankPool(world_size)
        return _POOLS[world_size]

    yield get
    for pool in _POOLS.values():
        pool.close()


@pytest.fixture(scope="module", autouse=True)
def _stop_idle_pools():
    """Idle ranks are not free: each holds the gloo groups its cases left, whose threads wake on their own.
    Stopping them between modules keeps them from slowing the subprocess tests that follow."""
    yield
    for pool in _POOLS.values():
        pool.close()
