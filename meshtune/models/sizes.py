"""Sizes the decoder derives from its config (no torch import: launch-time checks use them)."""

from __future__ import annotations

import math

from meshtune.config import ConfigError, ModelConfig


def ffn_hidden_dim(cfg: ModelConfig) -> int:
    """SwiGLU hidden size: `cfg.ffn_dim`, or Llama's 2/3 * 4 * dim rounded up to a multiple of 32."""
    if cfg.ffn_dim > 0:
        return cfg.ffn_dim
    hidden = int(2 * 4 * cfg.dim / 3)  # 2/3 keeps SwiGLU's three matrices at the cost of a 4x two-matrix MLP
    return 32 * math.ceil(hidden / 32)


def head_dim(cfg: ModelConfig) -> int:
    """Width of one attention head: `cfg.head_dim`, or dim / n_heads."""
    return cfg.head_dim or cfg.dim // cfg.n_heads


def layer_windows(cfg: ModelConfig) -> list[int]:
    """Each layer's attention window (0 = full causal attention), from model.sliding_window and layer_types.

    Raises:
        ConfigError: when model.layer_types does not give one kind per layer.
    """
    if cfg.layer_types and len(cfg.layer_types) != cfg.n_layers:
        raise ConfigError(f"model.layer_types has {len(cfg.layer_types)} entries for {cfg.n_layers} layers; give "
                          "one per layer (or [] for the same attention in every layer)")
    if cfg.sliding_window < 0:
        raise ConfigError(f"model.sliding_window must be >= 0 (0 = full attention), got {cfg.sliding_window}")
    if not cfg.layer_types:
        return [cfg.sliding_window] * cfg.n_layers
    return [cfg.sliding_window if t == "sliding_attention" else 0 for t in cfg.layer_types]
