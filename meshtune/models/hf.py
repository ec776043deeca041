"""Hugging Face checkpoints in and out: config.json + safetensors <-> meshtune's decoder, for every family.

    cfg = read_hf_config(hf_dir)                     # ModelConfig (family, vocab_size set), from config.json
    model = build_model(cfg, cfg.vocab_size)
    model.load_state_dict(load_hf_state_dict(hf_dir))
    ...                                                                               # train
    save_hf_checkpoint(model.state_dict(), cfg, cfg.vocab_size, "out/hf", tokenizer_dir=hf_dir)

Reading needs only json and safetensors (transformers stays optional). Tensor names come from the family spec
(meshtune/models/families/); the expected tensors and shapes from the decoder itself, built on the meta device.
Query/key rows (weights, biases and the per-head q/k norms) are permuted because meshtune's rotary embedding
rotates interleaved pairs (Meta's layout) while Hugging Face's rotates halves (its convert_llama_weights_to_hf
`permute`). Fused HF tensors (Phi-3's qkv_proj, gate_up_proj) are split into meshtune's separate projections on
load and concatenated on export (hf_fused.py), the permutation applied on the q/k row ranges.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch

from meshtune.config import ConfigError, ModelConfig
from meshtune.models.families import family
from meshtune.models.hf_config import (  # noqa: F401 (re-exported: the torch-free half)
    INDEX_FILE,
    SINGLE_FILE,
    hf_config_dict,
    is_hf_dir,
    mismatches,
    model_config_from_hf,
    model_fields_from_hf,
    read_hf_config,
    read_hf_json,
)
from meshtune.models.hf_fused import fuse, fused_rows, hf_key_shapes, parts_of

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
# copied next to an export with the tokenizer: the sampling defaults the model was released with
COPIED_FILES = ("generation_config.json",)
_IGNORED_HF_KEY = re.compile(r"\.rotary_emb\.inv_freq$")  # a buffer some older checkpoints saved


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from meshtune's interleaved pairs to HF rotate-half: per head, row 2i+c -> row c*D/2+i."""
    assert w.shape[0] % (2 * n_heads) == 0, f"{w.shape[0]} rows do not split into {n_heads} heads of pairs"
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_rope_rows`: HF rotate-half rows -> meshtune interleaved pairs."""
    assert w.shape[0] % (2 * n_heads) == 0, f"{w.shape[0]} rows do not split into {n_heads} heads of pairs"
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_matches_hf(cfg: ModelConfig, vocab_size: int, path: str | Path) -> None:
    """Refuse to load `path` into a model built from `cfg` when they differ, including in values that no tensor
    shape reveals (rope_theta, norm_eps, rope_scaling) and that would silently change the logits.

    Raises:
        ConfigError: naming every differing `model.*` field at once, as the overrides that fix them.
    """
    fields = model_fields_from_hf(read_hf_json(path), source=str(Path(path) / "config.json"))
    ours = dataclasses.replace(cfg, vocab_size=vocab_size)
    fixes = mismatches(ours, fields, set(fields) - {"tie_embeddings"})
    if cfg.tie_embeddings and not fields["tie_embeddings"]:
        fixes.append("model.tie_embeddings=false")
    if fixes:
        raise ConfigError(f"init_from: {path} (config.json) differs from this run's model in {len(fixes)} "
                          f"value(s); set {' '.join(fixes)}")


def _shapes(cfg: ModelConfig, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """meshtune parameter name -> shape, for every tensor of the decoder `cfg` builds (tied head included)."""
    from meshtune.models.decoder import build_model

    return {k: tuple(v.shape) for k, v in build_model(cfg, vocab_size, "meta").state_dict(keep_vars=True).items()}


def hf_names(cfg: ModelConfig, names) -> dict[str, str]:
    """meshtune parameter name -> Hugging Face name, through the family's spec (the parts of a fused HF tensor,
    e.g. Phi-3's wq/wk/wv, all map to its name; `hf_fused.fused_rows` gives their rows)."""
    fam = family(cfg.family)
    out = {}
    for name in names:
        module, leaf = name.rsplit(".", 1)
        if module.startswith("layers."):
            _, i, rest = module.split(".", 2)
            if rest not in fam.hf_block:
                continue
            out[name] = f"model.layers.{i}.{fam.hf_block[rest]}.{leaf}"
        elif module in fam.hf_top:
            out[name] = f"{fam.hf_top[module]}.{leaf}"
    return out


def _rope_heads(name: str, cfg: ModelConfig) -> int | None:
    """Heads whose rows to permute for a tensor in query/key head layout (q/k weights and biases, the per-head
    q/k norms), else None."""
    n = family(cfg.family).names
    module = name.rsplit(".", 1)[0].split(".", 2)[-1]
    return {n.q: cfg.n_heads, n.k: cfg.n_kv_heads or cfg.n_heads, n.q_norm: 1, n.k_norm: 1}.get(module)


def _files(path: Path) -> tuple[list[str], Path | None]:
    index = path / INDEX_FILE
    if not index.is_file():
        return [SINGLE_FILE], None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{index}: not a safetensors index ({e!r}); re-save the checkpoint") from None
    return sorted(set(weight_map.values())), index


def hf_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """meshtune name -> shape of every tensor of an HF directory, from the safetensors headers alone (nothing
    is loaded): the launcher checks a checkpoint against the model before any rank starts.

    Raises:
        ConfigError: for a shard the index names that is missing, a damaged file, or a tensor the config's
            model has no place for.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    cfg = read_hf_config(path)
    expected = _shapes(cfg, cfg.vocab_size)
    names = hf_names(cfg, expected)
    rows = fused_rows(family(cfg.family), names, expected)
    want, parts = hf_key_shapes(names, expected, rows), parts_of(rows)
    from_hf = {v: k for k, v in names.items() if k not in rows}
    files, index = _files(path)
    out = {}
    for fname in files:
        if not (path / fname).is_file():
            raise ConfigError(f"{index}: lists {fname}, which is missing from {path}; download it again")
        try:
            with safe_open(str(path / fname), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (not a dict)
                    if _IGNORED_HF_KEY.search(key):
                        continue
                    if key not in want:
                        raise ConfigError(f"{path / fname}: unexpected tensor {key!r}; config.json describes a "
                                          f"{cfg.family} model without it (does config.json belong to these weights?)")
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != want[key]:
                        raise ConfigError(f"{path / fname}: tensor {key!r} has shape {shape}, config.json implies "
                                          f"{want[key]} (does config.json belong to these weights?)")
                    for name in parts[key] if key in parts else [from_hf[key]]:  # fused: each part's rows
                        out[name] = (rows[name].stop - rows[name].start, *shape[1:]) if name in rows else shape
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{path / fname}: not a readable safetensors file ({e}); download it again") from None
    if cfg.tie_embeddings and "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def _read_box(f, key: str, offset: tuple[int, ...], shape: tuple[int, ...], heads: int | None,
              head_rows: int, row0: int = 0) -> torch.Tensor:
    """Rows/columns `offset : offset + shape` of tensor `key` in meshtune's layout, reading only those bytes
    (for rotary-permuted tensors: the whole heads the rows fall in, since the permutation stays within a head).
    `row0`: where the tensor's rows start in `key` (a part of a fused tensor)."""
    if 0 in shape:  # an empty FSDP shard (more ranks than chunks of dim 0)
        return torch.empty(shape)
    sl = f.get_slice(key)
    if heads is None:
        return sl[tuple(slice(o, o + n) for o, n in zip((offset[0] + row0, *offset[1:]), shape, strict=True))]
    a, b = offset[0], offset[0] + shape[0]
    h0, h1 = a // head_rows, -(-b // head_rows)
    cols = tuple(slice(o, o + n) for o, n in zip(offset[1:], shape[1:], strict=True))
    rows = unpermute_rope_rows(sl[(slice(row0 + h0 * head_rows, row0 + h1 * head_rows), *cols)], h1 - h0)
    return rows[a - h0 * head_rows: b - h0 * head_rows]


@torch.no_grad()
def load_hf_into(model: torch.nn.Module, path: str | Path) -> int:
    """Copy an HF directory's weights into `model` (any layout: FSDP2 / TP shards, a pipeline stage, plain),
    each rank reading from the memory-mapped safetensors only the slices it holds, converted to the
    parameter's dtype. Names the recipes added (LoRA, adapters) are left as they are. Returns bytes read.

    Check the shapes first (`hf_shapes` + `check_fits`): this trusts them.
    """
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    from meshtune.artifacts.packed import is_nf4
    from meshtune.artifacts.shards import local_box, quantize_rows

    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # DDP prefixes every name with `module.`
    path = Path(path)
    cfg = read_hf_config(path)
    files, _ = _files(path)
    shapes = _shapes(cfg, cfg.vocab_size)
    names = hf_names(cfg, shapes)
    rows = fused_rows(family(cfg.family), names, shapes)
    if cfg.tie_embeddings:  # the head reads the embedding (HF stores it once)
        names["output.weight"] = names["tok_embeddings.weight"]
    where = {}
    for fname in files:
        with safe_open(str(path / fname), framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), path / fname))  # noqa: SIM118 (not a dict)
    done, read = set(), 0
    for name, p in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        key = names.get(name)
        if key is None or id(p) in done or key not in where:
            continue  # a recipe's tensor, a tied copy already filled, a derived buffer
        done.add(id(p))
        offset, shape = local_box(p)
        heads = _rope_heads(name, cfg)
        # one open per tensor: the memory map's touched pages count in this rank's RSS until it is closed
        with safe_open(str(where[key]), framework="pt") as f:
            piece = _read_box(f, key, offset, shape, heads, p.shape[0] // heads if heads else 0,
                              rows[name].start if name in rows else 0)
        if is_nf4(p):  # QLoRA's frozen base: quantized as the whole weight is, whatever rows this rank holds
            quantize_rows(p, piece)
        else:
            local = p.to_local() if isinstance(p, DTensor) else p
            local.copy_(piece.to(local.dtype))
        read += piece.numel() * piece.element_size()
        del piece
    return read


def load_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an HF checkpoint directory into a meshtune state dict (names mapped, q/k rows un-permuted).

    With tied embeddings (no `lm_head.weight`) `output.weight` is the embedding tensor itself.

    Raises:
        ConfigError: naming the file and key of an unknown, missing or mis-shaped tensor, or an unsupported config.
    """
    from safetensors.torch import load_file

    path = Path(path)
    cfg = read_hf_config(path)
    shapes = _shapes(cfg, cfg.vocab_size)
    names = hf_names(cfg, shapes)
    rows = fused_rows(family(cfg.family), names, shapes)
    want, parts = hf_key_shapes(names, shapes, rows), parts_of(rows)
    from_hf = {v: k for k, v in names.items() if k not in rows}
    files, index = _files(path)
    state: dict[str, torch.Tensor] = {}
    for fname in files:
        if not (path / fname).is_file():
            raise ConfigError(f"{index}: lists {fname}, which is missing from {path}; download it again")
        for key, t in load_file(str(path / fname)).items():
            if _IGNORED_HF_KEY.search(key):
                continue
            if key not in want:
                raise ConfigError(f"{path / fname}: unexpected tensor {key!r}; config.json describes a "
                                  f"{cfg.family} model without it (does config.json belong to these weights?)")
            if tuple(t.shape) != want[key]:
                raise ConfigError(f"{path / fname}: tensor {key!r} has shape {tuple(t.shape)}, config.json implies "
                                  f"{want[key]} (does config.json belong to these weights?)")
            if key in parts:  # a fused tensor: each part's rows, a tensor of its own
                pieces = [(n, t[rows[n].start: rows[n].stop].clone()) for n in parts[key]]
            else:
                pieces = [(from_hf[key], t)]
            for name, piece in pieces:
                heads = _rope_heads(name, cfg)
                state[name] = unpermute_rope_rows(piece, heads).contiguous() if heads else piece
    if "output.weight" not in state and cfg.tie_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    missing = [k for k in shapes if k not in state]
    if missing:
        raise ConfigError(f"{path}: tensor {hf_names(cfg, missing)[missing[0]]!r} is missing from the checkpoint "
                          f"files {files} ({len(missing)} missing in all)")
    return state


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """meshtune weights -> the family's HF names, q/k rows permuted to HF's rotate-half layout.

    Raises ConfigError for a tensor that has no HF name (an unmerged adapter) or a missing one."""
    vocab = cfg.vocab_size or state["tok_embeddings.weight"].shape[0]
    cfg = dataclasses.replace(cfg, vocab_size=vocab)
    shapes = _shapes(cfg, vocab)
    if cfg.tie_embeddings:
        del shapes["output.weight"]
    extra = sorted(set(state) - set(shapes) - {"output.weight"})
    if extra:
        raise ConfigError(f"save_hf_checkpoint: {extra[0]!r} has no Hugging Face {cfg.family} name; merge or drop "
                          "recipe tensors (LoRA, adapters) before exporting")
    names = hf_names(cfg, shapes)
    rows = fused_rows(family(cfg.family), names, shapes)
    tensors, parts = {}, {}
    for name in shapes:
        if name not in state:
            raise ConfigError(f"save_hf_checkpoint: the state has no {name!r}")
        t = state[name].detach().to("cpu")
        heads = _rope_heads(name, cfg)
        t = permute_rope_rows(t, heads) if heads else t
        if name in rows:  # a part of a fused tensor: concatenated below, in its place among the keys
            parts[name] = t
            tensors.setdefault(names[name], None)
        else:  # clone: safetensors refuses tensors that share storage (tied weights, views)
            tensors[names[name]] = t.contiguous().clone()
    tensors.update(fuse(parts, rows))
    return tensors


def save_hf_checkpoint(state: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int, out_dir: str | Path,
                       max_shard_bytes: int = 5 * 2**30, tokenizer_dir: str | Path | None = None) -> Path:
    """Write a meshtune state dict as an HF checkpoint directory of its family that `from_pretrained` loads.

    Args:
        state: full (unsharded) meshtune weights, e.g. `model.state_dict()` or `get_model_state_dict(...,
            full_state_dict=True)`; LoRA/adapter tensors must be merged or dropped first.
        cfg, vocab_size: the model's config and resolved vocabulary size.
        out_dir: created if needed.
        max_shard_bytes: above this total, write model-0000i-of-0000n.safetensors + model.safetensors.index.json.
        tokenizer_dir: copy its tokenizer files (and bos/eos/pad ids of its config.json, if any) alongside.

    Returns:
        `out_dir` as a Path.

    Raises:
        ConfigError: for a tensor that has no HF name in its family (e.g. an unmerged adapter), or a missing one.
    """
    from safetensors.torch import save_file

    cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    tensors = to_hf_state_dict(state, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:  # a previous export's shards
        stale.unlink(missing_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata=meta)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    hf_cfg = hf_config_dict(cfg, vocab_size, str(tensors["model.embed_tokens.weight"].dtype).removeprefix("torch."))
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        for fname in TOKENIZER_FILES + COPIED_FILES:
            if (src / fname).is_file():
                shutil.copyfile(src / fname, out / fname)
        if (src / "config.json").is_file():
            ids = json.loads((src / "config.json").read_text())
            hf_cfg.update({k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ids})
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return out
