"""Memory levers on real gloo ranks against the single-process reference (full logits, no checkpointing, no
offload) from the same seed: chunked loss, selective activation checkpointing, FSDP2 CPU offload."""

from dataclasses import replace

import pytest

from tests.distributed.cases import full_params, max_diff, step_losses, tiny_config

TOL = 1e-5


def lever_vs_reference(run_dir, overrides, teacher=None):
    """First-step gradients and a few steps' losses of a layout with levers vs one plain process."""
    from meshtune.runtime.data_parallel import unwrap
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer
    from tests.distributed.cases import full

    extra = [f"recipe.distill.teacher={teacher}"] if teacher else []
    cfg = tiny_config(run_dir, *overrides, *extra)
    ref_cfg = replace(cfg, train=replace(cfg.train, micro_batch_size=cfg.train.global_batch_size, loss_chunk_size=0),
                      parallel=replace(cfg.parallel, dp_replicate=1, dp_shard=1, tp=1, pp=1, cpu_offload=False,
                                       activation_checkpointing=False, ac_every=1, ac_mode="full"))
    ref, trainer = build_trainer(ref_cfg, DistEnv()), build_trainer(cfg)

    def grads(t):  # a pipeline rank holds its stages' parameters: compare those
        return {n: full(p.grad).clone() for n, p in unwrap(t.model).named_parameters(remove_duplicate=False)
                if p.requires_grad}

    def held(mine, theirs):
        return mine, {k: theirs[k] for k in mine}
    ref.forward_backward(ref.next_micro_batches())
    trainer.forward_backward(trainer.next_micro_batches())
    grad_diff = max_diff(*held(grads(trainer), grads(ref)))
    for t in (ref, trainer):
        t.engine.zero_grad()
    losses, ref_losses = step_losses(trainer, 3), step_losses(ref, 3)
    return {"grad_diff": grad_diff, "losses": losses, "ref_losses": ref_losses,
            "param_diff": max_diff(*held(full_params(trainer.model), full_params(ref.model))),
            "devices": sorted({str(p.device) for p in unwrap(trainer.model).parameters()}),
            # evaluation through the same lever (a chunked loss evaluates chunk by chunk) against whole logits
            "eval": trainer.evaluate(), "ref_eval": ref.evaluate()}


