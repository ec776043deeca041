"""Run metrics: a JSONL file always, a progress bar on a terminal, wandb when enabled. Rank 0 only.

metrics.jsonl holds one JSON object per line: training lines (step, loss, lr, grad_norm, tokens_per_s,
step_time_s, mem_gb), evaluation lines (step, eval_loss, eval_accuracy) and event lines (`"event": "start"` with
trainable_params, total_params, world_size when a run starts or resumes; `"stopped"`); each has a unix `time`.
It is appended to, so a resumed run continues the same file. wandb runs offline when no API key is configured;
the run id is stored in the run directory so a resumed job continues the same wandb run (one run per job, never
one per rank).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import uuid
from pathlib import Path

import torch

from meshtune.config import MetricsConfig


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


class Metrics:
    def __init__(self, cfg: MetricsConfig, run_dir: str | Path, is_main: bool, total_steps: int,
                 config_dict: dict | None = None, start_step: int = 0):
        self.is_main = is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self._bar = None
        self._wandb = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        if cfg.progress and sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if cfg.wandb:
            self._wandb = _start_wandb(cfg, Path(run_dir), config_dict or {})

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=record["step"])
        if self._bar is not None and "loss" in record:
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if not self.is_main:
            return
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(cfg: MetricsConfig, run_dir: Path, config_dict: dict):
    import wandb

    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        mode = "offline"  # no key: keep everything local, never prompt for a login
    else:
        mode = os.environ.get("WANDB_MODE", "online")
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    return wandb.init(project=cfg.wandb_project, name=run_dir.name, id=run_id, resume="allow", mode=mode,
                      dir=str(run_dir), config=config_dict)
