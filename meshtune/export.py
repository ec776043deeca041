"""`meshtune export`: a trained run's weights as files other tools load: merged weights, an adapter, a PEFT dir.

    meshtune export runs/tiny --format merged                  # runs/tiny/model.safetensors
    meshtune export runs/lora --format adapter --step 40       # runs/lora/adapter.safetensors
    meshtune export runs/lora --format peft --out my_adapter   # my_adapter/adapter_config.json, adapter_model.*
    meshtune export runs/hf-lora --format hf                   # runs/hf-lora/hf/config.json, model.safetensors

One process (world size 1) reads the run's resolved `config.yaml`, builds the model with its recipes applied
on CPU and loads the "model" entry of
the newest complete checkpoint, or of `--step N`. DCP reads whatever layout saved it (FSDP2 shards, DDP
replicas, tensor- or pipeline-parallel pieces) into full tensors, so every exported tensor is full-size: an
adapter trained under FSDP is never exported as a shard or as an empty tensor.

Formats:
    merged   model.safetensors: the full model under base-model names. LoRA is folded into the base weights
             (W + alpha/r B A); a run without recipes exports as is. Adapters and prefixes are extra modules
             that no base weight can absorb, so for them `merged` is refused with a one-line error pointing
             at `--format adapter` (writing base + adapter under one name would load silently wrong into a
             plain model).
    adapter  adapter.safetensors: only what the recipes trained (`recipes.export_state`; prefix tuning's
             MLP reparameterisation folded into plain prefixes), with the recipe config, model config and
             step as JSON in the safetensors metadata.
    peft     adapter_config.json + adapter_model.safetensors in Hugging Face PEFT's layout for HF Llama
             (LoRA only), loadable with `peft.PeftModel.from_pretrained(hf_llama, dir)`.
    hf       a Hugging Face Llama checkpoint directory (config.json + model.safetensors, LoRA folded in as for
             `merged`) that `transformers.LlamaForCausalLM.from_pretrained(dir)` loads with the same logits. The
             tokenizer files of the run's `data.tokenizer` folder, or else of its `init_from` HF directory,
             are copied alongside.
    sparse   sparse.safetensors (recipe prune, magnitude or semi_structured): each pruned weight as CSR or
             the packed 2:4 layout where that is smaller than dense (meshtune.recipes.prune_export), the
             layouts in the metadata; `load_sparse` gives the dense state dict back.
    shrunk   shrunk/model.safetensors + shrunk/config.yaml (recipe prune, structured): pruned heads and MLP
             channels cut out, a smaller dense model whose model.* sizes say so; `load_model` runs it.
    program  model.pt2: `torch.export` of the merged (or shrunk) model, tokens (1, T) -> logits, loadable with
             `torch.export.load(path).module()` where meshtune is not installed.
    quantized  model_quantized.pt: real int8 / int4 weights (torchao), converted from a `qat` run, else
             post-training quantization with the run's recipe.qat settings (`--scheme` to pick another);
             prints its size against fp32. See meshtune/quantized.py.
Every user error is a one-line ConfigError naming the thing and the fix (the CLI exits with code 2).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from meshtune.config import Config, ConfigError, config_from_dict, read_yaml

FORMATS = ("merged", "adapter", "peft", "hf", "sparse", "shrunk", "program", "quantized")
FILES = {"merged": "model.safetensors", "adapter": "adapter.safetensors", "sparse": "sparse.safetensors",
         "shrunk": "shrunk/model.safetensors", "program": "model.pt2", "quantized": "model_quantized.pt"}
PEFT_DIR = "peft"  # the default --out of --format peft, inside the run dir
HF_DIR = "hf"  # and of --format hf


@dataclass
class LoadedRun:
    """A run's model restored from one checkpoint, in one process.

    Attributes:
        cfg: the run's model and recipe sections (other sections are placeholders; export needs none).
        checkpoint: the step_N folder the weights came from.
        step: its training step.
        vocab_size: read from the checkpoint's embedding shape.
        model: the decoder with the run's recipes applied and the checkpoint's weights, in eval mode.
        recipes: the run's recipes, applied to `model`.
        state: the model's full state dict (plain CPU tensors, shared with `model`).
    """

    cfg: Config
    checkpoint: Path
    step: int
    vocab_size: int
    model: object
    recipes: list
    state: dict


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
    from meshtune.runtime.checkpoint import complete_checkpoints

    root = Path(run_dir) / "checkpoints"
    done = complete_checkpoints(root)
    steps = ", ".join(str(int(p.name.split("_")[1])) for p in done) or "none"
    if step is None:
        if not done:
            raise ConfigError(f"{root}: no complete checkpoint to export; train the run to the end first "
                              "(checkpoint.save_final=true saves one) or pass --step of a saved one")
        return done[-1]
    path = root / f"step_{step:06d}"
    if path not in done:
        raise ConfigError(f"--step {step}: no complete checkpoint {path}; saved steps: {steps}")
    return path


def check_format(fmt: str, cfg: Config) -> None:
    """Refuse a format the run's recipes cannot produce, before any weights are read.

    Raises:
        ConfigError: for an unknown format, `adapter` / `peft` without the recipes they need, or `merged` on
            a recipe that cannot be folded into the base weights.
    """
    from meshtune.recipes import Recipe, build_recipes

    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}; pick one of them")
    name = cfg.recipe.name
    if fmt == "adapter" and not name:
        raise ConfigError("--format adapter: this run has no recipe (full training), so there is no adapter; "
                          "use --format merged for its weights")
    if fmt == "peft" and name != "lora":
        has = f"recipe.name={name}; use --format adapter" if name else "no recipe; use --format merged"
        raise ConfigError(f"--format peft: Hugging Face PEFT export covers recipe.name=lora only, this run has {has}")
    if fmt in ("sparse", "shrunk"):
        structured = "prune" in name.split("+") and cfg.recipe.prune.method == "structured"
        if "prune" not in name.split("+") or structured != (fmt == "shrunk"):
            fix = "--format shrunk" if structured else "--format sparse" if "prune" in name.split("+") else \
                "--format merged"
            raise ConfigError(f"--format {fmt}: needs recipe prune with method "
                              f"{'structured' if fmt == 'shrunk' else 'magnitude or semi_structured'}; "
                              f"this run has recipe.name={name or 'none'!r}, use {fix}")
    if fmt in ("merged", "hf", "sparse", "shrunk", "quantized"):
        for recipe in build_recipes(cfg.recipe):
            if type(recipe).merge_state is Recipe.merge_state:  # the base class: not mergeable
                raise ConfigError(f"--format {fmt}: recipe {recipe.name!r} adds modules that cannot be folded "
                                  "into the base weights; use --format adapter (and load it on top of the base)")


def load_run(run_dir: str | Path, step: int | None = None) -> LoadedRun:
    """Build the run's model with its recipes and load one checkpoint's weights into it (world size 1).

    Raises:
        ConfigError: for a missing run dir, config or checkpoint, or a checkpoint that does not fit the config.
    """
    import torch
    import torch.distributed.checkpoint as dcp

    from meshtune.models import build_model
    from meshtune.recipes import apply_recipes, build_recipes

    cfg = run_config(run_dir)
    path = find_checkpoint(run_dir, step)
    ds_state = _deepspeed_state(path)  # None for DCP checkpoints (native and fairscale engines)
    vocab = _vocab_size(path) if ds_state is None else int(ds_state["tok_embeddings.weight"].shape[0])
    model = build_model(cfg.model, vocab, device="meta")
    recipes = build_recipes(cfg.recipe)
    model = apply_recipes(model, recipes)
    model.to_empty(device="cpu")
    model.init_weights()  # the rotary tables (buffers, not in checkpoints); every parameter is then loaded
    state = model.state_dict()
    try:
        if ds_state is not None:
            missing = sorted({n for n, _ in model.named_parameters()} - ds_state.keys())
            if missing:
                raise ValueError(f"no weights for {missing[0]} and {len(missing) - 1} more")
            model.load_state_dict({k: v for k, v in ds_state.items() if k in state}, strict=False)
        else:
            with warnings.catch_warnings():  # DCP warns that there is no process group: one process is the point
                warnings.simplefilter("ignore", UserWarning)
                dcp.load({"model": state}, checkpoint_id=str(path))
    except (Exception, dcp.CheckpointException) as e:  # the latter is a BaseException
        raise ConfigError(f"{path}: does not fit the model in {Path(run_dir) / 'config.yaml'} "
                          f"({_first_line(e)}); export with the config the run was trained with") from None
    model.eval()
    with torch.no_grad():
        state = {k: v.detach() for k, v in model.state_dict().items()}
    meta = json.loads((path / "meta.json").read_text())
    return LoadedRun(cfg, path, int(meta["step"]), vocab, model, recipes, state)


def _deepspeed_state(path: Path) -> dict | None:
    """Full weights of a DeepSpeed-engine checkpoint (any ZeRO stage, consolidated), else None."""
    from meshtune.runtime.engines.deepspeed import consolidated_state, is_deepspeed_checkpoint

    return consolidated_state(path) if is_deepspeed_checkpoint(path) else None


def _vocab_size(path: Path) -> int:
    """The vocabulary size the run trained with, from the checkpoint's embedding (or head) shape."""
    import torch.distributed.checkpoint as dcp

    shapes = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for key in ("model.tok_embeddings.weight", "model.output.weight"):
        if key in shapes:
            return int(shapes[key].size[0])
    raise ConfigError(f"{path}: holds no model.tok_embeddings.weight; it is not a meshtune model checkpoint")


