"""Stacked compression through the one trainer: the bundled compress/prune-distill config (a pruned student
distilled from its unpruned teacher), in one process on a tiny teacher trained here."""

from __future__ import annotations

import pytest
import torch

from meshtune.recipes.distill import kd_loss
from meshtune.recipes.prune import MASK
from meshtune.runtime.env import DistEnv
from meshtune.runtime.grads import summed_loss
from meshtune.runtime.run import build_trainer
from meshtune.schema import load_config
from tests.distributed.cases import TINY, tiny_config

SHAPE = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=32"]
STEPS = 8


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(run dir, merged file, loaded model) of a tiny dense model trained a few steps on sort."""
    from meshtune.artifacts import find, load_model
    from meshtune.export import export

    root = tmp_path_factory.mktemp("stack")
    build_trainer(tiny_config(str(root / "teacher"), "data.task=sort", "train.steps=4",
                              "checkpoint.save_final=true"), DistEnv()).fit()
    (merged,) = export(root / "teacher", "merged", quiet=True)
    return root / "teacher", merged, load_model(find(merged), torch.device("cpu"))


def stacked(run_dir, teacher, recipe_name="prune+distill"):
    """The bundled compress/prune-distill recipe section on the tiny shape: one-shot-ramped over 4 steps."""
    run, merged, _ = teacher
    small = [o for o in TINY if not o.startswith(("model.", "data.task"))]
    return build_trainer(load_config("compress/prune-distill", [
        *SHAPE, *small, "data.task=sort", f"run_dir={run_dir}", f"init_from={merged}", f"train.steps={STEPS}",
        f"recipe.name={recipe_name}", f"recipe.distill.teacher={run}", "recipe.prune.end_step=4",
        "recipe.prune.frequency=2"]), DistEnv())


def test_pruned_student_keeps_exact_masks_and_learns_from_the_dense_teacher(teacher, tmp_path):
    trainer = stacked(tmp_path / "kd", teacher)
    assert [r.name for r in trainer.recipes] == ["prune", "distill"]
    cfg = trainer.cfg.recipe
    assert (cfg.prune.sparsity, cfg.distill.alpha) == (0.5, 0.5)  # the bundled settings, not overrides
    history = [r["loss"] for r in trainer.fit()["history"] if "loss" in r]
    alone = stacked(tmp_path / "alone", teacher, "prune")
    history_alone = [r["loss"] for r in alone.fit()["history"] if "loss" in r]

    # masks: exactly half of the target weights are zero, every masked weight is zero after the last step
    for t in (trainer, alone):
        pruned = {n: m for n, m in t.model.named_modules() if MASK in m._buffers}
        assert len(pruned) == 2 * 7
        total = sum(m.weight.numel() for m in pruned.values())
        assert sum(int((~m.weight_mask).sum()) for m in pruned.values()) == total // 2
        assert all(torch.all(m.weight[~m.weight_mask] == 0) for m in pruned.values())

    # the teacher stayed dense and untouched: the student's zeros are not the teacher's
    recipe = trainer.recipes[1]
    dense = teacher[2].state_dict()
    for k, v in recipe.teacher.state_dict().items():
        torch.testing.assert_close(v, dense[k], rtol=0, atol=0)
    assert not any(MASK in m._buffers for m in recipe.teacher.modules())

    # the KD term is in the loss the trainer differentiates: the recipe chain equals the hand computation
    mb = trainer.next_micro_batches()[0]
    trainer.model.train()
    logits = trainer.model(mb["input_ids"])
    task = summed_loss(logits, mb["labels"])
    total = task
    for r in trainer.recipes:
        total = r.loss(total, logits, mb)
    with torch.no_grad():
        t_logits = teacher[2](mb["input_ids"])
    kd = kd_loss(logits, t_logits, mb["labels"] != -100, 1.0)
    assert kd.item() > 1e-3  # the pruned student no longer matches its dense teacher
    torch.testing.assert_close(total, 0.5 * task + 0.5 * kd)
    # ... and its gradient reaches the student: it differs from the task loss's alone
    g_total = torch.autograd.grad(total, trainer.model.layers["0"].feed_forward.w1.weight, retain_graph=True)[0]
    g_task = torch.autograd.grad(0.5 * task, trainer.model.layers["0"].feed_forward.w1.weight)[0]
    assert (g_total - g_task).abs().max() > 1e-6

    # same init, data and masks schedule: the first step's loss is the same, later ones differ by the KD term
    assert history[0] == pytest.approx(history_alone[0], abs=1e-6)
    assert max(abs(a - b) for a, b in zip(history[2:], history_alone[2:], strict=True)) > 1e-4
