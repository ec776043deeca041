"""Sizes the decoder derives from its config (no torch import: launch-time checks use them)."""

from __future__ import annotations

import math

from meshtune.config import ModelConfig


def ffn_hidden_dim(cfg: ModelConfig) -> int:
    """SwiGLU hidden size: `cfg.ffn_dim`, or Llama's 2/3 * 4 * dim rounded up to a multiple of 32."""
    if cfg.ffn_dim > 0:
        return cfg.ffn_dim
    hidden = int(2 * 4 * cfg.dim / 3)  # 2/3 keeps SwiGLU's three matrices at the cost of a 4x two-matrix MLP
    return 32 * math.ceil(hidden / 32)


def head_dim(cfg: ModelConfig) -> int:
    """Width of one attention head: `cfg.head_dim`, or dim / n_heads."""
    return cfg.head_dim or cfg.dim // cfg.n_heads
