"""Data-parallel engines behind the one training loop: `parallel.engine: native | deepspeed | fairscale`.

Each implements the `Engine` protocol (meshtune/runtime/engines/base.py): accumulate, backward, step,
zero_grad, save and load, inside Checkpointer's atomic step_N.tmp -> step_N scheme.

`native` is PyTorch's DDP / FSDP2 / TP / pipelining as parallelize() laid them out. The others wrap a
replicated model (tp = pp = 1) and are imported only when selected, so their packages stay optional.
"""

from __future__ import annotations

import torch

from meshtune.config import ConfigError
from meshtune.runtime.engines.base import Engine
from meshtune.runtime.engines.native import INSTALL, NativeEngine, check_saved_by, import_engine
from meshtune.schema import Config

ENGINES = ("native", "deepspeed", "fairscale")
__all__ = ["ENGINES", "INSTALL", "Engine", "NativeEngine", "build_engine", "check_saved_by", "import_engine"]
def build_engine(cfg: Config, mesh, device: torch.device, model: torch.nn.Module, optimizer, accum_steps: int,
                 copies=()):
    """Wrap the parallelised `model` and its `optimizer` for `parallel.engine`; `copies` are parameters the
    gradient norm leaves out (a tied head's copy of the embedding on the last pipeline stage).

    Returns (model to call, optimizer the LR schedule drives, engine). For `native` both come back as given;
    `deepspeed` returns its DeepSpeedEngine (an nn.Module) and meshtune's own torch AdamW; `fairscale`
    returns the DDP model and an OSS optimizer (build the LR schedule on it)."""
    name = cfg.parallel.engine
    if name == "native":
        pp = mesh.get("pp")
        return model, optimizer, NativeEngine(model, optimizer, cfg.optim.grad_clip,
                                              pp.get_group() if pp is not None else None, copies)
    if name == "deepspeed":
        from meshtune.runtime.engines.deepspeed import DeepSpeedEngine

        engine = DeepSpeedEngine(cfg, mesh, device, model, optimizer, accum_steps)
        return engine.model, optimizer, engine
    if name == "fairscale":
        from meshtune.runtime.engines.fairscale import FairScaleEngine

        engine = FairScaleEngine(cfg, model, optimizer, device)
        return model, engine.optimizer, engine
    raise ConfigError(f"parallel.engine: {name!r} is not one of {', '.join(ENGINES)}; pick one of them")
