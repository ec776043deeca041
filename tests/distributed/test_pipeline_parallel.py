"""Pipeline parallelism (each schedule), PP x DP, and PP x DP x TP against a single-process reference."""

import pytest

from tests.distributed.cases import TINY, full_grads, full_params, reference_trainer, step_losses, tiny_config

TOL = 1e-5


def pp_layout(pp: int, dp_shard: int, tp: int, micro: int, schedule: str, *extra: str) -> list[str]:
    return ["parallel.dp_replicate=1", f"parallel.dp_shard={dp_shard}", f"parallel.tp={tp}", f"parallel.pp={pp}",
            f"parallel.pp_schedule={schedule}", f"train.micro_batch_size={micro}", *extra]


def subset_diff(mine: dict, ref: dict) -> float:
    """This rank's stage holds some of the parameters: compare those (and insist there are some)."""
    assert mine and set(mine) <= set(ref), sorted(set(mine) - set(ref))
    return max(float((mine[k] - ref[k]).abs().max()) for k in mine)


def pp_vs_reference(run_dir, layout, steps):
    from meshtune.runtime.run import build_trainer

    cfg = tiny_config(run_dir, *layout)
    ref, trainer = reference_trainer(cfg), build_trainer(cfg)
    ref.forward_backward(ref.next_micro_batches())
    loss, tokens = trainer.forward_backward(trainer.next_micro_batches())
    grad_diff = subset_diff(full_grads(trainer.model), full_grads(ref.model))
    first_loss = trainer.mean_loss(loss, tokens)
    ref2, trainer2 = reference_trainer(cfg), build_trainer(cfg)
    losses, ref_losses = step_losses(trainer2, steps), step_losses(ref2, steps)
    return {"grad_diff": grad_diff, "first_loss": first_loss, "losses": losses, "ref_losses": ref_losses,
            "param_diff": subset_diff(full_params(trainer2.model), full_params(ref2.model)),
            "eval": trainer2.evaluate(), "ref_eval": ref2.evaluate(),
            "stages": trainer2.pipeline.ids, "n_layers": len(trainer2.model.layers)}


def check(results, steps):
    for r in results:
        assert r["grad_diff"] < TOL, r
        assert abs(r["first_loss"] - r["ref_losses"][0]) < TOL, r  # reported from the last stage to all
        assert len(r["losses"]) == steps and r["losses"][-1] < r["losses"][0]
        assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"], strict=True)) < TOL, r
        assert r["param_diff"] < 1e-4, r
        assert abs(r["eval"]["eval_loss"] - r["ref_eval"]["eval_loss"]) < TOL, r
        assert r["eval"]["eval_accuracy"] == r["ref_eval"]["eval_accuracy"]


SCHEDULES = [("GPipe", 2), ("1F1B", 2), ("Interleaved1F1B", 4), ("LoopedBFS", 4), ("InterleavedZeroBubble", 4),
             ("ZBVZeroBubble", 4), ("DualPipeV", 4)]


@pytest.mark.parametrize("schedule,n_layers", SCHEDULES, ids=[s for s, _ in SCHEDULES])
def test_pp2_each_schedule_matches_single_process(rank_pool, tmp_path, schedule, n_layers):
    layout = pp_layout(2, 1, 1, 2, schedule, f"model.n_layers={n_layers}")  # 4 micro-batches per step
    results = rank_pool(2).run(pp_vs_reference, str(tmp_path), layout, 3)
    check(results, 3)
    assert sorted(s for r in results for s in r["stages"]) == list(range(n_layers if n_layers == 4 else 2))
    assert sum(r["n_layers"] for r in results) == n_layers  # every layer lives on exactly one rank


def test_pp2_x_fsdp2_matches_single_process(rank_pool, tmp_path):
    check(rank_pool(4).run(pp_vs_reference, str(tmp_path), pp_layout(2, 2, 1, 2, "1F1B"), 3), 3)


TIED = [("1F1B", 2, 1, 2), ("ZBVZeroBubble", 2, 1, 4), ("1F1B", 4, 2, 2)]  # schedule, world, dp_shard, layers


