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

import errno
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from meshtune.artifacts.find import complete_checkpoints
from meshtune.artifacts.load import first_line
from meshtune.artifacts.packed import pack
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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a read-only file system, ...): the message names the
    folder, the cause and the last complete checkpoint, which is left as it was."""


def _os_cause(e: BaseException) -> str | None:
    """The strerror of the first OSError in `e`, its causes, or (a DCP CheckpointException) its ranks' errors."""
    seen, todo = set(), [e]
    while todo:
        exc = todo.pop(0)
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return os.strerror(exc.errno)
        todo += [exc.__cause__, exc.__context__, *(f[0] for f in (getattr(exc, "failures", None) or {}).values())]
    return None


def _free_bytes(path: Path) -> int | None:
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    try:
        return shutil.disk_usage(existing).free if existing is not None else None
    except OSError:
        return None


class Checkpointer:
    """Saves and restores a training run's state under `run_dir/checkpoints`."""

    def __init__(self, run_dir: str | Path, rank: int, keep_last: int = 2, model_meta: dict | None = None,
                 grace_s: float | None = None):
        self.root = Path(run_dir) / "checkpoints"
        self.rank = rank
        self.keep_last = keep_last
        self.grace_s = grace_s  # torchrun's wait between a signal and SIGKILL (None: not under torchrun)
        self._warned = False
        self.model_meta = dict(model_meta or {})  # e.g. vocab_size: lets readers size the model from meta.json
        self.last_save_s: float | None = None  # how long the last save took (in meta.json as save_s)

    def latest(self) -> Path | None:
        done = complete_checkpoints(self.root)
        return done[-1] if done else None

    def warn_if_slow(self, save_s: float | None) -> None:
        """Rank 0, once: warn when a save takes longer than torchrun's grace period after a signal, so a
        preemption would SIGKILL the ranks mid-save (the previous checkpoint survives, the work since not)."""
        if self.rank != 0 or self._warned or save_s is None or self.grace_s is None or save_s <= self.grace_s:
            return
        self._warned = True
        print(f"meshtune: warning: a checkpoint save takes {save_s:.1f} s, longer than the {self.grace_s:.0f} s "
              "torchrun waits after a signal before it kills the ranks: a preemption would lose it; pass "
              f"`meshtune launch --grace-period {int(2 * save_s) + 10}`", file=sys.stderr, flush=True)

    def remove_stale(self) -> None:
        """Rank 0, at start-up: remove the `step_N.tmp` folders a crashed or failed save left."""
        if self.rank == 0:
            for stale in self.root.glob("step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)

    def save(self, step: int, model, optimizer, meta: dict, write=None) -> Path:
        """Write a checkpoint of `model`, `optimizer` and the JSON-able `meta` for `step`, atomically.

        `write(tmp_dir)`, when given, writes the model and optimizer state instead of DCP (an engine's own
        format, see meshtune.runtime.engines); RNG states, meta.json and the atomic rename stay the same."""
        final = self.root / f"step_{step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        began, free_before = time.perf_counter(), _free_bytes(self.root)
        try:
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
                    dcp.save({"model": pack(model_sd), "optim": optim_sd}, checkpoint_id=str(tmp))
            (tmp / "rng").mkdir(exist_ok=True)
            torch.save(rng_state(), tmp / "rng" / f"rank{self.rank}.pt")
            _barrier()
            if self.rank == 0:
                self.last_save_s = time.perf_counter() - began
                text = json.dumps({**self.model_meta, **meta, "step": step, "save_s": round(self.last_save_s, 3)},
                                  indent=1)
                (tmp / "meta.json").write_text(text)
                if final.exists():  # re-saving a step (e.g. resumed and saved again): replace it
                    shutil.rmtree(final)
                tmp.rename(final)
                self._prune()
        except (Exception, dcp.CheckpointException) as e:  # the latter is a BaseException
            raise self._write_error(tmp, e, free_before) from None
        _barrier()
        self.last_save_s = time.perf_counter() - began
        self.warn_if_slow(self.last_save_s)
        return final

    def _write_error(self, tmp: Path, e: BaseException, free_before: int | None) -> CheckpointWriteError:
        """One line for a failed save; rank 0 then removes its partial folder (which frees the space).

        torch's zip writer reports a full disk as "unexpected pos ...", not as ENOSPC: the save counts as
        out of space when no room is left now, or when less was free as it began than the last complete
        checkpoint takes (rank 0 may have freed the space before a peer looks)."""
        latest = self.latest()
        needed = sum(f.stat().st_size for f in latest.rglob("*") if f.is_file()) if latest else None
        free = _free_bytes(tmp)
        full = (free is not None and free < 1 << 20) or (needed is not None and free_before is not None and
                                                         free_before < needed)
        cause = _os_cause(e) or (os.strerror(errno.ENOSPC) if full else first_line(e))
        if cause == os.strerror(errno.ENOSPC) and free_before is not None:
            cause += f" ({free_before / 2**20:.1f} MiB were free" + (
                f", the last checkpoint takes {needed / 2**20:.1f} MiB)" if needed else ")")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the last complete checkpoint {latest.name} is kept" if latest else "no earlier checkpoint exists"
        return CheckpointWriteError(f"checkpoint: cannot write {tmp}: {cause}; {kept}")

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
        state = {"model": pack(model_sd), "optim": optim_sd}  # NF4 weights load in place through their parts
        try:
            with warnings.catch_warnings():  # DCP warns on every load without a process group
                warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
                dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=state["optim"])
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
