"""parallel.vocab_parallel's layout checks: each refused layout is one ConfigError line naming its key."""

import pytest

from meshtune.config import ConfigError
from meshtune.runtime.plan import make_plan
from meshtune.schema import load_config

BASE = ["data.task=reverse", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "train.global_batch_size=8",
        "train.micro_batch_size=2", "parallel.vocab_parallel=true"]


@pytest.mark.parametrize("overrides,world,key", [
    (["parallel.dp_shard=1"], 1, "parallel.dp_shard"),
    (["parallel.dp_shard=1", "parallel.dp_replicate=2"], 2, "parallel.dp_shard"),
    (["parallel.tp=2"], 4, "parallel.tp"),
    (["parallel.pp=2"], 4, "parallel.pp"),
    (["parallel.engine=deepspeed"], 2, "parallel.engine"),
    (["parallel.cpu_offload=true"], 2, "parallel.cpu_offload"),
    (["recipe.name=qlora", "recipe.qlora.scaler_block_size=1", "recipe.qlora.block_size=16"], 2, "recipe.name"),
    (["recipe.name=distill", "recipe.distill.teacher=x"], 2, "recipe.name"),
    (["recipe.name=lora+qat"], 2, "recipe.name"),
], ids=["dp_shard=1", "ddp", "tp", "pp", "deepspeed", "cpu_offload", "qlora", "distill",
        "lora+qat"])
def test_vocab_parallel_refuses_layout(overrides, world, key):
    cfg = load_config(None, [*BASE, *overrides])
    with pytest.raises(ConfigError) as e:
        make_plan(cfg, world, 264)
    message = str(e.value)
    assert message.startswith(key + ":") and "\n" not in message, message
    assert "vocab_parallel" in message, message


@pytest.mark.parametrize("overrides", [[], ["recipe.name=lora"], ["model.tie_embeddings=true"],
                                       ["train.loss_chunk_size=8"]])
def test_vocab_parallel_accepts_fsdp(overrides):
    plan = make_plan(load_config(None, [*BASE, *overrides]), 2, 264)
    assert plan.dims.dp_shard == 2 and plan.mode == "fsdp"


def test_vocab_parallel_accepts_hsdp():
    plan = make_plan(load_config(None, [*BASE, "parallel.dp_shard=2", "parallel.dp_replicate=2"]), 4, 264)
    assert (plan.dims.dp_replicate, plan.dims.dp_shard) == (2, 2) and plan.mode == "hsdp"


@pytest.mark.parametrize("tied", [False, True])
def test_planner_never_gathers_the_split_vocabulary(tied):
    """`meshtune validate`'s layout: the split table is held (1 / dp_shard of it) but left out of FSDP2's gathered
    units; the rest of the root (the final norm) and two blocks are still gathered."""
    from meshtune.models import build_model
    from meshtune.runtime.plan_report import _rank_layout
    from meshtune.runtime.preflight import preflight

    def layout(*extra):
        cfg = load_config(None, ["data.task=sort", "model.dim=64", "model.n_layers=4", "model.n_heads=4",
                                 "train.dtype=fp32", f"model.tie_embeddings={str(tied).lower()}", *extra])
        return _rank_layout(cfg, preflight(cfg, 2), 264, 0), build_model(cfg.model, 264, device="meta")

    fsdp, model = layout()
    vp, _ = layout("parallel.vocab_parallel=true")
    table = 4 * 264 * 64 * (1 if tied else 2)
    block = 4 * sum(p.numel() for p in model.layers["0"].parameters())
    root = 4 * model.num_params() - 4 * block - table  # the final norm
    assert vp["param_bytes"] == fsdp["param_bytes"]  # the same shares held, both split in two
    assert abs(vp["gathered"] - (root + max(root, 2 * block))) <= 64, (vp, root, block)
    assert fsdp["gathered"] - vp["gathered"] >= table
