"""parallel.fsdp_unit=linear in one process: the order its prefetch chain assumes, against the order a real forward and
backward call the projections on every family with each of its features on, and the plan's one-line refusals.
(On gloo ranks: tests/distributed/test_fsdp_units.py; the planner's term: tests/unit/test_memory_plan.py.)"""

import pytest
import torch

from meshtune.config import ConfigError
from meshtune.models import build_model
from meshtune.models.families import FAMILIES
from meshtune.recipes import apply_recipes, build_recipes
from meshtune.runtime.fsdp_units import execution_order, projections
from meshtune.schema import load_config

TINY = ["data.task=sort", "data.seq_len=16", "model.dim=32", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=2", "model.max_seq_len=32"]
# a value that switches each model.* feature on (FEATURES holds the "off" ones)
ON = {"attn_bias": "true", "qk_norm": "true", "sliding_window": "8", "rope_local_theta": "10000.0",
      "norm_offset": "true", "sandwich_norm": "true", "mlp_act": "gelu_tanh", "embed_scale": "true",
      "attn_scale": "16.0"}


def family_config(name: str, *extra: str):
    features = [f"model.{k}={ON[k]}" for k in sorted(FAMILIES[name].features) if k in ON]
    return load_config(None, [*TINY, f"model.family={name}", *features, *extra])


@pytest.mark.parametrize("recipe", ["none", "lora", "qlora"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_projections_run_in_the_order_the_prefetch_chain_assumes(name, recipe):
    if recipe == "qlora":
        pytest.importorskip("torchao")
    small_blocks = ["recipe.qlora.block_size=32", "recipe.qlora.scaler_block_size=4"] if recipe == "qlora" else []
    cfg = family_config(name, *([f"recipe.name={recipe}", *small_blocks] if recipe != "none" else []))
    model = apply_recipes(build_model(cfg.model, 64), build_recipes(cfg.recipe))
    blocks = list(model.layers.values())
    units = [projections(model, block) for block in blocks]
    assert all(len(inner) == 7 for inner in units)
    forward_order, backward_order = execution_order(blocks, units)
    seen = {"forward": [], "backward": []}

    def arrived(module, args, out) -> None:  # FSDP2's pre-backward hook fires as its output's gradient arrives
        out.register_hook(lambda g: seen["backward"].append(module))
    for unit in forward_order:
        unit.register_forward_pre_hook(lambda m, args: seen["forward"].append(m))
        unit.register_forward_hook(arrived)
    model(torch.randint(0, 64, (2, 16))).float().pow(2).mean().backward()
    assert [id(m) for m in seen["forward"]] == [id(m) for m in forward_order]
    assert [id(m) for m in seen["backward"]] == [id(m) for m in backward_order]


@pytest.mark.parametrize("world,overrides", [(1, []), (2, ["parallel.dp_replicate=2", "parallel.dp_shard=1"]),
                                             (2, ["parallel.engine=deepspeed"])])
def test_linear_units_need_fsdp2_sharding(world, overrides):
    from meshtune.runtime.plan import make_plan

    cfg = load_config(None, ["data.task=sort", "parallel.fsdp_unit=linear", *overrides])
    with pytest.raises(ConfigError) as e:
        make_plan(cfg, world)
    message = str(e.value)
    assert message.startswith("parallel.fsdp_unit: linear units are FSDP2's") and "\n" not in message, message
    assert message.endswith("set parallel.fsdp_unit=block")


def test_an_unknown_unit_is_refused():
    with pytest.raises(ConfigError, match=r"parallel\.fsdp_unit"):
        load_config(None, ["data.task=sort", "parallel.fsdp_unit=layer"])


def test_only_the_lora_projection_view_warning_is_dropped():
    """LoRA's fused forward returns a view, so FSDP2 warns for every LoRA projection unit (meshtune.quiet); the same
    warning for any other module, and other warnings from FSDP2, still print."""
    import warnings

    from meshtune.quiet import quiet_fsdp_projection_views

    module = "torch.distributed.fsdp._fully_shard._fsdp_state"
    view = "FSDP2-wrapped module ({}) returned a view tensor. An in-place op on this view ..."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_fsdp_projection_views()
        for text in (view.format("FSDPLoRALinear"), view.format("FSDPQLoRALinear"), view.format("FSDPMyBlock"),
                     "something else"):
            warnings.warn_explicit(text, UserWarning, "_fsdp_state.py", 331, module=module)
    assert [str(w.message) for w in caught] == [view.format("FSDPMyBlock"), "something else"]