CHUNK = "train.loss_chunk_size=5"
SOFTCAPPED = ["model.family=gemma2", "model.attn_softcap=1.0", "model.logit_softcap=0.5"]
CASES = {
    "fsdp-chunked": [CHUNK, "parallel.dp_shard=2", "train.micro_batch_size=2"],
    "fsdp-chunked-tied": [CHUNK, "parallel.dp_shard=2", "train.micro_batch_size=4", "model.tie_embeddings=true"],
    "ddp-chunked-lora": [CHUNK, "parallel.dp_replicate=2", "parallel.dp_shard=1", "train.micro_batch_size=2",
                         "recipe.name=lora"],
    "tp-chunked": [CHUNK, "parallel.tp=2", "parallel.dp_shard=1"],
    "pp-chunked-tied": [CHUNK, "parallel.pp=2", "parallel.dp_shard=1", "train.micro_batch_size=2",
                        "model.tie_embeddings=true"],
    # Gemma 2's soft-capped scores and logits: the last stage caps its head's logits, whole or chunk by chunk
    "pp-tied-softcapped": ["parallel.pp=2", "parallel.dp_shard=1", "train.micro_batch_size=2",
                           "model.tie_embeddings=true", *SOFTCAPPED],
    "pp-chunked-tied-softcapped": [CHUNK, "parallel.pp=2", "parallel.dp_shard=1", "train.micro_batch_size=2",
                                   "model.tie_embeddings=true", *SOFTCAPPED],
    "fsdp-chunked-distill-sharded-teacher": [CHUNK, "parallel.dp_shard=2", "train.micro_batch_size=2",
                                             "recipe.name=distill", "recipe.distill.alpha=0.4",
                                             "recipe.distill.teacher_shard=fsdp"],
    "fsdp-selective-ac-every2": ["parallel.dp_shard=2", "train.micro_batch_size=2",
                                 "parallel.activation_checkpointing=true", "parallel.ac_mode=selective_op",
                                 "parallel.ac_every=2"],
    "tp-selective-ac-lora": ["parallel.tp=2", "parallel.dp_shard=1", "recipe.name=lora",
                             "parallel.activation_checkpointing=true", "parallel.ac_mode=selective_op"],
    "fsdp-offload": ["parallel.cpu_offload=true", "parallel.dp_shard=2", "train.micro_batch_size=2"],
    "fsdp-offload-chunked-selective-lora": ["parallel.cpu_offload=true", "parallel.dp_shard=2", CHUNK,
                                            "parallel.activation_checkpointing=true", "parallel.ac_mode=selective_op",
                                            "recipe.name=lora", "train.micro_batch_size=4"],
    "fsdp2-tp2-offload": ["parallel.cpu_offload=true", "parallel.dp_shard=2", "parallel.tp=2",
                          "train.micro_batch_size=2"],
    "pp2-fsdp2-offload-chunked": ["parallel.cpu_offload=true", "parallel.dp_shard=2", "parallel.pp=2", CHUNK,
                                  "train.micro_batch_size=2"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_lever_matches_single_process(rank_pool, tmp_path, name):
    teacher = None
    if "distill" in name:
        from tests.distributed.test_distill_distributed import write_teacher

        teacher = str(write_teacher(tmp_path / "teacher.safetensors"))
    world = 4 if any(k in name for k in ("tp2", "pp2")) else 2
    for r in rank_pool(world).run(lever_vs_reference, str(tmp_path / "run"), CASES[name], teacher):
        assert r["grad_diff"] < TOL, r
        assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"], strict=True)) < TOL, r
        assert r["param_diff"] < 1e-4, r
        assert abs(r["eval"]["eval_loss"] - r["ref_eval"]["eval_loss"]) < 1e-4, r
        assert r["eval"]["eval_accuracy"] == r["ref_eval"]["eval_accuracy"], r


def offload_vs_on_device(run_dir):
    """Losses of FSDP2 with and without CPU offload on the same ranks, and where the shards live."""
    from meshtune.runtime.data_parallel import unwrap
    from meshtune.runtime.run import build_trainer

    out = {}
    for offload in (False, True):
        trainer = build_trainer(tiny_config(run_dir, "parallel.dp_shard=2", "train.micro_batch_size=2",
                                            f"parallel.cpu_offload={str(offload).lower()}"))
        out[offload] = [x.hex() for x in step_losses(trainer, 3)]
        out[f"devices-{offload}"] = sorted({p.device.type for p in unwrap(trainer.model).parameters()})
        group = unwrap(trainer.model).layers["0"]._get_fsdp_state()._fsdp_param_group  # FSDP2 internals: test only
        out[f"policy-{offload}"] = type(group.offload_policy).__name__
    return out


def test_cpu_offload_on_a_cpu_device_changes_nothing(rank_pool, tmp_path):
    """On a CPU device FSDP2's offload copies are `.to("cpu")` of CPU tensors (no copy): losses are bitwise those
    of the run without offload; the policy is applied all the same."""
    for r in rank_pool(2).run(offload_vs_on_device, str(tmp_path)):
        assert r[True] == r[False], r
        assert r["policy-True"] == "CPUOffloadPolicy" and r["policy-False"] == "OffloadPolicy", r
        assert r["devices-True"] == ["cpu"]


@pytest.mark.parametrize("world,overrides", [(1, ["parallel.dp_shard=1"]), (2, ["parallel.engine=deepspeed"])])
def test_cpu_offload_needs_fsdp2(tmp_path, world, overrides):
    from meshtune.config import ConfigError
    from meshtune.runtime.plan import make_plan

    cfg = tiny_config(str(tmp_path), "parallel.cpu_offload=true", *overrides)
    with pytest.raises(ConfigError, match=r"^parallel\.cpu_offload: FSDP2 offload needs parallel\.engine=native"):
        make_plan(cfg, world)
