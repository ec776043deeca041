"""LoRA: low-rank adaptation of frozen linear layers (Hu et al. 2021, arXiv:2106.09685).

    meshtune train meshtune/configs/lora/tiny.yaml                      # recipe.name: lora
    meshtune train cfg.yaml recipe.name=lora recipe.lora.rank=4 "recipe.lora.targets=[wq,wv]"

Each targeted `nn.Linear` becomes a `LoRALinear`: y = W x + (alpha / r) * B A dropout(x), with A (r x in)
kaiming-uniform as in PEFT and B (out x r) zero, so the adapted model starts equal to the base. Only A and B
train. `merge` folds B A into W for inference; `unmerge` takes it out again.

Names. `LoRALinear` subclasses `nn.Linear` and holds the SAME weight Parameter, so the base weight keeps its
original name (`layers.0.attention.wq.weight`): base checkpoints, HF weight maps and tensor-parallel plans
address it as before, and the adapter adds `wq.lora_a.weight` (r x in) and `wq.lora_b.weight` (out x r).
(A wrapper with a `base` child would rename every adapted weight to `wq.base.weight`.)

Tensor parallelism (applied by meshtune.runtime.tensor_parallel). A and B are `nn.Linear` children that shard like
their base layer:
    colwise base (wq, wk, wv, w1, w3; output dim sharded): lora_a replicated, lora_b colwise (Shard(0) of
        its weight), so the LoRA output is sharded on the same output features as W x;
    rowwise base (wo, w2; input dim sharded): lora_a rowwise (Shard(1) of its weight) giving a partial sum of
        A x that lora_b (replicated) maps to a partial output, reduced together with W x's partial sum.

Hugging Face PEFT export: `peft_state_dict` renames to PEFT's HF-Llama keys and applies the rotary row
permutation to lora_B of wq/wk (meshtune rotates interleaved pairs, HF rotates halves); `adapter_config` writes
adapter_config.json. Where the family's HF model fuses projections (Phi-3's qkv_proj, gate_up_proj) the parts'
adapters become one exact adapter on the fused module: A stacked, B block-diagonal, its alpha scaled with its rank.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from meshtune.config import ConfigError, ModelConfig
from meshtune.models.hf import permute_rope_rows, unpermute_rope_rows  # noqa: F401 (re-exported)
from meshtune.models.hf_fused import fuse_lora
from meshtune.recipes.base import PeftRecipe
from meshtune.recipes.targets import matches

if TYPE_CHECKING:
    from meshtune.recipes.lora import LoRAConfig


class LoRALinear(nn.Linear):
    """`nn.Linear` plus a low-rank update on a dropout of its input. Build it with `from_linear`."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_b = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """A LoRALinear sharing `base`'s weight and bias Parameters; A and B live on the weight's device."""
        w = base.weight
        new = cls(base.in_features, base.out_features, rank, alpha, dropout, bias=False, device="meta", dtype=w.dtype)
        new.weight, new.bias = w, base.bias  # the same Parameters: no copy, same names in the state dict
        new.lora_a.to_empty(device=w.device)
        new.lora_b.to_empty(device=w.device)
        new.reset_lora_parameters()
        return new

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A kaiming-uniform (PEFT's default, a=sqrt(5) like nn.Linear), B zero: the update starts at 0."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # B A is already inside W
            return F.linear(x, self.weight, self.bias)
        w, a, b = self.weight, self.lora_a.weight, self.lora_b.weight
        if (self.bias is None and not (self.training and isinstance(self.lora_dropout, nn.Dropout))
                and not any(isinstance(t, DTensor) for t in (x, w, a, b))):
            if torch.is_autocast_enabled(x.device.type):  # one dtype throughout, as autocast would compute
                dt = torch.get_autocast_dtype(x.device.type)
                x, w, a, b = x.to(dt), w.to(dt), a.to(dt), b.to(dt)
            return _LoRAFn.apply(x, w, a, b, self.scaling)
        # the general path (bias, active dropout, tensor-parallel DTensors): the same sum through the
        # children, whose parallel styles shard A and B; the rank-r tensor is scaled, then added. Not in place:
        # selective checkpointing (parallel.ac_mode=selective_op) keeps the base matmul's output for backward,
        # and DTensor hides an in-place add on it from the checkpoint's mutation check
        out = F.linear(x, w, self.bias)
        return out + self.lora_b(self.lora_a(self.lora_dropout(x)) * self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, shaped like the base weight (out x in)."""
        return (self.lora_b.weight @ self.lora_a.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W += scaling * B A; forward then skips the LoRA path. Idempotent."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= scaling * B A (restores W up to float rounding). Idempotent."""
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


class _LoRAFn(torch.autograd.Function):
    """y = x W^T + s (x A^T) B^T with the fewest kernels and buffers: forward is two GEMMs and one addmm into
    the base output; backward computes only the gradients needed (W frozen: none for it) and adds the LoRA
    path's input gradient into the base one in place. Saves x, x A^T and the three weights."""

    @staticmethod
    def forward(ctx, x, w, a, b, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        xa = x2 @ a.t()  # (N, r)
        out = torch.addmm(x2 @ w.t(), xa, b.t(), alpha=scaling)  # (N, out), beta=1: in the GEMM, not after
        ctx.save_for_backward(x2, xa, w, a, b)
        ctx.scaling, ctx.in_shape = scaling, x.shape
        return out.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, xa, w, a, b = ctx.saved_tensors
        s = ctx.scaling
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        gxa = (g2 @ b).mul_(s)  # (N, r): the gradient reaching x A^T
        gx = gw = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.addmm(g2 @ w, gxa, a).view(ctx.in_shape)  # (N, in): both paths in one buffer
        if ctx.needs_input_grad[1]:
            gw = g2.t() @ x2
        if ctx.needs_input_grad[2]:
            ga = gxa.t() @ x2  # (r, in)
        if ctx.needs_input_grad[3]:
            gb = (g2.t() @ xa).mul_(s)  # (out, r)
        return gx, gw, ga, gb, None


def lora_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the linear layers that `patterns` select (not the A/B layers of existing LoRA layers).

    Raises:
        ConfigError: naming `recipe.lora.targets`, for a pattern that matches no linear layer.
    """
    lora = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    inside_lora = {f"{n}.{c}" for n in lora for c in ("lora_a", "lora_b")}
    linears = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and n not in inside_lora]
    for p in patterns:
        if not any(matches(n, p) for n in linears):
            examples = sorted({n.split(".", 2)[-1] if n.startswith("layers.") else n for n in linears})
            raise ConfigError(f"recipe.lora.targets: {p!r} matches no linear layer; use names such as "
                              f"{', '.join(examples)} (matched at the end of module names, globs allowed)")
    return [n for n in linears if any(matches(n, p) for p in patterns)]


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


class LoRARecipe(PeftRecipe):
    """Swap the targeted linear layers for LoRALinear; train only lora_a / lora_b."""

    param_markers = ("lora_",)

    def apply(self, model: nn.Module) -> nn.Module:
        c = self.cfg.lora
        if c.rank <= 0:
            raise ConfigError(f"recipe.lora.rank: must be positive, got {c.rank}")
        for name in lora_targets(model, c.targets):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, LoRALinear.from_linear(getattr(parent, child), c.rank, c.alpha, c.dropout))
        self.freeze_base(model)
        return model

    def init_weights(self, model: nn.Module) -> None:
        for _, m in lora_modules(model):
            m.reset_lora_parameters()

    def merge_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return merge_lora_state(state, self.cfg.lora.alpha)

    def tp_plan(self, model: nn.Module, plan: dict) -> dict:
        """Each adapted linear keeps its base layer's style (the same input/output layouts), partitioning A and B
        too: see `_lora_style`."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

        out = dict(plan)
        for fqn, style in plan.items():
            if isinstance(model.get_submodule(fqn), LoRALinear):
                assert isinstance(style, (ColwiseParallel, RowwiseParallel)), (fqn, style)
                out[fqn] = _lora_style(style, "colwise" if isinstance(style, ColwiseParallel) else "rowwise")
        return out

    def peft_files(self, adapter: dict[str, torch.Tensor], m: ModelConfig) -> tuple[dict, dict]:
        """(adapter_model.safetensors tensors, adapter_config.json) in PEFT's layout for the family's HF model
        (`--format peft`)."""
        tensors = peft_state_dict(adapter, m)
        return tensors, adapter_config(self.cfg.lora, tensors)


def merge_lora_state(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Fold every `X.lora_a.weight` / `X.lora_b.weight` pair into `X.weight`; returns base names only."""
    out = {k: v for k, v in state.items() if ".lora_a." not in k and ".lora_b." not in k}
    for key, a in state.items():
        if not key.endswith(".lora_a.weight"):
            continue
        prefix = key[: -len(".lora_a.weight")]
        b = state[f"{prefix}.lora_b.weight"]
        w = out[f"{prefix}.weight"]
        out[f"{prefix}.weight"] = (w.float() + (b.float() @ a.float()) * (alpha / a.shape[0])).to(w.dtype)
    return out


# ---------------------------------------------------------------------------------------------------------
# Hugging Face PEFT layout.

_LORA_KEY = re.compile(r"^layers\.(\d+)\.(.+)\.lora_([ab])\.weight$")


def peft_state_dict(state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """meshtune LoRA tensors -> the keys of PEFT's adapter_model.safetensors for the family's HF model.

    `layers.{i}.attention.wq.lora_a.weight` -> `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
    (names from the family spec); lora_B of the query / key projections gets the rotary row permutation
    (n_heads / n_kv_heads) like the base weights do. Parts of a fused HF module (the spec's `hf_fused`) become
    one adapter on it (`meshtune.models.hf_fused.fuse_lora`; rank = the parts' ranks summed, so
    `adapter_config` scales its alpha to keep alpha / r). Non-LoRA keys are ignored.

    Raises:
        ValueError: for a LoRA tensor with no HF counterpart (e.g. on the output head).
    """
    from meshtune.models.families import family

    fam = family(m.family)
    heads = {fam.names.q: m.n_heads, fam.names.k: m.n_kv_heads or m.n_heads}
    adaptable = [n for n in fam.names.projections if n in fam.hf_block]
    out, fused = {}, {}
    for key, t in state.items():
        if ".lora_a." not in key and ".lora_b." not in key:
            continue
        match = _LORA_KEY.match(key)
        if match is None or match.group(2) not in adaptable:
            raise ValueError(f"{key}: no Hugging Face PEFT name for this LoRA tensor; PEFT export covers "
                             f"{', '.join(fam.names.leaf(n) for n in adaptable)} (set recipe.lora.targets to those)")
        layer, module, ab = match.groups()
        if ab == "b" and module in heads:
            t = permute_rope_rows(t, heads[module])
        name = f"base_model.model.model.layers.{layer}.{fam.hf_block[module]}.lora_{{}}.weight"
        if fam.fused_parts(module):  # joined with the other parts below, in its place among the keys
            fused.setdefault(name, {})[(module, ab)] = t
            out.setdefault(name.format("A"), None)
            out.setdefault(name.format("B"), None)
        else:
            out[name.format(ab.upper())] = t.contiguous()
    rows = _part_rows(m) if fused else {}
    for name, pairs in fused.items():
        parts = fam.fused_parts(next(iter(pairs))[0])
        out[name.format("A")], out[name.format("B")] = fuse_lora(
            [(rows[p], pairs.get((p, "a")), pairs.get((p, "b"))) for p in parts])
    return out


def _part_rows(m: ModelConfig) -> dict[str, int]:
    """Output rows of each block module (the same in every layer), from the decoder built on meta."""
    from meshtune.models.decoder import build_model

    block = build_model(m, m.vocab_size or 1, "meta").layers["0"]
    return {n: mod.out_features for n, mod in block.named_modules() if isinstance(mod, nn.Linear)}


def adapter_config(cfg: LoRAConfig, peft_state: dict[str, torch.Tensor]) -> dict:
    """adapter_config.json for `peft_state` (from `peft_state_dict`).

    `target_modules` is the list of HF projection names when every layer adapts the same ones, else a regex
    that PEFT full-matches against module names (e.g. LoRA on some layers only). A fused module's adapter of
    rank n * r (n parts adapted) gets `rank_pattern` n * r and `alpha_pattern` n * alpha: PEFT's alpha / r then
    equals meshtune's.
    """
    modules = sorted({k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in peft_state})
    short = sorted({m.rsplit(".", 1)[1] for m in modules})
    layers = {m.split(".")[2] for m in modules}
    uniform = len(modules) == len(short) * len(layers)
    targets = short if uniform else "^(" + "|".join(re.escape(m) for m in modules) + ")$"
    rank_of = {m: peft_state[f"base_model.model.{m}.lora_A.weight"].shape[0] for m in modules}
    by_short: dict[str, set[int]] = {}
    for module, r in rank_of.items():
        by_short.setdefault(module.rsplit(".", 1)[1], set()).add(r)
    if all(len(rs) == 1 for rs in by_short.values()):  # the same in every layer: patterns by the short name
        ranks = {s: next(iter(rs)) for s, rs in by_short.items()}
    else:
        ranks = {re.escape(m): r for m, r in rank_of.items()}
    ranks = {k: r for k, r in ranks.items() if r != cfg.rank}  # fused modules: n * rank, n parts adapted
    extra = {"rank_pattern": ranks, "alpha_pattern": {k: cfg.alpha * (r // cfg.rank) for k, r in ranks.items()}}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "", "r": cfg.rank,
            "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": targets, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "modules_to_save": None,
            "inference_mode": True, **(extra if ranks else {})}


# Tensor parallelism: A and B shard like their base layer. For a colwise base (output features split) A is
# replicated and B split by rows; for a rowwise base (input features split) A is split by columns and B
# replicated, so B A x is a partial sum reduced together with W x.
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
