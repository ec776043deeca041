"""Engine selection and the DeepSpeed config generated from meshtune's (no process group, no DeepSpeed import)."""

import json

import pytest

from meshtune.config import ConfigError
from meshtune.schema import load_config

BASE = ["data.task=sort", "train.global_batch_size=16", "train.micro_batch_size=2", "optim.grad_clip=0.25",
        "parallel.engine=deepspeed"]


def ds_config(*overrides, world=2, accum=4, device="cpu"):
    import torch

    from meshtune.runtime.engines.deepspeed import build_config

    return build_config(load_config(None, [*BASE, *overrides]), world, accum, torch.device(device))


def test_generated_config_says_what_meshtune_says():
    ds = ds_config("parallel.zero_stage=3")
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.25  # not DeepSpeed's default 1.0
    assert ds["zero_optimization"] == {"stage": 3}
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}  # auto on CPU = fp32
    assert ds["zero_allow_untested_optimizer"] is True  # meshtune's torch AdamW, no fused_adam compile
    assert "optimizer" not in ds and "scheduler" not in ds
    assert ds_config("train.dtype=bf16")["bf16"] == {"enabled": True}
    assert ds_config("optim.grad_clip=0")["gradient_clipping"] == 0.0


def test_offload_options_pass_through(tmp_path):
    ds = ds_config("parallel.zero_stage=3", "parallel.offload_optimizer=cpu", "parallel.offload_param=nvme",
                   f"parallel.nvme_path={tmp_path}")
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                       "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)}}
    with pytest.raises(ConfigError, match="parallel.offload_param"):
        load_config(None, [*BASE, "parallel.zero_stage=2", "parallel.offload_param=cpu"])
    with pytest.raises(ConfigError, match="parallel.nvme_path"):
        load_config(None, [*BASE, "parallel.offload_optimizer=nvme"])


def test_user_json_merges_and_conflicts_are_one_line_errors(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000},
                                "gradient_clipping": 0.25, "communication_data_type": "fp32"}))
    ds = ds_config("parallel.zero_stage=2", f"parallel.deepspeed_config={path}")
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}  # added next to meshtune's
    assert ds["communication_data_type"] == "fp32"
    for user, key, values in [({"gradient_clipping": 1.0}, "gradient_clipping", ("1.0", "0.25")),
                              ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage", ("3", "2")),
                              ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu", ("4", "2")),
                              ({"optimizer": {"type": "AdamW"}}, "optimizer", ())]:
        path.write_text(json.dumps(user))
        with pytest.raises(ConfigError) as e:
            ds_config("parallel.zero_stage=2", f"parallel.deepspeed_config={path}")
        msg = str(e.value)
        assert "\n" not in msg and "parallel.deepspeed_config" in msg and repr(key) in msg
        assert all(v in msg for v in values), msg
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="no JSON object"):
        ds_config(f"parallel.deepspeed_config={path}")
    with pytest.raises(ConfigError, match="parallel.deepspeed_config: file"):
        load_config(None, [*BASE, f"parallel.deepspeed_config={tmp_path / 'missing.json'}"])


def test_batch_sizes_that_do_not_multiply_are_refused():
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        ds_config(world=2, accum=3)


