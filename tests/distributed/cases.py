"""Shared helpers for distributed cases: a tiny config and full (gathered) gradients and parameters.

Every distributed result is compared with a single-process reference built in the same rank from the
same seed (`DistEnv()` = world size 1, no process group), so the tests need no stored expectations.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.distributed.tensor import DTensor

from meshtune.runtime.data_parallel import unwrap
from meshtune.runtime.env import DistEnv
from meshtune.runtime.run import build_trainer
from meshtune.schema import Config, load_config

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=32",
        "data.task=reverse", "data.seq_len=24", "data.num_train=256", "data.num_eval=16",
        "train.steps=6", "train.global_batch_size=8", "train.micro_batch_size=8", "train.log_every=1",
        "train.eval_every=0", "train.eval_batches=0", "optim.warmup_steps=2", "optim.lr=1e-2",
        "checkpoint.resume=never", "checkpoint.save_final=false", "metrics.progress=false"]


def tiny_config(run_dir: str, *overrides: str) -> Config:
    return load_config(None, [*TINY, f"run_dir={run_dir}", *overrides])


def layout(dp_replicate: int, dp_shard: int, micro: int) -> list[str]:
    return [f"parallel.dp_replicate={dp_replicate}", f"parallel.dp_shard={dp_shard}",
            f"train.micro_batch_size={micro}"]


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_grads(model) -> dict[str, torch.Tensor]:
    return {n: full(p.grad).detach().clone() for n, p in unwrap(model).named_parameters(remove_duplicate=False)}


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: full(p).detach().clone() for n, p in unwrap(model).named_parameters(remove_duplicate=False)}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def reference_trainer(cfg: Config):
    """The same run in this process alone (world size 1), micro-batch = the whole global batch."""
    ref = replace(cfg, train=replace(cfg.train, micro_batch_size=cfg.train.global_batch_size),
                  parallel=replace(cfg.parallel, dp_replicate=1, dp_shard=1, tp=1, pp=1, vocab_parallel=False,
                                   fsdp_unit="block", cpu_offload=False))
    return build_trainer(ref, DistEnv())


def step_losses(trainer, steps: int) -> list[float]:
    """Run `steps` optimizer steps; the global mean token loss of each (reduced over dp)."""
    losses = []
    for _ in range(steps):
        loss_sum, tokens, _ = trainer.train_step(trainer.next_micro_batches())
        losses.append(trainer.mean_loss(loss_sum, tokens))
    return losses
