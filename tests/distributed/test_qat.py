"""QAT on real gloo ranks: the qat and lora+qat recipes under FSDP2 and DDP against the same recipe in one
process from the same seed (fake quantization sees the full weight FSDP2 gathers for the forward).

Each step is compared from the same weights: before every distributed step the single-process reference gets
the distributed model's current (gathered) parameters, then both compute the step's loss and gradients. Free-
running trajectories cannot be compared to 1e-5: fake quantization rounds weights and activations, so the 1e-7
differences of another summation order (micro-batching, the data-parallel reduction) flip a rounding now and
then, and the losses drift apart by ~1e-4 within three steps (measured in ONE process between micro-batch 8
and micro-batch 2, and between torchao's per-forward fake quantization and the cached one).
"""

import pytest

from tests.distributed.cases import full_params, layout, max_diff, reference_trainer, tiny_config

TOL = 1e-5


def qat_steps_vs_reference(run_dir, recipe, dp_replicate, dp_shard, steps=3):
    import torch

    from meshtune.recipes.qat import qat_modules
    from meshtune.runtime.data_parallel import unwrap
    from meshtune.runtime.run import build_trainer

    cfg = tiny_config(run_dir, *layout(dp_replicate, dp_shard, 2), f"recipe.name={recipe}",
                      "recipe.qat.group_size=16")
    ref, trainer = reference_trainer(cfg), build_trainer(cfg)
    first = full_params(trainer.model)
    loss_diffs, grad_diffs = [], []
    for _ in range(steps):
        with torch.no_grad():
            for name, p in unwrap(ref.model).named_parameters():
                p.copy_(full_params(trainer.model)[name])
        ref_sum, ref_tokens = ref.forward_backward(ref.next_micro_batches())
        ref_grads = {k: v for k, v in full_grads_or_none(ref.model).items() if v is not None}
        ref.optimizer.zero_grad(set_to_none=True)
        loss_sum, tokens = trainer.forward_backward(trainer.next_micro_batches())
        grads = {k: v for k, v in full_grads_or_none(trainer.model).items() if v is not None}
        grad_diffs.append(max_diff(grads, ref_grads))
        loss_diffs.append(abs(trainer.mean_loss(loss_sum, tokens) - ref.mean_loss(ref_sum, ref_tokens)))
        # the rest of train_step: clip, optimizer step, after_optimizer_step (cache invalidation)
        from meshtune.runtime.grads import clip_grad_norm_

        clip_grad_norm_(trainer.params, cfg.optim.grad_clip, trainer.pp_group)
        trainer.optimizer.step()
        for r in trainer.recipes:
            r.after_optimizer_step(trainer.model)
        trainer.scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    last = full_params(trainer.model)
    modules = qat_modules(unwrap(trainer.model))
    return {"loss_diffs": loss_diffs, "grad_diffs": grad_diffs, "n_qat": len(modules),
            "changed": {n for n in last if not (last[n] == first[n]).all()},
            "cached": [m.cache_weight for _, m in modules]}


def full_grads_or_none(model):
    from meshtune.runtime.data_parallel import unwrap
    from tests.distributed.cases import full

    return {n: (full(p.grad).detach().clone() if p.grad is not None else None)
            for n, p in unwrap(model).named_parameters()}


@pytest.mark.parametrize("recipe,dp_replicate,dp_shard", [("qat", 1, 2), ("qat", 2, 1), ("lora+qat", 1, 2)],
                         ids=["qat-fsdp2", "qat-ddp", "lora+qat-fsdp2"])
def test_qat_matches_single_process(rank_pool, tmp_path, recipe, dp_replicate, dp_shard):
    for r in rank_pool(2).run(qat_steps_vs_reference, str(tmp_path), recipe, dp_replicate, dp_shard):
        assert r["n_qat"] == 2 * 7  # every block linear of the 2-layer model is fake-quantized
        assert all(r["cached"]) == (dp_shard == 1)  # FSDP2 shards: no full-size weight cache per rank
        if recipe == "lora+qat":
            assert r["changed"] and all(".lora_" in n for n in r["changed"])  # the quantized base stays frozen
        else:
            assert any(n.endswith("wq.weight") for n in r["changed"])
        assert max(r["loss_diffs"]) < TOL, r
        assert max(r["grad_diffs"]) < TOL, r
