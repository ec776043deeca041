"""`parallel.engine: native`: PyTorch's own DDP / FSDP2 / HSDP (with TP and pipelining) as parallelize() laid
them out, and what every engine shares: refusing another engine's checkpoint, importing an optional library."""

from __future__ import annotations

from pathlib import Path

import torch

from meshtune.config import ConfigError
from meshtune.runtime.checkpoint import Checkpointer
from meshtune.runtime.grads import clip_grad_norm_, maybe_no_sync

INSTALL = {"deepspeed": "pip install 'meshtune[deepspeed]' (torch installed first)",
           "fairscale": "pip install 'meshtune[fairscale]' (torch installed first)"}


class NativeEngine:
    """PyTorch's own data parallelism (DDP, FSDP2, HSDP; with TP and pipelining): what parallelize() built."""

    name = "native"
    owns_precision = False  # bf16 comes from autocast (or FSDP2's MixedPrecisionPolicy), not from the engine

    def __init__(self, model: torch.nn.Module, optimizer, grad_clip: float, pp_group=None, copies=()):
        self.model, self.optimizer = model, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grad_clip, self.pp_group = grad_clip, pp_group
        self.copies = list(copies)  # parameters the norm counts elsewhere (a tied head across pipeline stages)

    def accumulate(self, last: bool):
        return maybe_no_sync(self.model, skip_sync=not last)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        norm = clip_grad_norm_(self.params, self.grad_clip, self.pp_group, self.copies)
        self.optimizer.step()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, checkpointer: Checkpointer, step: int, meta: dict) -> Path:
        return checkpointer.save(step, self.model, self.optimizer, {**meta, "engine": self.name})

    def load(self, checkpointer: Checkpointer, path: Path) -> dict:
        check_saved_by(path, self.name)
        return checkpointer.load(path, self.model, self.optimizer)


def check_saved_by(path: str | Path, engine: str) -> None:
    """Refuse a checkpoint written by another engine (their files differ) with a one-line ConfigError."""
    import json

    meta_file = Path(path) / "meta.json"
    if not meta_file.is_file():
        return  # Checkpointer.load names the missing meta.json
    saved = json.loads(meta_file.read_text()).get("engine", "native")
    if saved != engine:
        raise ConfigError(f"checkpoint.resume: {path} was saved with parallel.engine={saved}, this run uses "
                          f"{engine}; resume with parallel.engine={saved}, or start from its weights via "
                          "`meshtune export` + init_from")


def import_engine(name: str):
    """The engine's library, or a one-line ConfigError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ConfigError(f"parallel.engine: {name} is not installed ({e}); {INSTALL[name]}") from None
