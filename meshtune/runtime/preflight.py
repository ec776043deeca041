"""Everything a run's ranks would check at start-up that one process can check first, without training.

    plan = preflight(cfg, world_size=8)    # ConfigError (one line) for anything a rank would refuse

`meshtune launch` and `meshtune slurm submit` run it before any rank starts or sbatch runs (torchrun starts held
beside it: meshtune/launch/gate.py), so a bad input is one line and
exit code 2 instead of every rank's traceback (or an hour in the queue); `meshtune validate` reports the plan
it returns. It reads configs, metadata and file headers only, and builds the model on the meta device: no
weights are loaded, nothing is written. The ranks repeat the checks (they cannot assume a launcher ran this).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from pathlib import Path

import torch

from meshtune.artifacts import ArtifactLoader, complete_checkpoints, find
from meshtune.artifacts.find import read_meta
from meshtune.artifacts.load import check_fits, file_shapes
from meshtune.config import ConfigError
from meshtune.data import ChatDataset, build_tokenizer, get_task
from meshtune.data.datasets import chat_template
from meshtune.data.files import iter_records, record_kind
from meshtune.data.tasks import CHAT, generate
from meshtune.models import build_model
from meshtune.models.hf import check_matches_hf
from meshtune.recipes import apply_recipes, build_recipes
from meshtune.runtime.plan import Plan, make_plan
from meshtune.schema import Config


def vocab_size(cfg: Config, tokenizer) -> int:
    """`model.vocab_size`, or the tokenizer's size rounded up to a multiple of 8 when it is 0.

    Raises:
        ConfigError: when model.vocab_size is smaller than the tokenizer's vocabulary.
    """
    if cfg.model.vocab_size == 0:
        return -(-tokenizer.vocab_size // 8) * 8  # a multiple of 8 keeps matmuls aligned
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size}; set 0 to use the tokenizer's size")
    return cfg.model.vocab_size


def check_init_from_config(cfg: Config, vocab: int):
    """The init_from artifact, when its own config can be compared before anything is built: an HF directory's
    config.json against model.* (every mismatch at once). Returns the artifact (or None)."""
    if not cfg.init_from:
        return None
    source = find(cfg.init_from, key="init_from")
    if source.kind == "hf":
        check_matches_hf(cfg.model, vocab, source.path)
    elif source.kind == "quantized":
        raise ConfigError(f"init_from: {source.path} is a quantized export, which cannot be trained from; start "
                          "from the run's merged export (`meshtune export RUN_DIR --format merged`)")
    return source


def check_run_dir(run_dir: str) -> None:
    """The run dir must be a directory this process can create and write."""
    path = Path(run_dir)
    if path.is_file():
        raise ConfigError(f"run_dir: {path} is a file; give a directory (it is created if missing)")
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    for folder in [existing, path / "checkpoints", path / "logs"]:
        if folder is not None and folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            why = "a read-only file system" if os.statvfs(folder).f_flag & os.ST_RDONLY else "permission denied"
            raise ConfigError(f"run_dir: {folder} is not writable ({why}); give a run_dir you can write")


def _resume_target(cfg: Config) -> Path | None:
    resume = cfg.checkpoint.resume
    if resume == "never":
        return None
    if resume == "auto":
        done = complete_checkpoints(Path(cfg.run_dir) / "checkpoints")
        return done[-1] if done else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise ConfigError(f"checkpoint.resume: {path} is not a complete meshtune checkpoint (no meta.json); give a "
                          "step_N folder or use resume=auto")
    return path


def check_resume(cfg: Config, plan: Plan, shapes: dict[str, tuple[int, ...]]) -> None:
    """The checkpoint a run would resume from must be this engine's, and (native) hold this model's shapes."""
    path = _resume_target(cfg)
    if path is None:
        return
    from meshtune.runtime.engines import check_saved_by

    meta = read_meta(path)
    check_saved_by(path, plan.engine)
    if plan.engine == "deepspeed":
        from meshtune.runtime.engines.deepspeed import check_resumable

        check_resumable(path, meta, plan.zero_stage, plan.world_size)
        return
    art = find(path, key="checkpoint.resume")
    saved_shapes = file_shapes(art, "checkpoint.resume")
    try:
        check_fits(saved_shapes, shapes, set(), art, "checkpoint.resume")
    except ConfigError as e:
        raise ConfigError(f"{str(e).split('; ')[0]}; resume with the model config it was saved with, or use a new "
                          "run_dir / checkpoint.resume=never") from None


def preflight(cfg: Config, world_size: int) -> Plan:
    """Check `cfg` on `world_size` ranks as thoroughly as one process can, and return its plan.

    Raises:
        ConfigError: one line naming the key or file and the fix.
    """
    check_run_dir(cfg.run_dir)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    vocab = vocab_size(cfg, tokenizer)
    source = check_init_from_config(cfg, vocab)
    plan = make_plan(cfg, world_size, vocab)
    if plan.engine != "native" and importlib.util.find_spec(plan.engine) is None:
        from meshtune.runtime.engines import INSTALL

        raise ConfigError(f"parallel.engine: {plan.engine} is not installed; {INSTALL[plan.engine]}")
    if plan.engine == "deepspeed":
        from meshtune.runtime.engines.deepspeed import build_config

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        build_config(cfg, plan.dims.dp, plan.accum, device)  # a contradicting DeepSpeed JSON: one line here
    if cfg.data.task and cfg.data.task != CHAT:
        get_task(cfg.data.task)
    for key, path in (("data.train_path", cfg.data.train_path), ("data.eval_path", cfg.data.eval_path),
                      ("data.task", CHAT if cfg.data.task == CHAT else "")):
        if path:  # parse once (streamed), so a malformed line is reported before any rank starts
            records = iter(generate(CHAT, 64, 0) if key == "data.task" else iter_records(path, key))
            first = list(itertools.islice(records, 64))
            if record_kind(first) == "chat":  # the template renders and masks them (the first 64)
                ChatDataset(first, tokenizer, chat_template(cfg.data, tokenizer), cfg.data.seq_len,
                            cfg.data.train_on, key=key)
            for _ in records:
                pass
    from meshtune.runtime.precision import frozen_dtype

    frozen_dtype(cfg.train.frozen_dtype, cfg.train.dtype,  # bf16 frozen weights under fp32 compute
                 torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(cfg.model, vocab, device="meta")
    base_keys = set(model.state_dict())
    recipes = build_recipes(cfg.recipe)
    model = apply_recipes(model, recipes)  # target patterns that match nothing, sizes a recipe cannot split
    for recipe in recipes:
        recipe.preflight(model, ArtifactLoader())  # a teacher that is missing or of another vocabulary
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if source is not None:
        found = file_shapes(source, "init_from")
        if found is not None:
            check_fits(found, shapes, shapes.keys() - base_keys, source, "init_from")
    check_resume(cfg, plan, shapes)
    return plan
