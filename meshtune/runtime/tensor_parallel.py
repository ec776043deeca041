"""Tensor parallelism with DTensor: apply the model's `tp_plan()` over the mesh's "tp" axis.

Shapes must split evenly: query heads, key/value heads, the MLP hidden size and the vocabulary are all
divided by the tp degree, and `check_tp` says which config key to change when they are not.
"""

from __future__ import annotations

from torch import nn

from meshtune.config import ConfigError, ModelConfig


def check_tp(cfg: ModelConfig, vocab_size: int, tp: int) -> None:
    """Raise ConfigError naming the model key that `tp` does not divide."""
    if tp == 1:
        return
    from meshtune.models.llama import ffn_hidden_dim

    sizes = [("model.n_heads", cfg.n_heads), ("model.n_kv_heads", cfg.n_kv_heads or cfg.n_heads),
             ("model.ffn_dim (the MLP hidden size)", ffn_hidden_dim(cfg)), ("model.vocab_size", vocab_size)]
    for key, size in sizes:
        if size % tp:
            raise ConfigError(f"{key}: {size} is not divisible by parallel.tp={tp}; tensor parallelism splits it "
                              f"evenly, so choose a tp that divides {size} or change {key.split(' ')[0]}")
    if cfg.tie_embeddings:
        raise ConfigError("model.tie_embeddings: tied embeddings are not supported with parallel.tp > 1; "
                          "set model.tie_embeddings=false or parallel.tp=1")


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool) -> None:
    """Shard `model` in place over the 1-D `tp_mesh` following `model.tp_plan()`."""
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(model, tp_mesh, model.tp_plan(sequence_parallel))
