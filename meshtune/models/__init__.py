"""Models: a Llama-style decoder built by `build_model(cfg.model, vocab_size, device)`."""

from meshtune.models.llama import Transformer, build_model

__all__ = ["Transformer", "build_model"]
