"""Data-parallel engines behind the one training loop: `parallel.engine: native | deepspeed | fairscale`.

Each implements the `Engine` protocol (meshtune/runtime/engines/base.py): accumulate, backward, step,
zero_grad, save and load, inside Checkpointer's atomic step_N.tmp -> step_N scheme.

`native` is PyTorch's DDP / FSDP2 / TP / pipelining as parallelize() laid them out. The others wrap a
replicated model (tp = pp = 1) and are imported only when selected, so their packages stay optional.
"""

from __future__ import annotations

from pathlib import Path

import torch

from meshtune.config import ConfigError
from meshtune.runtime.checkpoint import Checkpointer
from meshtune.runtime.engines.base import Engine
from meshtune.runtime.grads import clip_grad_norm_, maybe_no_sync
from meshtune.schema import Config

ENGINES = ("native", "deepspeed", "fairscale")
__all__ = ["ENGINES", "Engine", "NativeEngine", "build_engine", "check_saved_by", "import_engine"]
INSTALL = {"deepspeed": "pip install 'meshtune[deepspeed]' (torch installed first)",
           "fairscale": "pip install 'meshtune[fairscale]' (torch installed first)"}


class NativeEngine:
    """PyTorch's own data parallelism (DDP, FSDP2, HSDP; with TP and pipelining): what parallelize() built."""

    name = "native"
    owns_precision = False  # bf16 comes from autocast (or FSDP2's MixedPrecisionPolicy), not from the engine

    def __init__(self, model: torch.nn.Module, optimizer, grad_clip: float, pp_group=None):
        self.model, self.optimizer = model, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grad_clip, self.pp_group = grad_clip, pp_group

    def accumulate(self, last: bool):
        return maybe_no_sync(self.model, skip_sync=not last)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        norm = clip_grad_norm_(self.params, self.grad_clip, self.pp_group)
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


def build_engine(cfg: Config, mesh, device: torch.device, model: torch.nn.Module, optimizer, accum_steps: int):
    """Wrap the parallelised `model` and its `optimizer` for `parallel.engine`.

    Returns (model to call, optimizer the LR schedule drives, engine). For `native` both come back as given;
    `deepspeed` returns its DeepSpeedEngine (an nn.Module) and meshtune's own torch AdamW; `fairscale`
    returns the DDP model and an OSS optimizer (build the LR schedule on it)."""
    name = cfg.parallel.engine
    if name == "native":
        pp = mesh.get("pp")
        return model, optimizer, NativeEngine(model, optimizer, cfg.optim.grad_clip,
                                              pp.get_group() if pp is not None else None)
    if name == "deepspeed":
        from meshtune.runtime.engines.deepspeed import DeepSpeedEngine

        engine = DeepSpeedEngine(cfg, mesh, device, model, optimizer, accum_steps)
        return engine.model, optimizer, engine
    if name == "fairscale":
        from meshtune.runtime.engines.fairscale import FairScaleEngine

        engine = FairScaleEngine(cfg, model, optimizer)
        return model, engine.optimizer, engine
    raise ConfigError(f"parallel.engine: {name!r} is not one of {', '.join(ENGINES)}; pick one of them")
