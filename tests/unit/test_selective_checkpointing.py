"""Activation checkpointing modes (parallel.activation_checkpointing, ac_every, ac_mode) against no checkpointing,
one process, fp32: the same losses and gradients, and fewer bytes saved for backward."""

import pytest
import torch

from meshtune.config import ConfigError
from meshtune.runtime.data_parallel import unwrap
from meshtune.runtime.env import DistEnv
from meshtune.runtime.run import build_trainer
from meshtune.schema import load_config
from tests.distributed.cases import full, step_losses, tiny_config

AC = "parallel.activation_checkpointing=true"
MODES = {"full": [AC], "every2": [AC, "parallel.ac_every=2"], "selective_op": [AC, "parallel.ac_mode=selective_op"],
         "selective-every2": [AC, "parallel.ac_mode=selective_op", "parallel.ac_every=2"]}


def grads_and_losses(run_dir, *overrides):
    torch.manual_seed(0)
    trainer = build_trainer(tiny_config(str(run_dir), "parallel.dp_shard=1", "model.n_layers=4", *overrides),
                            DistEnv())
    trainer.forward_backward(trainer.next_micro_batches())
    grads = {n: full(p.grad).clone() for n, p in unwrap(trainer.model).named_parameters() if p.requires_grad}
    trainer.engine.zero_grad()
    checkpointed = [n for n, b in unwrap(trainer.model).layers.items() if getattr(b, "activation_checkpointing", 0)]
    return grads, step_losses(trainer, 3), checkpointed


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("recipe", ["", "recipe.name=lora"])
def test_checkpointing_modes_equal_none(tmp_path, mode, recipe):
    extra = [recipe] if recipe else []
    ref_grads, ref_losses, none = grads_and_losses(tmp_path / "ref", *extra)
    grads, losses, checkpointed = grads_and_losses(tmp_path / mode, *MODES[mode], *extra)
    assert none == [] and checkpointed == (["0", "2"] if "every2" in mode else ["0", "1", "2", "3"])
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name  # recomputation repeats the same kernels
    assert losses == ref_losses


@pytest.mark.parametrize("overrides,match", [
    (["parallel.ac_every=0", AC], r"^parallel\.ac_every: must be >= 1"),
    (["parallel.ac_every=2"], r"^parallel\.ac_every / parallel\.ac_mode: .*activation_checkpointing=true"),
    (["parallel.ac_mode=everything", AC], r"parallel\.ac_mode"),
])
def test_bad_checkpointing_settings(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["data.task=sort", *overrides])
