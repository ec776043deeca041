"""Models: a Llama-style decoder built by `build_model(cfg.model, vocab_size, device)`.

`meshtune.models.sizes` (derived sizes) imports no torch, so this package imports the decoder lazily.
"""

__all__ = ["Transformer", "build_model"]


def __getattr__(name: str):
    if name in __all__:
        from meshtune.models import decoder

        return getattr(decoder, name)
    raise AttributeError(f"module 'meshtune.models' has no attribute {name!r}")
