"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751).

    meshtune train meshtune/configs/adapters/tiny.yaml                  # recipe.name: adapters
    meshtune train cfg.yaml recipe.name=adapters recipe.adapters.bottleneck=32 recipe.adapters.where=mlp

An adapter maps h -> h + up(gelu(down(h))) with a small bottleneck; it is inserted on the output of each
block's attention and/or MLP (before the residual add), as in Houlsby. The up-projection starts at zero, so
the adapted model is exactly the base model at initialisation, and only adapter parameters train.

Names. The adapter becomes a child `adapter` of the module it follows (`layers.0.attention.adapter.down.weight`)
and a forward hook on that module applies it to the module's output. Nothing is wrapped, so every base
parameter keeps its name (base checkpoints, HF maps and TP plans are untouched), and the hook fires inside
activation checkpointing, torch.compile and FSDP like the module's own forward. Under tensor parallelism the
adapter's parameters are replicated: it sees the full hidden size after the rowwise `wo` / `w2` reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshtune.recipes.base import PeftRecipe


class Adapter(nn.Module):
    """h + up(gelu(down(h))): dim -> bottleneck -> dim, with the up-projection initialised to zero."""

    def __init__(self, dim: int, bottleneck: int, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """down: nn.Linear's default init; up and both biases: zero (exact identity until trained)."""
        self.down.reset_parameters()
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h)))


def _apply_adapter(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the module's output through its `adapter` child (module-level so deepcopy/pickle work)."""
    return module.adapter(output)


def add_adapter(module: nn.Module, dim: int, bottleneck: int) -> Adapter:
    """Give `module` an `adapter` child applied to its output; parameters follow the module's device/dtype."""
    ref = next(module.parameters())
    module.adapter = Adapter(dim, bottleneck, device=ref.device, dtype=ref.dtype)
    module.register_forward_hook(_apply_adapter)
    return module.adapter


class AdapterRecipe(PeftRecipe):
    """Add adapters after attention and/or MLP outputs of every block; train only them."""

    param_markers = ("adapter",)

    def apply(self, model: nn.Module) -> nn.Module:
        c = self.cfg.adapters
        dim = model.cfg.dim
        for block in model.layers.values():
            if c.where in ("both", "attention"):
                add_adapter(block.attention, dim, c.bottleneck)
            if c.where in ("both", "mlp"):
                add_adapter(block.feed_forward, dim, c.bottleneck)
        self.freeze_base(model)
        return model

    def init_weights(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, Adapter):
                m.reset_parameters()