def _first_line(e: BaseException) -> str:
    """The underlying error of a DCP CheckpointException (which wraps each rank's), as one short line."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


def metadata(run: LoadedRun, fmt: str) -> dict[str, str]:
    """safetensors metadata (str -> str): the format, training step, model config and recipe config.

    The recipe config describes the tensors in the file: prefix tuning's reparameterisation is folded at
    export, so `reparam_hidden` is recorded as 0 there."""
    recipe = dataclasses.asdict(run.cfg.recipe)
    recipe["prefix"]["reparam_hidden"] = 0
    return {"format": "pt", "meshtune.export": fmt, "meshtune.step": str(run.step),
            "meshtune.model": json.dumps({**dataclasses.asdict(run.cfg.model), "vocab_size": run.vocab_size}),
            "meshtune.recipe": run.cfg.recipe.name, "meshtune.recipe_config": json.dumps(recipe)}


def save_safetensors(tensors: dict, path: Path, meta: dict[str, str] | None = None) -> Path:
    """Write contiguous copies of `tensors`; tensors sharing storage (tied embeddings) are stored separately."""
    from safetensors.torch import save_file

    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().contiguous()
        if t.data_ptr() in seen:  # safetensors refuses aliased tensors
            t = t.clone()
        seen.add(t.data_ptr())
        out[key] = t
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=meta)
    return path


def merged_state(run: LoadedRun) -> dict:
    """The full model under base-model names, every recipe folded in (LoRA: W + alpha/r B A)."""
    state = run.state
    for recipe in run.recipes:
        try:
            state = recipe.merge_state(state)
        except ValueError as e:
            raise ConfigError(f"--format merged: {e}") from None
    return state


def adapter_state(run: LoadedRun) -> dict:
    """Only what the recipes trained, as full tensors (prefix reparameterisation folded)."""
    from meshtune.recipes import export_state

    return export_state(run.state, run.recipes)


def peft_files(run: LoadedRun) -> tuple[dict, dict]:
    """(adapter_model.safetensors tensors, adapter_config.json contents) in PEFT's HF-Llama layout."""
    from meshtune.recipes.lora import adapter_config, peft_state_dict

    m = run.cfg.model
    try:
        tensors = peft_state_dict(adapter_state(run), m.n_heads, m.n_kv_heads or m.n_heads)
    except ValueError as e:
        raise ConfigError(f"--format peft: {e}") from None
    return tensors, adapter_config(run.cfg.recipe.lora, tensors)


