"""The CUDA path (NCCL, bf16 autocast, torch.compile): run on a machine with GPUs, skipped elsewhere."""

import subprocess
import sys

import pytest

from tests.distributed.cases import tiny_config


@pytest.mark.gpu
def test_single_gpu_bf16_trains(tmp_path):
    import torch

    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer

    env = DistEnv.from_environ({})
    assert env.device.type == "cuda" and env.backend == "nccl"
    trainer = build_trainer(tiny_config(str(tmp_path), "parallel.dp_shard=1", "train.steps=20"), env)
    assert trainer.autocast  # dtype auto -> bf16 autocast on GPU
    history = trainer.fit()["history"]
    losses = [r["loss"] for r in history if "loss" in r]
    assert losses[-1] < losses[0]
    assert next(trainer.model.parameters()).device.type == "cuda"
    assert torch.cuda.max_memory_allocated() > 0


@pytest.mark.gpu
def test_compile_matches_eager_loss(tmp_path):
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer
    from tests.distributed.cases import step_losses

    env = DistEnv.from_environ({})
    base = ["parallel.dp_shard=1", "train.dtype=fp32"]
    eager = step_losses(build_trainer(tiny_config(str(tmp_path / "a"), *base), env), 3)
    compiled = step_losses(build_trainer(tiny_config(str(tmp_path / "b"), *base, "parallel.compile=true"), env), 3)
    assert max(abs(a - b) for a, b in zip(eager, compiled, strict=True)) < 1e-3


@pytest.mark.gpu
def test_launch_two_gpus_nccl(tmp_path):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    out = subprocess.run([sys.executable, "-m", "meshtune", "launch", "pretrain/tiny", "--nproc-per-node", "2",
                          f"run_dir={tmp_path}", "train.steps=20", "metrics.progress=false"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "checkpoints" / "step_000020" / "meta.json").is_file()