@pytest.mark.parametrize("schedule,world,dp_shard,n_layers", TIED, ids=["pp2", "pp2-v-shaped", "pp2xfsdp2"])
def test_tied_embeddings_across_stages_match_single_process(rank_pool, tmp_path, schedule, world, dp_shard,
                                                              n_layers):
    """Llama 3.2 / small Qwen2.5: the embedding (first stage) and the head (last stage) are one matrix. On two
    ranks their gradients are exchanged; under a V-shaped schedule rank 0 holds both ends; with FSDP2 the
    exchanged gradients are shards. Full fine-tuning follows the single-process curve, norm included."""
    layout = pp_layout(2, dp_shard, 1, 2, schedule, f"model.n_layers={n_layers}", "model.tie_embeddings=true",
                       "optim.grad_clip=0.5")
    check(rank_pool(world).run(pp_vs_reference, str(tmp_path), layout, 3), 3)


def tied_meta_copies(run_dir):
    """model.init_device=meta with tied embeddings: each stage initialises its own part; the head must start (and
    stay) equal to the embedding."""
    from meshtune.runtime.data_parallel import unwrap
    from meshtune.runtime.run import build_trainer

    trainer = build_trainer(tiny_config(run_dir, *pp_layout(2, 2, 1, 2, "1F1B", "model.tie_embeddings=true",
                                                            "model.init_device=meta")))

    def ends():
        out = {}
        for part in trainer.pipeline.parts:
            m = unwrap(part)
            if m.tok_embeddings is not None:
                out["emb"] = m.tok_embeddings.weight.full_tensor()
            if m.output is not None:
                out["head"] = m.output.weight.full_tensor()
        return out

    before = ends()
    step_losses(trainer, 2)
    return {"before": before, "after": ends()}


def test_tied_embeddings_on_meta_start_equal_across_stages(rank_pool, tmp_path):
    results = rank_pool(4).run(tied_meta_copies, str(tmp_path))
    for when in ("before", "after"):
        emb = next(r[when]["emb"] for r in results if "emb" in r[when])
        head = next(r[when]["head"] for r in results if "head" in r[when])
        assert emb.equal(head), when


def test_3d_pp2_x_fsdp2_x_tp2_loss_curve(rank_pool, tmp_path):
    """One 8-rank run: 10 steps of 3D training follow the single-process loss curve."""
    check(rank_pool(8).run(pp_vs_reference, str(tmp_path), pp_layout(2, 2, 2, 1, "1F1B"), 10), 10)


def save_pp_checkpoint(run_dir):
    from meshtune.runtime.run import build_trainer

    trainer = build_trainer(tiny_config(run_dir, *pp_layout(2, 1, 1, 2, "1F1B")))
    step_losses(trainer, 2)
    trainer.save()
    return {"params": full_params(trainer.model), "next": step_losses(trainer, 1)}


def test_reshard_pp2_to_single_process(rank_pool, tmp_path):
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer

    saved = rank_pool(2).run(save_pp_checkpoint, str(tmp_path))
    alone = build_trainer(tiny_config(str(tmp_path), "parallel.dp_shard=1", "checkpoint.resume=auto"), DistEnv())
    assert alone.step == 2
    params = full_params(alone.model)
    for r in saved:  # each stage's share of the weights came back in one model
        assert subset_diff(r["params"], params) < 1e-6
    assert abs(step_losses(alone, 1)[0] - saved[0]["next"][0]) < TOL


@pytest.mark.parametrize("overrides,match", [
    (["parallel.pp=2", "parallel.dp_shard=1", "model.n_layers=1"], "model.n_layers: 1 layers cannot fill 2"),
    (["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=Zigzag"], "parallel.pp_schedule"),
    (["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=Interleaved1F1B", "train.micro_batch_size=8"],
     "cannot fill 4 pipeline stages"),
    (["parallel.pp=2", "parallel.dp_shard=1", "train.micro_batch_size=8"], "needs at least parallel.pp=2"),
    (["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_split_points=[5]"], "parallel.pp_split_points"),
])
def test_pipeline_config_errors(overrides, match):
    from meshtune.config import ConfigError
    from meshtune.runtime.plan_report import describe_plan
    from meshtune.schema import load_config

    with pytest.raises(ConfigError, match=match):
        describe_plan(load_config(None, [*TINY, *overrides]), world_size=2)
