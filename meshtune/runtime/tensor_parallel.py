"""Tensor parallelism with DTensor: apply the model's `tp_plan()` over the mesh's "tp" axis.

Shapes must split evenly: query heads, key/value heads, the MLP hidden size and the vocabulary are all
divided by the tp degree, and `meshtune.runtime.plan.check_tp_sizes` says which config key to change when
they are not.
"""

from __future__ import annotations

from torch import nn

from meshtune.config import Config, ConfigError


def check_tp_recipes(cfg: Config, tp: int) -> None:
    """Recipes whose parameters cannot follow the tensor-parallel layout yet are refused by name."""
    names = cfg.recipe.name.split("+") if cfg.recipe.name else []
    if tp > 1 and "prefix" in names and cfg.recipe.prefix.reparam_hidden:
        raise ConfigError("recipe.prefix.reparam_hidden: the prefix reparameterisation under parallel.tp > 1 is "
                          "not supported yet; set it to 0 (plain prefixes are split by head) or parallel.tp=1")
    if tp > 1 and "adapters" in names and cfg.parallel.sequence_parallel:
        raise ConfigError("recipe.name: adapters with parallel.sequence_parallel are not supported yet; set "
                          "parallel.sequence_parallel=false")


# LoRA's A and B shard like their base layer (meshtune.recipes.lora): for a colwise base (output features
# split) A is replicated and B split by rows; for a rowwise base (input features split) A is split by
# columns and B replicated, so B A x is a partial sum reduced together with W x.
_LORA_PLACEMENTS = {"colwise": {"": 0, "lora_a": None, "lora_b": 0}, "rowwise": {"": 1, "lora_a": 1, "lora_b": None}}


def _lora_style(style, kind: str):
    """The same parallel style (same input/output layouts), partitioning a LoRALinear and its A/B children."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    placements = _LORA_PLACEMENTS[kind]

    class LoRAStyle(type(style)):
        # overrides a private hook of torch's ParallelStyle: the stock one assumes a plain nn.Linear
        def _partition_linear_fn(self, name, module, device_mesh):
            dim = placements.get(name, None)
            for pname, param in module.named_parameters(recurse=False):
                placement = Replicate() if dim is None else Shard(dim)
                module.register_parameter(pname, nn.Parameter(
                    distribute_tensor(param, device_mesh, [placement]), requires_grad=param.requires_grad))

    lora = LoRAStyle.__new__(LoRAStyle)
    lora.__dict__.update(style.__dict__)
    return lora


def _shard_prefixes(model: nn.Module, tp_mesh) -> None:
    """Prefix-tuning key/value prefixes (P, kv heads, head dim) split by kv head, as wk/wv split theirs."""
    from torch.distributed.tensor import Shard, distribute_tensor

    for module in model.modules():
        for name in ("prefix_k", "prefix_v"):
            param = module._parameters.get(name)
            if param is not None:
                module.register_parameter(name, nn.Parameter(distribute_tensor(param, tp_mesh, [Shard(1)]),
                                                             requires_grad=param.requires_grad))


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool) -> None:
    """Shard `model` in place over the 1-D `tp_mesh` following `model.tp_plan()`."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = model.tp_plan(sequence_parallel)
    for fqn, style in plan.items():
        if hasattr(model.get_submodule(fqn), "lora_a"):  # a LoRA-adapted linear layer
            kind = "colwise" if isinstance(style, ColwiseParallel) else "rowwise"
            assert isinstance(style, (ColwiseParallel, RowwiseParallel)), (fqn, style)
            plan[fqn] = _lora_style(style, kind)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    parallelize_module(model, tp_mesh, plan)
    _shard_prefixes(model, tp_mesh)
    for name, p in model.named_parameters():  # SequenceParallel's new Parameters forget requires_grad=False
        if name in frozen:
            p.requires_grad_(False)