def tokenizer_source(run_dir: str | Path) -> Path | None:
    """The folder whose tokenizer files an HF export copies: the run's `data.tokenizer` file's folder (the
    tokenizer it trained with), else its `init_from` when that is an HF directory; None for the byte tokenizer."""
    from meshtune.models.hf import TOKENIZER_FILES, is_hf_dir

    raw = read_yaml(Path(run_dir) / "config.yaml")
    tokenizer = (raw.get("data") or {}).get("tokenizer") or "byte"
    init_from = raw.get("init_from") or ""
    for folder in [Path(tokenizer).parent if tokenizer != "byte" else None,
                   Path(init_from) if init_from and is_hf_dir(init_from) else None]:
        if folder is not None and any((folder / f).is_file() for f in TOKENIZER_FILES):
            return folder
    return None


def hf_export(run: LoadedRun, run_dir: str | Path, out: Path, quiet: bool = False) -> list[Path]:
    """Write the merged model as an HF Llama directory in `out`, with the run's tokenizer files; returns the files."""
    from meshtune.models.hf import INDEX_FILE, TOKENIZER_FILES, save_hf_checkpoint

    source = tokenizer_source(run_dir)
    save_hf_checkpoint(merged_state(run), run.cfg.model, run.vocab_size, out, tokenizer_dir=source)
    if source is None and not quiet:
        print("meshtune export: no tokenizer files copied (the run used the byte tokenizer, or its tokenizer "
              "folder is gone); transformers loads the weights, give it a tokenizer yourself")
    names = ["config.json", *sorted(p.name for p in out.glob("model*.safetensors")), INDEX_FILE, *TOKENIZER_FILES]
    return [out / n for n in names if (out / n).is_file()]


