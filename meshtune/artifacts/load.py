"""Loading what `find` described, for every engine and export format, in one place.

    run = load_run(find("runs/lora"))                   # export: the model with its recipes + full state
    model = load_model(find(spec, key), device)         # inference, serve, teachers, the demo: frozen, eval
    load_weights(model, find(path, "init_from"), expected, recipe_owned)   # init_from into a training model

Checkpoints of the native and FairScale engines are DCP folders (read through `safe.SafeReader`); DeepSpeed's
are consolidated from any ZeRO stage with DeepSpeed's zero_to_fp32 (every torch.load in it weights-only).
Building a model on meta and materialising it draws no random numbers, so a caller's RNG stream is untouched.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from meshtune.artifacts.find import DEEPSPEED_DIR, Artifact
from meshtune.artifacts.packed import fold_shapes, is_nf4, local_tensor, pack, packed_keys
from meshtune.artifacts.safe import dcp_load, load_safetensors, load_torch_file, read_metadata
from meshtune.artifacts.shards import local_box, quantize_rows
from meshtune.config import ConfigError


@dataclass
class LoadedRun:
    """A run's model restored from one checkpoint, in one process.

    Attributes:
        artifact: the checkpoint it came from (model and recipe config, step, vocabulary).
        model: the decoder with the run's recipes applied and the checkpoint's weights, in eval mode.
        recipes: the run's recipes, applied to `model`.
        state: the model's full state dict (plain CPU tensors, shared with `model`).
    """

    artifact: Artifact
    model: nn.Module
    recipes: list
    state: dict


def first_line(e: BaseException) -> str:
    """The underlying error of a DCP CheckpointException (which wraps each rank's), as one short line."""
    failures = getattr(e, "failures", None)
    if failures:
        e = next(iter(failures.values()))[0]
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


def deepspeed_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights (frozen ones included) of a meshtune DeepSpeed checkpoint of any ZeRO stage,
    in one process, with DeepSpeed's zero_to_fp32; its torch.loads are weights-only."""
    from meshtune.artifacts.safe import torch_loads_weights_only
    from meshtune.quiet import quiet_deepspeed

    quiet_deepspeed()
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise ConfigError(f"{ckpt}: a DeepSpeed checkpoint, and deepspeed is not installed ({e}); pip install "
                          "'meshtune[deepspeed]' (torch installed first)") from None
    with torch_loads_weights_only(ckpt / DEEPSPEED_DIR), contextlib.redirect_stdout(io.StringIO()):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DEEPSPEED_DIR)  # prints every tensor
    return {k: v.detach().float().contiguous() for k, v in state.items()}


