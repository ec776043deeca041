"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", arXiv:2101.00190).

    meshtune train meshtune/configs/prefix/tiny.yaml                    # recipe.name: prefix
    meshtune train cfg.yaml recipe.name=prefix recipe.prefix.length=16 recipe.prefix.reparam_hidden=64

Every attention layer gets P trainable key/value positions, each (P, n_kv_heads, head_dim), prepended to the
sequence's keys and values; every query attends to all P prefix positions plus causally to the sequence. The
base model is frozen. Prefixes carry no position: they are not rotated by RoPE (they are learned directly in
the rotated key space), so a query sees the same prefix at every position. Length 0 is the base model exactly.

With `reparam_hidden > 0` the prefixes are trained through Li & Liang's reparameterisation, a per-layer MLP
(P, dim) -> tanh -> (P, 2 * n_kv_heads * head_dim), which steadies optimisation; `fold` / `export_state`
replace it by the plain prefixes it computes, so an exported prefix never needs the MLP.

Names. Each block's `attention` becomes a `PrefixAttention` in place (its class changes; the object, its
wq/wk/wv/wo and anything earlier recipes attached stay), adding `prefix_k` / `prefix_v` (or `prefix_embed`
and `prefix_mlp`). Under tensor parallelism prefix_k / prefix_v shard by head (Shard(1)) like wk / wv's output
(not done here); the forward already reads the local head count from the tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from meshtune.config import ConfigError
from meshtune.models.decoder import Attention
from meshtune.recipes.base import PeftRecipe


class PrefixAttention(Attention):
    """Attention with learned key/value prefixes. Make one with `PrefixAttention.convert(attention, ...)`."""

    length: int
    reparam_hidden: int

    @classmethod
    def convert(cls, attn: Attention, length: int, reparam_hidden: int = 0, dim: int | None = None) -> PrefixAttention:
        """Turn `attn` into a PrefixAttention in place and add the prefix parameters on its device.

        Changing the class of the existing object (rather than building a new one) keeps its parameters,
        children and hooks, so names stay and recipes applied earlier (LoRA, adapters) keep working.
        """
        assert type(attn) is Attention, f"expected a plain Attention, got {type(attn).__name__}"
        attn.__class__ = cls
        attn.length, attn.reparam_hidden = length, reparam_hidden
        ref = attn.wk.weight
        kw = {"device": ref.device, "dtype": ref.dtype}
        shape = (length, attn.n_kv_heads, attn.head_dim)
        if length == 0:  # the base attention: no (empty) parameters to shard, train or export
            attn.reparam_hidden = 0
            return attn
        if reparam_hidden > 0:
            dim = dim if dim is not None else attn.wq.in_features
            attn.prefix_embed = nn.Parameter(torch.empty(length, dim, **kw))
            attn.prefix_mlp = nn.Sequential(nn.Linear(dim, reparam_hidden, **kw), nn.Tanh(),
                                            nn.Linear(reparam_hidden, 2 * attn.n_kv_heads * attn.head_dim, **kw))
        else:
            attn.prefix_k = nn.Parameter(torch.empty(shape, **kw))
            attn.prefix_v = nn.Parameter(torch.empty(shape, **kw))
        attn.reset_prefix()
        return attn

    @torch.no_grad()
    def reset_prefix(self) -> None:
        """Prefixes (or the reparameterisation's input) ~ N(0, 1), like PEFT's prefix embedding."""
        if self.length == 0:
            return
        if self.reparam_hidden > 0:
            nn.init.normal_(self.prefix_embed)
            for m in self.prefix_mlp:
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
        else:
            nn.init.normal_(self.prefix_k)
            nn.init.normal_(self.prefix_v)

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value prefixes, each (P, n_kv_heads, head_dim)."""
        if self.reparam_hidden > 0:
            kv = self.prefix_mlp(self.prefix_embed)  # (P, 2 * Hkv * D)
            k, v = kv.view(self.length, 2, -1, self.head_dim).unbind(1)
            return k, v
        # under tensor parallelism the prefixes are DTensors split by kv head, like wk/wv's outputs
        return tuple(t.to_local() if isinstance(t, DTensor) else t for t in (self.prefix_k, self.prefix_v))

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the reparameterisation MLP by the plain prefixes it computes (same outputs)."""
        if self.length == 0 or self.reparam_hidden == 0:
            return
        k, v = self.prefix()
        trainable = self.prefix_embed.requires_grad
        del self.prefix_embed, self.prefix_mlp
        self.prefix_k = nn.Parameter(k.clone(), requires_grad=trainable)
        self.prefix_v = nn.Parameter(v.clone(), requires_grad=trainable)
        self.reparam_hidden = 0

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        if self.length == 0:
            return super().forward(x, cos, sin, segments)
        q, k, v = self.qkv(x, cos, sin)
        B = x.shape[0]
        pk, pv = self.prefix()  # (P, Hkv, D), not rotated: prefixes have no position
        k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=1)  # (B, P+T, Hkv, D)
        v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=1)
        return self.attend(q, k, v, segments)  # every query reads all P prefix positions, then causally

    def extra_repr(self) -> str:
        return f"prefix_length={self.length}, reparam_hidden={self.reparam_hidden}"


