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
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from meshtune.config import ConfigError
from meshtune.models.hf import check_matches_hf, is_hf_dir, load_hf_state_dict

_STEP_DIR = re.compile(r"^step_(\d+)$")
# DCP warns on every save/load without a process group; one process is a normal way to run here
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints under `ckpt_root`, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


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

    def __init__(self, run_dir: str | Path, rank: int, keep_last: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.rank = rank
        self.keep_last = keep_last

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
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank{self.rank}.pt")
        _barrier()
        if self.rank == 0:
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=1))
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
            dcp.load(state, checkpoint_id=str(path))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        except (Exception, dcp.CheckpointException) as e:  # the latter is a BaseException
            first = _first_failure(e)
            raise ConfigError(f"checkpoint.resume: {path} does not fit this model ({first}); resume with the "
                              "model config it was saved with, or use a new run_dir / checkpoint.resume=never") from e
        rng_file = path / "rng" / f"rank{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        return json.loads((path / "meta.json").read_text())


def _first_failure(e: BaseException) -> str:
    """The underlying error of a DCP CheckpointException (which wraps each rank's), as one short line."""
    if isinstance(e, dcp.CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    lines = str(e).strip().splitlines()
    return (lines[-1] if lines else type(e).__name__)[:200]


def load_model_weights(model, path: str | Path, strict: bool = True, model_cfg=None, vocab_size: int = 0) -> None:
    """Load model weights from outside a run: a .safetensors file, a `weights_only` torch file, or a
    meshtune checkpoint folder, or a Hugging Face Llama checkpoint directory (its sizes are checked
    against `model_cfg` when given). Arbitrary pickles are refused (weights_only=True rejects code). With
    `strict=False` parameters missing from the file (a recipe's adapters) keep their values."""
    path = Path(path)
    if is_hf_dir(path):  # a Hugging Face Llama-family directory: config.json + safetensors
        if model_cfg is not None:
            check_matches_hf(model_cfg, vocab_size, path)
        full = load_hf_state_dict(path)
    elif path.is_dir():
        sd = get_model_state_dict(model)
        planner = dcp.DefaultLoadPlanner(allow_partial_load=not strict)
        dcp.load({"model": sd}, checkpoint_id=str(path), planner=planner)
        set_model_state_dict(model, sd, options=StateDictOptions(strict=strict))
        return
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        full = load_file(str(path))
    else:
        try:
            full = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for pickles with code in them
            raise ConfigError(f"init_from: {path} is not a plain tensor file ({type(e).__name__}); meshtune loads "
                             "only safetensors or weights_only torch files, never arbitrary pickles") from None
    options = StateDictOptions(full_state_dict=True, strict=strict)
    try:
        set_model_state_dict(model, full, options=options)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"init_from: {path} does not match the model ({first}); check model.* sizes") from None


def save_model_weights(model, path: str | Path, rank: int) -> None:
    """Gather the full model weights and write them as one safetensors file on rank 0."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        from safetensors.torch import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in sd.items()}
        # tied embeddings share storage; safetensors refuses aliased tensors, so store a copy
        seen = {}
        for k, v in tensors.items():
            if v.data_ptr() in seen:
                tensors[k] = v.clone()
            seen.setdefault(v.data_ptr(), k)
        save_file(tensors, str(path))
