"""Pruning masks on real gloo ranks: under FSDP2 and under tensor parallelism (TP=2) the masks, weights and
losses equal the same recipe in one process from the same seed; each rank holds its mask shard only."""

import pytest

from tests.distributed.cases import full, full_params, layout, max_diff, reference_trainer, step_losses, tiny_config

TOL = 1e-5
SCHEDULE = ["recipe.name=prune", "recipe.prune.start_step=1", "recipe.prune.end_step=5", "recipe.prune.frequency=2"]


def prune_vs_reference(run_dir, method, parallel):
    from torch.distributed.tensor import DTensor

    from meshtune.runtime.data_parallel import unwrap
    from meshtune.runtime.run import build_trainer
    from tests.distributed.test_tensor_parallel import tp_layout

    dims = {"fsdp2": layout(1, 2, 4), "ddp": layout(2, 1, 4)}.get(parallel) or tp_layout(1, 2, 4, False)
    method, _, importance = method.partition("-")  # structured-taylor: ranked by gradient x weight
    extra = ["model.n_kv_heads=4", "recipe.prune.sparsity=0.5"] if method == "structured" else []
    extra += [f"recipe.prune.importance={importance}"] if importance else []
    cfg = tiny_config(run_dir, *dims, *SCHEDULE, f"recipe.prune.method={method}", *extra)
    ref, trainer = reference_trainer(cfg), build_trainer(cfg)
    losses, ref_losses = step_losses(trainer, 6), step_losses(ref, 6)
    model = unwrap(trainer.model)
    masks = {n: m.weight_mask for n, m in model.named_modules() if hasattr(m, "weight_mask")}
    ref_masks = {n: m.weight_mask for n, m in unwrap(ref.model).named_modules() if hasattr(m, "weight_mask")}
    weights = {n: model.get_submodule(n).weight for n in masks}
    sharded = parallel == "ddp" or all(isinstance(m, DTensor) and m.placements == weights[n].placements
                                       and m.to_local().shape == weights[n].to_local().shape for n, m in masks.items())
    zeros = {n: int((full(w) == 0).sum()) for n, w in weights.items()}
    return {"losses": losses, "ref_losses": ref_losses, "param_diff": max_diff(full_params(model),
                                                                                full_params(ref.model)),
            "masks_equal": masks.keys() == ref_masks.keys() and all(
                bool((full(masks[n]) == ref_masks[n]).all()) for n in masks),
            "sharded": sharded, "zeros": sum(zeros.values()), "pruned": sum(m.numel() for m in ref_masks.values())}


@pytest.mark.parametrize("method,parallel", [("magnitude", "fsdp2"), ("semi_structured", "fsdp2"),
                                             ("magnitude", "tp2"), ("structured", "tp2"), ("structured", "ddp"),
                                             ("structured-taylor", "fsdp2"), ("structured-taylor", "tp2")],
                         ids=["magnitude-fsdp2", "2of4-fsdp2", "magnitude-tp2", "structured-tp2", "structured-ddp",
                              "taylor-fsdp2", "taylor-tp2"])
def test_prune_masks_match_single_process(rank_pool, tmp_path, method, parallel):
    for r in rank_pool(2).run(prune_vs_reference, str(tmp_path), method, parallel):
        assert r["masks_equal"] and r["sharded"], r
        assert r["zeros"] >= r["pruned"] // 2  # 50% of the pruned weights (structured: of whole rows/columns)
        assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"], strict=True)) < TOL, r
        assert r["param_diff"] < TOL, r


def resume_vs_reference(run_dir):
    from meshtune.runtime.data_parallel import unwrap
    from meshtune.runtime.run import build_trainer

    common = [*layout(1, 2, 4), *SCHEDULE, "train.steps=6", "checkpoint.every=3", "checkpoint.save_final=false"]
    build_trainer(tiny_config(run_dir, *common, "train.stop_after=3")).fit()  # saves sharded masks at step 3
    resumed = build_trainer(tiny_config(run_dir, *common, "checkpoint.resume=auto"))
    step, prune_step = resumed.step, int(unwrap(resumed.model).prune_step)
    resumed.fit()
    ref = reference_trainer(tiny_config(run_dir + "-ref", *common))
    step_losses(ref, 6)
    return {"step": step, "prune_step": prune_step,
            "param_diff": max_diff(full_params(resumed.model), full_params(ref.model))}


def test_prune_resumes_under_fsdp2(rank_pool, tmp_path):
    for r in rank_pool(2).run(resume_vs_reference, str(tmp_path / "run")):
        assert (r["step"], r["prune_step"]) == (3, 3), r
        assert r["param_diff"] < TOL, r