def fold_prefix_state(state: dict[str, torch.Tensor], n_kv_heads: int) -> dict[str, torch.Tensor]:
    """Plain `X.prefix_k` / `X.prefix_v` tensors (P, n_kv_heads, head_dim) from a full state dict, computing
    them from `X.prefix_embed` and `X.prefix_mlp.{0,2}.*` where the reparameterisation was used."""
    out = {k: v for k, v in state.items() if k.endswith((".prefix_k", ".prefix_v"))}
    for key, embed in state.items():
        if not key.endswith(".prefix_embed"):
            continue
        owner = key[: -len(".prefix_embed")]
        w0, b0 = state[f"{owner}.prefix_mlp.0.weight"], state[f"{owner}.prefix_mlp.0.bias"]
        w2, b2 = state[f"{owner}.prefix_mlp.2.weight"], state[f"{owner}.prefix_mlp.2.bias"]
        kv = F.linear(torch.tanh(F.linear(embed, w0, b0)), w2, b2)  # (P, 2 * Hkv * D)
        k, v = kv.view(embed.shape[0], 2, n_kv_heads, -1).unbind(1)
        out[f"{owner}.prefix_k"], out[f"{owner}.prefix_v"] = k.contiguous(), v.contiguous()
    return out


class PrefixRecipe(PeftRecipe):
    """Turn every block's attention into a PrefixAttention; train only the prefixes (or their MLP)."""

    param_markers = ("prefix_",)
    n_kv_heads: int | None = None  # set by apply: export needs it to split the reparameterisation's output

    def apply(self, model: nn.Module) -> nn.Module:
        c = self.cfg.prefix
        if not 0 <= c.length <= model.cfg.max_seq_len:
            raise ConfigError(f"recipe.prefix.length: {c.length} must be in [0, model.max_seq_len="
                              f"{model.cfg.max_seq_len}]; use a shorter prefix")
        self.n_kv_heads = model.cfg.n_kv_heads or model.cfg.n_heads
        for block in model.layers.values():
            PrefixAttention.convert(block.attention, c.length, c.reparam_hidden, model.cfg.dim)
        self.freeze_base(model)
        return model

    def init_weights(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, PrefixAttention):
                m.reset_prefix()

    def fold(self, model: nn.Module) -> nn.Module:
        """Fold the reparameterisation of every layer into plain prefixes, in place."""
        for m in model.modules():
            if isinstance(m, PrefixAttention):
                m.fold()
        return model

    def after_tp(self, model: nn.Module, tp_mesh) -> None:
        """Key/value prefixes (P, kv heads, head dim) split by kv head, as wk/wv split theirs."""
        from torch.distributed.tensor import Shard, distribute_tensor

        for module in model.modules():
            for name in ("prefix_k", "prefix_v"):
                param = module._parameters.get(name)
                if param is not None:
                    module.register_parameter(name, nn.Parameter(distribute_tensor(param, tp_mesh, [Shard(1)]),
                                                                 requires_grad=param.requires_grad))

    def export_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Plain prefixes per layer (`layers.{i}.attention.prefix_k` / `prefix_v`), the MLP folded away."""
        assert self.n_kv_heads is not None, "PrefixRecipe.export_state needs apply(model) first"
        return fold_prefix_state(state, self.n_kv_heads)
