"""Distributed checkpoints with torch.distributed.checkpoint (DCP): atomic, resharding, kept last-k.

Layout of run_dir/checkpoints/:
    step_000040/            a complete checkpoint: DCP shards + .metadata, meta.json, rng/rank*.pt
    step_000060.tmp/        being written (or left by a crash): never picked on resume, removed later

Atomicity: every rank writes into `step_N.tmp/`; after a barrier rank 0 writes meta.json last and renames the
folder to `step_N/` (a rename is atomic on POSIX file systems). A checkpoint is complete iff its folder has
no `.tmp` suffix and holds meta.json, so a crash mid-save never leaves something that `resume: auto` picks.

Model and optimizer state go through `get_state_dict`/`set_state_dict`, which give fully-qualified names
without DDP/checkpoint-wrapper prefixes and DTensor shards under FSDP, so DCP can load a checkpoint saved
with dp_shard=2 into dp_shard=1 or DDP (resharding). Scheduler, sampler and step are the same on every
rank and live in meta.json; RNG states are per rank (a rank with no saved state on a larger world reseeds).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from meshtune.artifacts.find import complete_checkpoints
from meshtune.artifacts.load import first_line
from meshtune.artifacts.safe import SafeLoadPlanner, SafeReader, load_torch_file
from meshtune.config import ConfigError

__all__ = ["Checkpointer", "complete_checkpoints", "load_rng_state", "rng_state", "set_rng_state"]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Saves and restores a training run's state under `run_dir/checkpoints`."""

    def __init__(self, run_dir: str | Path, rank: int, keep_last: int = 2, model_meta: dict | None = None):
        self.root = Path(run_dir) / "checkpoints"
        self.rank = rank
        self.keep_last = keep_last
        self.model_meta = dict(model_meta or {})  # e.g. vocab_size: lets readers size the model from meta.json

    def latest(self) -> Path | None:
        done = complete_checkpoints(self.root)
        return done[-1] if done else None

    def save(self, step: int, model, optimizer, meta: dict, write=None) -> Path:
        """Write a checkpoint of `model`, `optimizer` and the JSON-able `meta` for `step`, atomically.

        `write(tmp_dir)`, when given, writes the model and optimizer state instead of DCP (an engine's own
        format, see meshtune.runtime.engines); RNG states, meta.json and the atomic rename stay the same."""
        final = self.root / f"step_{step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this step
            tmp.mkdir(parents=True)
        _barrier()
        if write is not None:
            write(tmp)
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            with warnings.catch_warnings():  # DCP warns on every save without a process group
                warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank{self.rank}.pt")
        _barrier()
        if self.rank == 0:
            (tmp / "meta.json").write_text(json.dumps({**self.model_meta, **meta, "step": step}, indent=1))
            if final.exists():  # re-saving a step (e.g. resumed and saved again): replace it
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        done = complete_checkpoints(self.root)
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, path: Path, model, optimizer) -> dict:
        """Restore `model` and `optimizer` from `path` (any layout) and return its meta.json contents."""
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise ConfigError(f"checkpoint.resume: {path} is not a complete meshtune checkpoint (no meta.json); "
                              "give a step_N folder or use resume=auto")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        try:
            with warnings.catch_warnings():  # DCP warns on every load without a process group
                warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
                dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        except ConfigError:  # an unsafe or damaged file, named by the safe reader
            raise
        except (Exception, dcp.CheckpointException) as e:  # the latter is a BaseException
            raise ConfigError(f"checkpoint.resume: {path} does not fit this model ({first_line(e)}); resume with "
                              "the model config it was saved with, or use a new run_dir / checkpoint.resume=never"
                              ) from None
        load_rng_state(path, self.rank)
        return json.loads((path / "meta.json").read_text())


def load_rng_state(ckpt: Path, rank: int) -> None:
    """Restore this rank's RNG state saved in `ckpt` (a rank with no saved state, on a larger world, keeps its
    own), reading the file weights-only."""
    rng_file = Path(ckpt) / "rng" / f"rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(load_torch_file(rng_file))
