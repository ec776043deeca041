"""Distillation on real gloo ranks: the teacher sharded by FSDP2 or replicated, under a DDP or FSDP2 student,
against the same run in one process from the same seed (where the teacher is one plain module)."""

import pytest

from tests.distributed.cases import (
    full_grads,
    full_params,
    layout,
    max_diff,
    reference_trainer,
    step_losses,
    tiny_config,
)

TOL = 1e-5


def write_teacher(path, **model):
    """A random dim-64 decoder (4x the tiny student) as a merged-export safetensors file; `model`: more
    ModelConfig fields."""
    import dataclasses
    import json

    import torch

    from meshtune.config import ModelConfig
    from meshtune.export import save_safetensors
    from meshtune.models import build_model

    torch.manual_seed(7)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, **model)
    model = build_model(cfg, 264)
    meta = {"format": "pt", "meshtune.model": json.dumps({**dataclasses.asdict(cfg), "vocab_size": 264})}
    return save_safetensors(model.state_dict(), path, meta)


def distill_vs_reference(run_dir, teacher, dp_replicate, dp_shard, shard, hidden):
    from torch.distributed.tensor import DTensor

    from meshtune.runtime.run import build_trainer

    cfg = tiny_config(run_dir, *layout(dp_replicate, dp_shard, 2), "recipe.name=distill",
                      f"recipe.distill.teacher={teacher}", f"recipe.distill.teacher_shard={shard}",
                      "recipe.distill.alpha=0.4", "recipe.distill.temperature=2", f"recipe.distill.hidden={hidden}")
    ref, trainer = reference_trainer(cfg), build_trainer(cfg)
    w = trainer.recipes[0].teacher.layers["0"].attention.wq.weight
    ref.forward_backward(ref.next_micro_batches())
    trainer.forward_backward(trainer.next_micro_batches())
    grad_diff = max_diff(full_grads(trainer.model), full_grads(ref.model))
    for t in (ref, trainer):
        t.optimizer.zero_grad(set_to_none=True)
    losses, ref_losses = step_losses(trainer, 3), step_losses(ref, 3)
    return {"grad_diff": grad_diff, "losses": losses, "ref_losses": ref_losses,
            "param_diff": max_diff(full_params(trainer.model), full_params(ref.model)),
            "teacher_rows": (w.to_local() if isinstance(w, DTensor) else w).shape[0],
            "student": type(trainer.model).__name__}


@pytest.mark.parametrize("dp_replicate,dp_shard,shard,hidden,rows", [
    (2, 1, "fsdp", 0.0, 32), (1, 2, "replicate", 0.0, 64), (1, 2, "auto", 0.5, 32), (2, 1, "auto", 0.5, 64)],
    ids=["ddp-student-fsdp-teacher", "fsdp-student-replicated-teacher", "fsdp-both-hidden",
         "ddp-student-replicated-teacher-hidden"])
def test_distill_matches_single_process(rank_pool, tmp_path, dp_replicate, dp_shard, shard, hidden, rows):
    teacher = write_teacher(tmp_path / "teacher.safetensors")
    for r in rank_pool(2).run(distill_vs_reference, str(tmp_path / "run"), str(teacher), dp_replicate, dp_shard,
                              shard, hidden):
        assert r["teacher_rows"] == rows, r  # wq is 64 x 64: 32 rows per rank when the teacher is sharded
        assert r["student"] == ("DistributedDataParallel" if dp_replicate == 2 else "FSDPTransformer"), r
        assert r["grad_diff"] < TOL, r
        assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"], strict=True)) < TOL, r
        assert r["param_diff"] < 1e-4, r