def export(run_dir: str | Path, fmt: str, out: str | Path | None = None, step: int | None = None,
           quiet: bool = False, scheme: str | None = None) -> list[Path]:
    """Export a run's checkpoint in `fmt` (one of FORMATS) and print each file with its size.

    Args:
        run_dir: the training run's run_dir (holds config.yaml and checkpoints/).
        fmt: one of FORMATS (see the module docstring).
        out: output directory; default: the run dir (merged, adapter), run_dir/peft or run_dir/hf.
        step: export this checkpoint step instead of the newest complete one.
        quiet: do not print.
        scheme: for `quantized`: int8-int4 or int8-int8 instead of the run's recipe.qat.scheme.

    Returns:
        The written files.

    Raises:
        ConfigError: one line naming what is missing or wrong and the fix.
    """
    check_format(fmt, run_config(run_dir))  # cheap checks first: no weights are read for a bad request
    run = load_run(run_dir, step)
    out = Path(out) if out is not None else Path(run_dir) / {"peft": PEFT_DIR, "hf": HF_DIR}.get(fmt, "")
    meta = metadata(run, fmt)
    if fmt == "merged":
        written = [save_safetensors(merged_state(run), out / FILES["merged"], meta)]
    elif fmt in ("sparse", "shrunk", "program"):
        written = _export_compressed(run, fmt, out, meta, quiet)
    elif fmt == "adapter":
        written = [save_safetensors(adapter_state(run), out / FILES["adapter"], meta)]
    elif fmt == "hf":
        written = hf_export(run, run_dir, out, quiet)
    elif fmt == "quantized":
        from meshtune.quantized import fp32_bytes, quantize_loaded, save_quantized

        fp32 = fp32_bytes(merged_state(run))
        model, qcfg, how = quantize_loaded(run, scheme)
        written = [save_quantized(model, out / FILES["quantized"], run.cfg.model, run.vocab_size, qcfg, how)]
        if not quiet:
            size = written[0].stat().st_size
            print(f"meshtune export: {how.upper()} {qcfg.scheme} group_size={qcfg.group_size}: "
                  f"{human_size(size)} on disk vs {human_size(fp32)} of fp32 weights ({fp32 / size:.2f}x smaller)")
    else:
        from meshtune.models.hf import is_hf_dir

        tensors, conf = peft_files(run)
        init_from = read_yaml(Path(run_dir) / "config.yaml").get("init_from") or ""
        if init_from and is_hf_dir(init_from):  # the HF model the adapter belongs on, for peft's loaders
            conf["base_model_name_or_path"] = str(init_from)
        written = [save_safetensors(tensors, out / "adapter_model.safetensors", {"format": "pt"})]
        (out / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n")
        written.insert(0, out / "adapter_config.json")
    if not quiet:
        what = f"recipe {run.cfg.recipe.name}" if run.cfg.recipe.name else "no recipe"
        print(f"meshtune export: {fmt} from {run.checkpoint} (step {run.step}, {what})")
        for path in written:
            print(f"  wrote {path} ({human_size(path.stat().st_size)})")
    return written


def _export_compressed(run: LoadedRun, fmt: str, out: Path, meta: dict, quiet: bool) -> list[Path]:
    """The sparse, shrunk and program formats (see the module docstring)."""
    import torch

    from meshtune.recipes import prune_export as pe

    if fmt == "sparse":
        merged = merged_state(run)
        pruned = [k[: -len("_mask")] for k in run.state if k.endswith(".weight_mask")]
        layout = "2:4" if run.cfg.recipe.prune.method == "semi_structured" else "csr"
        tensors, layouts = pe.sparse_tensors(merged, pruned, layout)
        path = save_safetensors(tensors, out / FILES["sparse"], {**meta, "meshtune.sparse": json.dumps(layouts)})
        if not quiet:
            dense = sum(t.numel() * t.element_size() for t in merged.values())
            print(f"  sparse: {len(layouts)} of {len(pruned)} pruned weights stored sparse ({layout}); "
                  f"{path.stat().st_size} bytes on disk vs {dense} bytes of dense tensors "
                  f"({path.stat().st_size / dense:.2f}x)")
        return [path]
    state, model_cfg = compressed_state(run)
    if fmt == "shrunk":
        path = save_safetensors(state, out / FILES["shrunk"], {
            **meta, "meshtune.model": json.dumps({**dataclasses.asdict(model_cfg), "vocab_size": run.vocab_size})})
        raw = {k: v for k, v in read_yaml(run.checkpoint.parent.parent / "config.yaml").items() if k != "recipe"}
        raw.update(model={**dataclasses.asdict(model_cfg), "vocab_size": run.vocab_size}, init_from=str(path))
        import yaml

        (path.parent / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        return [path, path.parent / "config.yaml"]
    data = read_yaml(run.checkpoint.parent.parent / "config.yaml").get("data") or {}
    seq_len = min(int(data.get("seq_len") or model_cfg.max_seq_len), model_cfg.max_seq_len)
    model = run.model if state is None else build_plain(model_cfg, run.vocab_size, state)
    with torch.no_grad():
        return [pe.export_program(model, seq_len, out / FILES["program"])]


def compressed_state(run: LoadedRun):
    """(merged state dict, model config) of the smallest dense model the run's recipes give: structured
    pruning shrunk, otherwise merged; (None, config) when a recipe cannot be merged (the program then
    exports the model with its recipe modules)."""
    from meshtune.recipes import Recipe
    from meshtune.recipes.prune_export import shrink_state

    if any(type(r).merge_state is Recipe.merge_state for r in run.recipes):
        return None, run.cfg.model
    state = merged_state(run)
    if "prune" in run.cfg.recipe.name.split("+") and run.cfg.recipe.prune.method == "structured":
        try:
            return shrink_state(state, run.cfg.model)
        except ValueError as e:
            raise ConfigError(f"--format shrunk: {e}") from None
    return state, run.cfg.model


def build_plain(model_cfg, vocab_size: int, state: dict):
    """A plain meshtune decoder (no recipes) of `model_cfg` holding `state`, in eval mode."""
    from meshtune.models import build_model

    model = build_model(model_cfg, vocab_size)
    model.load_state_dict(state)
    return model.eval()


def load_model(path: str | Path):
    """The meshtune decoder saved by `--format merged` or `shrunk` (sizes from the file's metadata), in eval
    mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from meshtune.config import ModelConfig

    with safe_open(str(path), "pt") as f:
        model_meta = json.loads(f.metadata()["meshtune.model"])
    vocab = model_meta.pop("vocab_size")
    return build_plain(ModelConfig(**model_meta), vocab, load_file(str(path)))


def load_sparse(path: str | Path) -> dict:
    """The dense state dict of a `--format sparse` file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from meshtune.recipes.prune_export import dense_from_sparse

    with safe_open(str(path), "pt") as f:
        layouts = json.loads(f.metadata()["meshtune.sparse"])
    return dense_from_sparse(load_file(str(path)), layouts)


def human_size(n: int) -> str:
    """Bytes as B / KiB / MiB / GiB with three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
