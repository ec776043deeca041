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


@pytest.mark.parametrize("extra", [[], [AC]], ids=["offload", "offload+full"])
def test_activation_offload_equals_none_and_packs_every_saved_tensor(tmp_path, extra):
    """parallel.activation_offload: the same losses and gradients (on CPU save_on_cpu's copies are the tensors
    themselves), and every tensor a block saves goes through save_on_cpu's hooks (the innermost hooks win, so an
    outer counter sees none of them)."""
    ref_grads, ref_losses, _ = grads_and_losses(tmp_path / "ref", "recipe.name=lora")
    grads, losses, _ = grads_and_losses(tmp_path / "offload", "parallel.activation_offload=true", *extra,
                                        "recipe.name=lora")
    assert grads.keys() == ref_grads.keys() and all(torch.equal(g, ref_grads[n]) for n, g in grads.items())
    assert losses == ref_losses
    cfg = tiny_config(str(tmp_path / "count"), "parallel.dp_shard=1", "parallel.activation_offload=true", *extra)
    trainer = build_trainer(cfg, DistEnv())
    model = unwrap(trainer.model)
    seen = []
    h = model.tok_embeddings(torch.randint(0, 200, (2, 16))).detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        for block in model.layers.values():
            h = block(h, model.rope_cos[:16], model.rope_sin[:16])
    h.sum().backward()
    assert seen == [] and h.grad_fn is not None
