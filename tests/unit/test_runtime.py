"""DistEnv parsing and the learning-rate schedule (one process)."""

import math

import pytest

from meshtune.runtime.env import DistEnv
from meshtune.runtime.trainer import lr_lambda


def test_torchrun_environment():
    env = DistEnv.from_environ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"},
                               use_cuda=False)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert env.device.type == "cpu" and env.backend == "gloo" and not env.is_main


def test_slurm_environment_without_torchrun():
    env = DistEnv.from_environ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1"}, use_cuda=False)
    assert (env.rank, env.world_size, env.local_rank) == (3, 4, 1)


def test_torchrun_wins_over_slurm():
    env = DistEnv.from_environ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "7", "SLURM_NTASKS": "16"},
                               use_cuda=False)
    assert (env.rank, env.world_size) == (0, 2)


def test_single_process_defaults():
    env = DistEnv.from_environ({}, use_cuda=False)
    assert (env.rank, env.world_size, env.is_main) == (0, 1, True)


@pytest.mark.parametrize("environ,match", [({"RANK": "x", "WORLD_SIZE": "2"}, "RANK"),
                                           ({"RANK": "2", "WORLD_SIZE": "2"}, "outside world size")])
def test_bad_environment_is_named(environ, match):
    with pytest.raises(ValueError, match=match):
        DistEnv.from_environ(environ, use_cuda=False)


def test_warmup_then_cosine_to_min_ratio():
    f = [lr_lambda(s, warmup=10, total=110, schedule="cosine", min_ratio=0.1) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup reaches the peak
    assert all(a <= b for a, b in zip(f[:10], f[1:10], strict=False))
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))  # monotone decay
    assert f[110] == pytest.approx(0.1)


def test_constant_schedule_after_warmup():
    assert [lr_lambda(s, 2, 10, "constant", 0.1) for s in (0, 1, 5, 9)] == [0.5, 1.0, 1.0, 1.0]
