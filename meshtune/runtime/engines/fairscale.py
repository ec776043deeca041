"""`parallel.engine: fairscale`: FairScale's OSS optimizer-state sharding (ZeRO-1) with torch DDP.

FairScale 0.4.13 is frozen (2022); its OSS still works on current torch. It is paired with torch's
DistributedDataParallel, not FairScale's ShardedDataParallel: with its default `reduce_buffer_size` ShardedDDP
drifts ~1e-3 from the reference after one step (silently wrong results), OSS + DDP matches to fp32 rounding.
FairScale's FSDP needs CUDA streams and now lives in PyTorch as FSDP2, so sharded parameters are refused in
config validation with a pointer to `parallel.engine=native`.

DDP all-reduces full gradients on every rank, so clipping is meshtune's own global-norm clip; OSS then updates
each rank's shard of the parameters with its shard of the AdamW state and broadcasts the new values.

Checkpoints: the model through DCP under "model" (so `meshtune export` and `init_from` read it like a native
one) and the optimizer state consolidated on rank 0 into `fairscale_optim.pt`, loaded by every rank.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from meshtune.runtime.checkpoint import Checkpointer
from meshtune.runtime.engines.native import NativeEngine, check_saved_by, import_engine
from meshtune.runtime.env import ensure_process_group
from meshtune.schema import Config

OPTIM_FILE = "fairscale_optim.pt"


class FairScaleEngine(NativeEngine):
    """OSS(AdamW) over the DDP-wrapped model: the native loop with a sharded optimizer."""

    name = "fairscale"

    def __init__(self, cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        import_engine("fairscale")
        from fairscale.optim.oss import OSS

        ensure_process_group(device)  # OSS partitions over the default group, also of one process
        # the same param groups (weight decay on matrices only) and hyperparameters as meshtune's AdamW
        # (the peak lr: the LR schedule built on OSS afterwards scales it again)
        groups = [{**{k: v for k, v in g.items() if k != "initial_lr"}, "lr": g.get("initial_lr", g["lr"])}
                  for g in optimizer.param_groups]
        defaults = {k: v for k, v in optimizer.defaults.items() if k in ("lr", "betas", "eps", "weight_decay")}
        oss = OSS(groups, optim=torch.optim.AdamW, **defaults)
        super().__init__(model, oss, cfg.optim.grad_clip)

    def save(self, checkpointer: Checkpointer, step: int, meta: dict) -> Path:
        def write(tmp: Path) -> None:
            dcp.save({"model": get_model_state_dict(self.model)}, checkpoint_id=str(tmp))
            self.optimizer.consolidate_state_dict(recipient_rank=0)  # a collective
            if checkpointer.rank == 0:
                torch.save(self.optimizer.state_dict(), tmp / OPTIM_FILE)

        return checkpointer.save(step, self.model, None, {**meta, "engine": self.name}, write=write)

    def load(self, checkpointer: Checkpointer, path: Path) -> dict:
        import json

        from meshtune.artifacts.safe import dcp_load, load_torch_file
        from meshtune.runtime.checkpoint import load_rng_state

        check_saved_by(path, self.name)
        path = Path(path)
        state = {"model": get_model_state_dict(self.model)}
        dcp_load(state, path)
        set_model_state_dict(self.model, state["model"])
        self.optimizer.load_state_dict(load_torch_file(path / OPTIM_FILE))
        load_rng_state(path, checkpointer.rank)
        return json.loads((path / "meta.json").read_text())