def full_state(art: Artifact, key: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Every tensor of a file-like artifact (merged, sparse, HF, plain weights, a DeepSpeed checkpoint) as
    full CPU tensors under meshtune's names. DCP checkpoints are read into a model instead (`_load_dcp`)."""
    if art.kind == "checkpoint" and art.engine == "deepspeed":
        return deepspeed_state(art.path)
    if art.kind == "merged":
        return load_safetensors(art.path, key)
    if art.kind == "sparse":
        from meshtune.artifacts.safe import safetensors_metadata
        from meshtune.recipes.prune.export import dense_from_sparse

        layouts = json.loads(safetensors_metadata(art.path, key)["meshtune.sparse"])
        return dense_from_sparse(load_safetensors(art.path, key), layouts)
    if art.kind == "hf":
        from meshtune.models.hf import load_hf_state_dict

        return load_hf_state_dict(art.path)
    if art.kind == "weights":
        if art.path.suffix == ".safetensors":
            return load_safetensors(art.path, key)
        blob = load_torch_file(art.path)
        if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
            raise ConfigError(f"{key}: {art.path} holds no state dict of tensors; give a .safetensors file or a "
                              "checkpoint folder")
        return blob
    raise ConfigError(f"{key}: {art.path} is a {art.kind} artifact, which holds no trainable weights; give a run "
                      "dir, a checkpoint or a merged export")


def file_shapes(art: Artifact, key: str) -> dict[str, tuple[int, ...]] | None:
    """The model tensors an artifact holds, name -> full shape, read from metadata only (a DCP checkpoint's
    .metadata, a merged file's or an HF directory's safetensors headers); None where only loading would tell."""
    if art.kind == "checkpoint" and art.engine != "deepspeed":
        return fold_shapes({k.removeprefix("model."): tuple(v.size) for k, v in
                            read_metadata(art.path).state_dict_metadata.items()
                            if k.startswith("model.") and hasattr(v, "size")})
    if art.kind == "hf":
        from meshtune.models.hf import hf_shapes

        return hf_shapes(art.path)
    if art.kind in ("merged", "weights") and art.path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(art.path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
        except (SafetensorError, OSError, ValueError) as e:
            from meshtune.artifacts.safe import _damaged

            raise _damaged(art.path, key, e) from None
    return None


def check_fits(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], recipe_owned: set[str],
               art: Artifact, key: str) -> None:
    """Refuse weights that would not load into the model `expected` describes: a missing tensor the recipes do
    not own, a tensor the model has no place for, or a shape that differs (every mismatch counted).

    Raises:
        ConfigError: naming `key`, the file and the first offending tensor.
    """
    def more(items: list) -> str:
        return f" and {len(items) - 1} more" if len(items) > 1 else ""

    missing = sorted(expected.keys() - shapes.keys() - recipe_owned)
    if missing:
        raise ConfigError(f"{key}: {art.path} has no weights for {missing[0]}{more(missing)}; it is not a checkpoint "
                          "of this model (check model.* against the run that wrote it)")
    extra = sorted(shapes.keys() - expected.keys())
    if extra:
        raise ConfigError(f"{key}: {art.path} holds {extra[0]}{more(extra)}, which this model has no place for; "
                          "export that run with `meshtune export RUN_DIR --format merged` (recipes folded in) and "
                          "start from that file")
    wrong = sorted(k for k in shapes if tuple(shapes[k]) != tuple(expected[k]))
    if wrong:
        k = wrong[0]
        raise ConfigError(f"{key}: {art.path} has {k} of shape {tuple(shapes[k])}, this model {tuple(expected[k])}"
                          f"{more(wrong)}; set model.* to the sizes of the run that wrote it")


def _load_dcp(model: nn.Module, path: Path, strict: bool) -> None:
    """DCP "model" entry of `path` into `model` (any layout: FSDP shards, TP pieces, a pipeline stage). An NF4
    weight saved as its parts loads them in place; one saved in full precision (a plain run's checkpoint) is read
    into a plain tensor of this rank's rows, one weight at a time, and quantized as the whole weight is."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    sd = get_model_state_dict(model)
    saved = {k.removeprefix("model.") for k in packed_keys(read_metadata(path).state_dict_metadata)}
    plain = [k for k, v in sd.items() if is_nf4(v) and k not in saved]
    dcp_load({"model": pack({k: v for k, v in sd.items() if k not in plain}, only=saved)}, path,
             allow_partial=not strict)
    for key in plain:
        rows = _plain_like(sd[key])
        dcp_load({"model": {key: rows}}, path, allow_partial=not strict)
        quantize_rows(sd[key], local_tensor(rows))
        del rows
    set_model_state_dict(model, sd, options=StateDictOptions(strict=strict))  # the NF4 parts were loaded in place


def _plain_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised full-precision tensor of an NF4 weight's shape and dtype, laid out as it is (DTensor)."""
    from torch.distributed.tensor import DTensor

    local = torch.empty(local_tensor(t).shape, dtype=t.dtype, device=t.device)
    if not isinstance(t, DTensor):
        return local
    return DTensor.from_local(local, t.device_mesh, t.placements, shape=t.shape, stride=t.stride(), run_check=False)


def _load_full(model: nn.Module, state: dict[str, torch.Tensor], strict: bool) -> None:
    """A full (unsharded) state dict into `model`, distributing it where `model` is sharded; a sharded NF4 weight
    takes its rows, quantized as the whole weight is (`quantize_rows`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor

    done = {}  # name -> id of the NF4 Parameter it names (a tied head names the embedding's: quantized once)
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in state and is_nf4(p) and isinstance(p, DTensor):
            if id(p) not in done.values():
                offset, shape = local_box(p)
                quantize_rows(p, state[name][offset[0]:offset[0] + shape[0]])
            done[name] = id(p)
    rest = {k: v for k, v in state.items() if k not in done}
    set_model_state_dict(model, rest, options=StateDictOptions(full_state_dict=True, strict=strict))


def build(art: Artifact, device: str | torch.device = "meta", with_recipes: bool = True) -> tuple[nn.Module, list]:
    """(model, recipes) of `art`'s config on `device`, recipes applied (a checkpoint's own), no weights loaded."""
    from meshtune.models import build_model
    from meshtune.recipes import apply_recipes, build_recipes

    if art.model_cfg is None:
        raise ConfigError(f"{art.path}: holds no model config (plain tensors); use it as init_from of a run whose "
                          "model.* fits it, or export with `meshtune export`")
    model = build_model(art.model_cfg, art.vocab_size, device="meta")
    recipes = build_recipes(art.recipe_cfg) if with_recipes and art.recipe_cfg is not None else []
    model = apply_recipes(model, recipes)
    if str(device) != "meta":
        model.to_empty(device=device)
        model.init_buffers()  # rotary tables (not in checkpoints); every parameter is then loaded
    return model, recipes


def _fill(model: nn.Module, art: Artifact, key: str) -> None:
    """Load every weight of `art` into `model` built by `build` (strict: nothing missing)."""
    try:
        if art.kind == "checkpoint" and art.engine != "deepspeed":
            _load_dcp(model, art.path, strict=True)
        elif art.kind == "hf":
            from meshtune.models.hf import hf_shapes, load_hf_into

            found, ours = hf_shapes(art.path), {n: tuple(p.shape) for n, p in model.named_parameters()}
            missing = sorted(ours.keys() - found.keys())
            if missing:
                raise ValueError(f"no weights for {missing[0]} and {len(missing) - 1} more")
            wrong = [n for n in ours if found[n] != ours[n]]
            if wrong:
                raise ValueError(f"{wrong[0]} has shape {found[wrong[0]]}, the model {ours[wrong[0]]}")
            load_hf_into(model, art.path)
        else:
            state = full_state(art, key)
            missing = sorted({n for n, _ in model.named_parameters()} - state.keys())
            if missing:
                raise ValueError(f"no weights for {missing[0]} and {len(missing) - 1} more")
            _load_full(model, {k: v for k, v in state.items() if k in model.state_dict()}, strict=False)
    except ConfigError:
        raise
    except (Exception, BaseException) as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, KeyboardInterrupt | SystemExit):
            raise
        raise ConfigError(f"{key}: {art.path} does not fit its model config ({first_line(e)}); it was written "
                          "with another config, or is damaged") from None


def load_run(art: Artifact, key: str = "checkpoint") -> LoadedRun:
    """A checkpoint's model with its recipes and weights, on CPU, in eval mode (world size 1): for export."""
    if art.kind != "checkpoint":
        raise ConfigError(f"{key}: {art.path} is a {art.kind} file, not a run's checkpoint; give the run dir")
    model, recipes = build(art, "cpu")
    _fill(model, art, key)
    model.eval()
    with torch.no_grad():
        state = {k: v.detach() for k, v in model.state_dict().items()}
    return LoadedRun(art, model, recipes, state)


