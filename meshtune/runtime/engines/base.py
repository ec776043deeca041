"""The Engine protocol: what a data-parallel engine implements behind the one training loop.

The Trainer owns the loop (micro-batches, loss scaling by global tokens, recipes' hooks, LR schedule, eval,
metrics); an engine owns only what differs between libraries. `NativeEngine`, `DeepSpeedEngine` and
`FairScaleEngine` implement it; a test checks each against this protocol, so a fourth engine is one module
that does too, plus its line in `build_engine`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Engine(Protocol):
    name: str
    """`parallel.engine` value; recorded in every checkpoint's meta.json (resume refuses another engine's)."""
    owns_precision: bool
    """The engine keeps bf16 weights itself (the trainer then does not autocast)."""
    model: torch.nn.Module
    """The module the trainer calls (the engine's wrapper where it has one)."""

    def accumulate(self, last: bool) -> AbstractContextManager:
        """Context for one micro-batch's forward + backward; gradients are reduced only when `last`."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the micro-batch loss, already scaled by dp / global tokens (engines must not rescale)."""

    def step(self) -> float:
        """Clip the global gradient norm to optim.grad_clip and step the optimizer; returns the norm."""

    def zero_grad(self) -> None:
        """Drop the gradients (a no-op where `step` already did)."""

    def save(self, checkpointer, step: int, meta: dict) -> Path:
        """Write the model and optimizer state inside Checkpointer's atomic step_N.tmp -> step_N scheme."""

    def load(self, checkpointer, path: Path) -> dict:
        """Restore what `save` wrote (refusing another engine's checkpoint); returns its meta.json."""
