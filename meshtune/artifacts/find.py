"""What a path holds, read from configs and metadata only: no tensor is loaded here.

    art = find("runs/tiny")                       # a run dir: its newest complete checkpoint
    art = find("runs/tiny/checkpoints/step_000040", key="recipe.distill.teacher")
    art = find("runs/tiny/model.safetensors")     # `meshtune export --format merged` (or shrunk, sparse)
    art = find("runs/tiny/model_quantized.pt")    # `--format quantized`
    art = find("/models/llama")                   # a Hugging Face directory (config.json + safetensors)

Every form carries the model config it needs (a run's config.yaml, a file's metadata, an HF config.json),
so loaders never guess sizes. `key` names the config field or flag the path came from in every error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

from meshtune.config import ConfigError, ModelConfig, read_yaml
from meshtune.recipes import RecipeConfig
from meshtune.schema import Config, config_from_dict

STEP_DIR = re.compile(r"^step_(\d+)$")
DEEPSPEED_DIR = "deepspeed"  # the folder inside step_N/ that holds DeepSpeed's own checkpoint
QUANTIZED_SUFFIX = ".pt"
WHAT = ("a meshtune run dir, a step_N checkpoint folder, a .safetensors file written by `meshtune export`, a "
        "quantized export or a Hugging Face model directory")


@dataclass
class Artifact:
    """A model on disk, described without loading it.

    Attributes:
        kind: `checkpoint` (a step_N folder), `merged` (a meshtune safetensors file: merged or shrunk),
            `sparse`, `adapter` (a recipe's tensors only), `quantized`, `hf` (a Hugging Face directory) or
            `weights` (a plain tensor file with no model config: only usable as `init_from`).
        path: the folder or file holding the weights.
        model_cfg: the model section they were trained with (None for `weights`).
        vocab_size: rows of the embedding table (0 for `weights`).
        recipe_cfg: a checkpoint's recipe section (its tensors are in it), else None.
        tokenizer: `data.tokenizer` of the run (`byte` when unknown; an HF directory's tokenizer.json).
        name: a short name (the run dir's or file's).
        step: a checkpoint's training step, else None.
        engine: `native`, `deepspeed` or `fairscale` for checkpoints (their files differ), else "".
        run_dir: the run dir a checkpoint belongs to, else None.
    """

    kind: str
    path: Path
    model_cfg: ModelConfig | None
    vocab_size: int
    recipe_cfg: RecipeConfig | None = None
    tokenizer: str = "byte"
    name: str = ""
    step: int | None = None
    engine: str = ""
    run_dir: Path | None = None


def complete_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints (step_N folders holding meta.json) under `ckpt_root`, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def run_config(run_dir: str | Path) -> Config:
    """The model and recipe sections of a run's resolved config.yaml.

    Only `model` and `recipe` are read: init_from, data paths and resume targets of the finished run need not
    exist any more (the checkpoint holds every weight), so they are replaced by placeholders before validation.

    Raises:
        ConfigError: for a missing run dir or config.yaml, or an invalid model/recipe section.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory; give the run_dir of a meshtune training run")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; give the run_dir of a meshtune training run (training writes "
                          "config.yaml there when it starts)")
    data = read_yaml(path)
    keep = {k: data[k] for k in ("model", "recipe") if data.get(k) is not None}
    return config_from_dict({**keep, "run_dir": str(run_dir), "data": {"task": "sort", "seq_len": 1}})


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The newest complete checkpoint of the run, or the one of `step`.

    Raises:
        ConfigError: when there is none (or not that step), listing the steps that exist.
    """
    root = Path(run_dir) / "checkpoints"
    done = complete_checkpoints(root)
    steps = ", ".join(str(int(p.name.split("_")[1])) for p in done) or "none"
    if step is None:
        if not done:
            raise ConfigError(f"{root}: no complete checkpoint; train the run to the end first "
                              "(checkpoint.save_final=true saves one) or pass --step of a saved one")
        return done[-1]
    path = root / f"step_{step:06d}"
    if path not in done:
        raise ConfigError(f"--step {step}: no complete checkpoint {path}; saved steps: {steps}")
    return path


def read_meta(ckpt: Path) -> dict:
    """A checkpoint's meta.json (step, engine, schedule, sampler position, vocabulary)."""
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{ckpt / 'meta.json'}: unreadable ({e}); the checkpoint is damaged") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"{ckpt / 'meta.json'}: not a JSON object; the checkpoint is damaged")
    return meta


def checkpoint_engine(ckpt: Path) -> str:
    """Which engine wrote the step folder `ckpt` (their files differ)."""
    if (ckpt / DEEPSPEED_DIR).is_dir():
        return "deepspeed"
    meta = read_meta(ckpt) if (ckpt / "meta.json").is_file() else {}
    return str(meta.get("engine", "native"))


def _run_tokenizer(run_dir: Path) -> str:
    data = read_yaml(run_dir / "config.yaml").get("data") or {}
    return data.get("tokenizer") or "byte"


def checkpoint_vocab(ckpt: Path, key: str) -> int:
    """The vocabulary a checkpoint trained with: meta.json's, else the embedding (or head) shape in the files."""
    meta = read_meta(ckpt)
    if meta.get("vocab_size"):
        return int(meta["vocab_size"])
    if checkpoint_engine(ckpt) == "deepspeed":  # older checkpoints: DeepSpeed's own record of the shapes
        from meshtune.artifacts.safe import load_torch_file

        files = sorted((ckpt / DEEPSPEED_DIR).glob("*model_states.pt"))
        if not files:
            raise ConfigError(f"{key}: {ckpt / DEEPSPEED_DIR} holds no model_states.pt; the checkpoint is damaged")
        blob = load_torch_file(files[0])
        for shapes in [*(blob.get("param_shapes") or []), blob.get("frozen_param_shapes") or {}]:
            for name in ("tok_embeddings.weight", "output.weight"):
                if name in shapes:
                    return int(shapes[name][0])
        raise ConfigError(f"{key}: {files[0]} records no embedding shape; it is not a meshtune model checkpoint")
    from meshtune.artifacts.packed import fold_shapes
    from meshtune.artifacts.safe import read_metadata

    # NF4 weights (QLoRA) are saved as their parts: fold them back to the weight's shape
    shapes = fold_shapes({k: tuple(v.size) for k, v in read_metadata(ckpt).state_dict_metadata.items()
                          if hasattr(v, "size")})
    for name in ("model.tok_embeddings.weight", "model.output.weight"):
        if name in shapes:
            return int(shapes[name][0])
    raise ConfigError(f"{key}: {ckpt} holds no model.tok_embeddings.weight; it is not a meshtune model checkpoint")


def _checkpoint(run_dir: Path, ckpt: Path, key: str) -> Artifact:
    cfg = run_config(run_dir)
    return Artifact("checkpoint", ckpt, cfg.model, checkpoint_vocab(ckpt, key), cfg.recipe,
                    _run_tokenizer(run_dir), run_dir.resolve().name, int(read_meta(ckpt)["step"]),
                    checkpoint_engine(ckpt), run_dir)


def model_config_from_json(text: str, where: str) -> tuple[ModelConfig, int]:
    """(ModelConfig, vocab_size) from the JSON meshtune writes into its files' metadata."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: unreadable model config in the metadata ({e}); export it again") from None
    known = {f.name for f in fields(ModelConfig)}
    vocab = int(raw.get("vocab_size") or 0)
    return ModelConfig(**{k: v for k, v in raw.items() if k in known and k != "vocab_size"}), vocab


def _safetensors(path: Path, key: str) -> Artifact:
    from meshtune.artifacts.safe import safetensors_metadata

    meta = safetensors_metadata(path, key)
    if "meshtune.model" not in meta:
        return Artifact("weights", path, None, 0, name=path.stem)
    cfg, vocab = model_config_from_json(meta["meshtune.model"], str(path))
    kind = "sparse" if "meshtune.sparse" in meta else "adapter" if meta.get("meshtune.export") == "adapter" \
        else "merged"
    # `meshtune export` writes into the run dir by default: take the tokenizer from its config when it is there
    run_dir = next((d for d in (path.parent, path.parent.parent) if (d / "config.yaml").is_file()), None)
    tok = _run_tokenizer(run_dir) if run_dir is not None else "byte"
    step = meta.get("meshtune.step")
    return Artifact(kind, path, cfg, vocab or cfg.vocab_size, None, tok, path.parent.resolve().name,
                    int(step) if step and step.isdigit() else None)


def _quantized(path: Path, key: str) -> Artifact | None:
    from meshtune.artifacts.safe import load_torch_file

    blob = load_torch_file(path)
    if not isinstance(blob, dict) or "meshtune" not in blob or "quantized" not in blob:
        return None
    try:
        meta = json.loads(blob["meshtune"])
    except (TypeError, json.JSONDecodeError):
        raise ConfigError(f"{key}: {path} has an unreadable meshtune entry; export it again") from None
    cfg, _ = model_config_from_json(json.dumps(meta["model"]), str(path))
    run_dir = next((d for d in (path.parent, path.parent.parent) if (d / "config.yaml").is_file()), None)
    tok = _run_tokenizer(run_dir) if run_dir is not None else "byte"
    return Artifact("quantized", path, cfg, int(meta["vocab_size"]), None, tok, path.parent.resolve().name)


def find(spec: str | Path, key: str = "checkpoint", step: int | None = None) -> Artifact:
    """Describe the model at `spec`; `key` names where the path came from in errors.

    Args:
        spec: a run dir, a step_N folder, an exported file, a quantized export or an HF directory.
        key: the config field or flag that gave `spec` (e.g. `init_from`, `recipe.distill.teacher`).
        step: for a run dir, this checkpoint step instead of the newest complete one.

    Raises:
        ConfigError: naming `key`, for a path that does not exist or is none of the supported forms.
    """
    from meshtune.models.hf import is_hf_dir, read_hf_config

    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"{key}: {spec} does not exist; give {WHAT}")
    if is_hf_dir(path):
        cfg = read_hf_config(path)
        tok = path / "tokenizer.json"
        return Artifact("hf", path, cfg, cfg.vocab_size, None, str(tok) if tok.is_file() else "byte", path.name)
    if path.is_dir() and STEP_DIR.match(path.name) and (path / "meta.json").is_file():
        run_dir = path.parent.parent
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{key}: {path} is a checkpoint outside its run dir (no {run_dir / 'config.yaml'}); "
                              "give the step folder inside the run dir that wrote it")
        return _checkpoint(run_dir, path, key)
    if path.is_dir() and (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        try:
            ckpt = find_checkpoint(path, step)
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
        return _checkpoint(path, ckpt, key)
    if path.is_dir() and (path / "config.yaml").is_file():
        raise ConfigError(f"{key}: {path} is a run dir without checkpoints; train it to the end first "
                          "(checkpoint.save_final=true saves one)")
    if path.is_dir() and path.name.endswith(".tmp") and STEP_DIR.match(path.name[:-4]):
        raise ConfigError(f"{key}: {path} is a checkpoint that was never completed (a save cut short); give a "
                          "complete step_N folder")
    if path.is_file() and path.suffix == ".safetensors":
        return _safetensors(path, key)
    if path.is_file() and path.suffix in (QUANTIZED_SUFFIX, ".pth", ".bin"):
        from meshtune.artifacts.safe import UnsafeCheckpointError

        try:
            art = _quantized(path, key)
        except UnsafeCheckpointError:
            raise
        except ConfigError:  # not a torch file at all
            raise ConfigError(f"{key}: {spec} is not {WHAT} (nor a readable torch file)") from None
        return art if art is not None else Artifact("weights", path, None, 0, name=path.stem)
    if path.is_dir():
        raise ConfigError(f"{key}: {spec} is a folder but none of {WHAT}")
    raise ConfigError(f"{key}: {spec} is not {WHAT}")
