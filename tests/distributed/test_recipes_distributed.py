"""PEFT recipes on real gloo ranks: LoRA under FSDP2, adapters and prefix tuning under DDP, each against the
same recipe in one process from the same seed."""

import pytest

from tests.distributed.cases import (
    full_params,
    layout,
    max_diff,
    reference_trainer,
    step_losses,
    tiny_config,
)

TOL = 1e-5


def recipe_vs_reference(run_dir, recipe, dp_replicate, dp_shard):
    from meshtune.runtime.run import build_trainer

    cfg = tiny_config(run_dir, *layout(dp_replicate, dp_shard, 2), f"recipe.name={recipe}")
    ref, trainer = reference_trainer(cfg), build_trainer(cfg)
    before = full_params(trainer.model)
    ref.forward_backward(ref.next_micro_batches())
    trainer.forward_backward(trainer.next_micro_batches())
    grads = full_grads_or_none(trainer.model)
    grad_diff = max_diff({k: v for k, v in grads.items() if v is not None},
                         {k: v for k, v in full_grads_or_none(ref.model).items() if v is not None})
    for t in (ref, trainer):
        t.optimizer.zero_grad(set_to_none=True)
    losses, ref_losses = step_losses(trainer, 3), step_losses(ref, 3)
    after = full_params(trainer.model)
    from meshtune.runtime.data_parallel import unwrap

    trainable = {n for n, p in unwrap(trainer.model).named_parameters() if p.requires_grad}
    changed = {n for n in after if not (after[n] == before[n]).all()}
    return {"grad_diff": grad_diff, "with_grad": {k for k, v in grads.items() if v is not None},
            "trainable": trainable, "changed": changed, "losses": losses, "ref_losses": ref_losses,
            "param_diff": max_diff(after, full_params(ref.model)),
            "optim_params": sum(len(g["params"]) for g in trainer.optimizer.param_groups)}


def full_grads_or_none(model):
    from meshtune.runtime.data_parallel import unwrap
    from tests.distributed.cases import full

    return {n: (full(p.grad).detach().clone() if p.grad is not None else None)
            for n, p in unwrap(model).named_parameters()}


@pytest.mark.parametrize("recipe,dp_replicate,dp_shard", [("lora", 1, 2), ("adapters", 2, 1), ("prefix", 2, 1),
                                                          ("lora", 2, 1)],
                         ids=["lora-fsdp2", "adapters-ddp", "prefix-ddp", "lora-ddp"])
def test_peft_recipe_matches_single_process(rank_pool, tmp_path, recipe, dp_replicate, dp_shard):
    marker = {"lora": "lora_", "adapters": "adapter", "prefix": "prefix_"}[recipe]
    for r in rank_pool(2).run(recipe_vs_reference, str(tmp_path), recipe, dp_replicate, dp_shard):
        assert r["trainable"] and all(marker in n for n in r["trainable"])  # only the recipe's parameters train
        assert r["with_grad"] == r["trainable"]  # frozen base weights get no gradient at all
        assert r["changed"] == r["trainable"]  # the base is bitwise unchanged after training
        assert r["optim_params"] == len(r["trainable"])  # and has no optimizer state
        assert r["grad_diff"] < TOL, r
        assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"], strict=True)) < TOL, r
        assert r["param_diff"] < 1e-4, r


def recipe_tp_vs_reference(run_dir, recipe, sp):
    from meshtune.runtime.run import build_trainer
    from tests.distributed.test_tensor_parallel import tp_layout

    cfg = tiny_config(run_dir, *tp_layout(1, 2, 4, sp), f"recipe.name={recipe}")
    ref, trainer = reference_trainer(cfg), build_trainer(cfg)
    before = full_params(trainer.model)
    losses, ref_losses = step_losses(trainer, 3), step_losses(ref, 3)
    after = full_params(trainer.model)
    lora_b = trainer.model.layers["0"].attention.wq.lora_b.weight if recipe == "lora" else None
    return {"losses": losses, "ref_losses": ref_losses, "param_diff": max_diff(after, full_params(ref.model)),
            "changed": {n for n in after if not (after[n] == before[n]).all()},
            "b_local_rows": lora_b.to_local().shape[0] if lora_b is not None else None}


@pytest.mark.parametrize("recipe,sp", [("lora", False), ("lora", True), ("adapters", False), ("prefix", False),
                                       ("prefix", True)],
                         ids=["lora-tp2", "lora-tp2-sp", "adapters-tp2", "prefix-tp2", "prefix-tp2-sp"])
def test_peft_recipe_under_tensor_parallel(rank_pool, tmp_path, recipe, sp):
    marker = {"lora": "lora_", "adapters": "adapter", "prefix": "prefix_"}[recipe]
    for r in rank_pool(2).run(recipe_tp_vs_reference, str(tmp_path), recipe, sp):
        assert r["changed"] and all(marker in n for n in r["changed"])  # the base stays frozen
        if recipe == "lora":
            assert r["b_local_rows"] == 32 // 2  # B of a colwise layer is split like the layer's rows
        assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"], strict=True)) < TOL, r
        assert r["param_diff"] < 1e-4, r