@pytest.mark.parametrize("overrides,key", [
    (["parallel.engine=torchy"], "parallel.engine"),
    (["parallel.engine=fairscale", "parallel.dp_shard=2"], "parallel.dp_shard"),
    (["parallel.engine=deepspeed", "parallel.tp=2", "parallel.dp_shard=1"], "parallel.engine"),
    (["parallel.engine=fairscale", "parallel.pp=2", "parallel.dp_shard=1"], "parallel.engine"),
    (["parallel.zero_stage=4"], "parallel.zero_stage"),
])
def test_engine_config_errors(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.task=sort", *overrides])
    msg = str(e.value)
    assert msg.startswith(key) and "\n" not in msg
    if "fairscale" in overrides[0] and "dp_shard" in key:
        assert "parallel.engine=native" in msg and "FSDP2" in msg


def test_engine_layout_makes_every_rank_a_replica():
    from meshtune.runtime.plan import make_plan

    for engine, want, mode in [("native", (1, 4), "fsdp"), ("deepspeed", (4, 1), "deepspeed ZeRO-2"),
                               ("fairscale", (4, 1), "fairscale OSS + DDP")]:
        cfg = load_config(None, ["data.task=sort", f"parallel.engine={engine}"])
        plan = make_plan(cfg, 4)
        assert (plan.dims.dp_replicate, plan.dims.dp_shard) == want and plan.dims.world_size == 4
        assert plan.describe().endswith(f"= 4 ranks ({mode})")


def test_validate_reports_the_engine_layout_and_its_memory():
    """validate and the trainer share one plan: a DeepSpeed run is reported as ZeRO, not as FSDP, and ZeRO-3
    divides parameters, gradients and optimizer state over the ranks while ZeRO-1 divides only the state."""
    import re

    from meshtune.runtime.plan_report import describe_plan

    def memory(text):
        line = next(x for x in text.splitlines() if x.startswith("per rank"))
        return [float(v) for v in re.findall(r"(?:parameters|gradients|AdamW state) ([\d.]+) GiB", line)]

    base = ["data.task=sort", "model.dim=256", "model.n_layers=4", "train.global_batch_size=32"]
    fsdp = describe_plan(load_config(None, base), 4)
    z3 = describe_plan(load_config(None, [*base, "parallel.engine=deepspeed", "parallel.zero_stage=3"]), 4)
    z1 = describe_plan(load_config(None, [*base, "parallel.engine=deepspeed", "parallel.zero_stage=1"]), 4)
    assert "(fsdp)" in fsdp.splitlines()[0] and "(deepspeed ZeRO-3)" in z3.splitlines()[0], z3
    assert "(deepspeed ZeRO-1)" in z1.splitlines()[0] and "dp_replicate=4 x dp_shard=1" in z1.splitlines()[0]
    p1, g1, o1 = memory(z1)
    p3, g3, o3 = memory(z3)
    assert p3 == pytest.approx(p1 / 4, rel=1e-3) and g3 == pytest.approx(g1 / 4, rel=1e-3) and o3 == o1
    assert memory(fsdp) == pytest.approx([p3, g3, o3], rel=1e-2)  # FSDP2 shards the same three ways




def test_every_engine_implements_the_written_protocol():
    import inspect

    from meshtune.runtime.engines import ENGINES, NativeEngine
    from meshtune.runtime.engines.base import Engine
    from meshtune.runtime.engines.deepspeed import DeepSpeedEngine
    from meshtune.runtime.engines.fairscale import FairScaleEngine

    classes = {"native": NativeEngine, "deepspeed": DeepSpeedEngine, "fairscale": FairScaleEngine}
    assert set(classes) == set(ENGINES)
    methods = {n: inspect.signature(v) for n, v in vars(Engine).items() if inspect.isfunction(v) and n[0] != "_"}
    assert set(methods) == {"accumulate", "backward", "step", "zero_grad", "save", "load"}
    for name, cls in classes.items():
        assert cls.name == name and isinstance(cls.owns_precision, bool)
        for method, sig in methods.items():
            assert list(inspect.signature(getattr(cls, method)).parameters) == list(sig.parameters), (name, method)


def test_fairscale_on_one_process_trains_like_native_and_records_its_layout(tmp_path):
    """FairScale alone needs a process group (it crashed with 'Default process group has not been
    initialized'); its checkpoint's layout names the engine, not `ddp`/`none`."""
    import torch.distributed as dist

    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer
    from tests.distributed.cases import tiny_config

    pytest.importorskip("fairscale")
    out = {}
    for engine in ("native", "fairscale"):
        run = tmp_path / engine
        cfg = tiny_config(str(run), "train.steps=3", "checkpoint.save_final=true", f"parallel.engine={engine}",
                          "parallel.dp_shard=1")
        try:
            history = build_trainer(cfg, DistEnv()).fit()["history"]
        finally:
            if dist.is_initialized():  # the one-process group FairScale needed: not left to later tests
                dist.destroy_process_group()
        (meta,) = [json.loads(p.read_text()) for p in run.glob("checkpoints/step_*/meta.json")]
        out[engine] = ([r["loss"] for r in history if "loss" in r], meta["engine"], meta["layout"])
    assert out["native"][0] == pytest.approx(out["fairscale"][0], abs=1e-5)
    assert out["fairscale"][1:] == ("fairscale", "pp=1 x dp_replicate=1 x dp_shard=1 x tp=1 = 1 ranks "
                                                 "(fairscale OSS + DDP)")
    assert out["native"][1:] == ("native", "pp=1 x dp_replicate=1 x dp_shard=1 x tp=1 = 1 ranks (none)")
