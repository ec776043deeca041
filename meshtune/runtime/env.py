"""DistEnv: who this process is, read once from the torchrun or SLURM environment.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT. Under a bare
`srun` (no torchrun) SLURM sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID. With neither, this is a single
process. Everything downstream receives the DistEnv object; nothing re-reads the environment later.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    # under torchrun: seconds it waits for the ranks to stop after a signal before it SIGKILLs them
    # (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, set by `meshtune launch --grace-period`; torchrun's default 30)
    grace_s: float | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, use_cuda: bool | None = None) -> DistEnv:
        """Read rank and world from torchrun's variables, else SLURM's, else a single process.

        Args:
            environ: the environment to read (default os.environ).
            use_cuda: force the device type; default: CUDA when available.
        """
        env = os.environ if environ is None else environ

        def get(*names: str, default: int) -> int:
            for name in names:
                if env.get(name):
                    try:
                        return int(env[name])
                    except ValueError:
                        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None
            return default

        rank = get("RANK", "SLURM_PROCID", default=0)
        world = get("WORLD_SIZE", "SLURM_NTASKS", default=1)
        local_rank = get("LOCAL_RANK", "SLURM_LOCALID", default=0)
        local_world = get("LOCAL_WORLD_SIZE", default=world)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}; check RANK/WORLD_SIZE")
        cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
        if cuda:
            n = torch.cuda.device_count()
            if local_rank >= n:
                raise ValueError(f"local rank {local_rank} has no GPU: this node has {n}; "
                                 f"lower --nproc-per-node to {n}")
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        grace = float(env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or 30) if "TORCHELASTIC_RUN_ID" in env else None
        return cls(rank, world, local_rank, local_world, device, grace)

    def init_process_group(self, timeout_s: float = 600.0) -> None:
        """Join the default process group (idempotent; a single process needs none)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size == 1 or dist.is_initialized():
            return
        dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size,
                                timeout=timedelta(seconds=timeout_s),
                                device_id=self.device if self.device.type == "cuda" else None)


def ensure_process_group(device: torch.device) -> None:
    """A one-process group (gloo on CPU, NCCL on GPU, an in-memory store) when none exists. DeepSpeed and
    FairScale need a default group even alone (DeepSpeed would otherwise look for MPI), and read the
    launcher's variables, which are set for one rank where absent."""
    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    dist.init_process_group("gloo" if device.type == "cpu" else "nccl", store=dist.HashStore(), rank=0,
                            world_size=1)