def load_model(art: Artifact, device: str | torch.device = "cpu", shard_mesh=None,
               key: str = "checkpoint") -> nn.Module:
    """The model of any artifact, frozen (no gradients), in eval mode, on `device`.

    A checkpoint keeps its recipes (a LoRA teacher keeps its adapters). With `shard_mesh` (a 1-D DeviceMesh)
    every block and the root are FSDP2-sharded over it and resharded after each forward, so a rank holds 1/N
    of the weights between forwards. A quantized export loads on CPU (its torchao kernels are CPU ones).

    Raises:
        ConfigError: naming `key`, when the weights do not fit their config or the file is damaged.
    """
    if art.kind == "quantized":
        from meshtune.artifacts.quantized import load_quantized

        return load_quantized(art.path).requires_grad_(False)
    model, _ = build(art, "meta")
    model.requires_grad_(False)
    if shard_mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers.values():
            fully_shard(block, mesh=shard_mesh, reshard_after_forward=True)
        fully_shard(model, mesh=shard_mesh, reshard_after_forward=True)
    model.to_empty(device=device)
    model.init_buffers()
    _fill(model, art, key)
    return model.eval()


def load_weights(model: nn.Module, art: Artifact, expected: dict[str, tuple[int, ...]], recipe_owned: set[str],
                 key: str = "init_from") -> None:
    """Load `art`'s weights into a model being trained (recipes applied, possibly sharded or a pipeline stage).

    Args:
        model: the (parallelised) model; its own state-dict names are loaded.
        art: the source (a checkpoint of any engine, a merged/sparse export, an HF directory, a tensor file).
        expected: name -> full shape of every state-dict entry of the whole unsharded model.
        recipe_owned: the names the recipes added (LoRA, adapters, masks...): these may be missing, keeping
            their initial values; any other missing name is an error, as is a name the model has no place for
            or a shape that differs (`check_fits`).

    Raises:
        ConfigError: naming `key` and the first missing, unexpected or misshapen tensor.
    """
    shapes = file_shapes(art, key)
    if art.kind == "hf":  # each rank reads only the slices it holds, straight from the safetensors files
        from meshtune.models.hf import load_hf_into

        check_fits(shapes, expected, recipe_owned, art, key)
        load_hf_into(model, art.path)
        return
    state = None
    if shapes is None or art.kind != "checkpoint":
        state = full_state(art, key)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
    check_fits(shapes, expected, recipe_owned, art, key)
    try:
        if state is None:
            _load_dcp(model, art.path, strict=False)
        else:
            _load_full(model, state, strict=False)
    except (Exception, BaseException) as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, KeyboardInterrupt | SystemExit | ConfigError):
            raise
        raise ConfigError(f"{key}: {art.path} does not match the model ({first_line(e)}); check model.* sizes "
                          "against the run that wrote it") from None
