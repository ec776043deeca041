"""What a pruned model becomes at export: a shrunk dense model, sparse tensors, a 2:4 CUDA model, a program.

    state, cfg = shrink_state(merged, model_cfg)            # structured: fewer heads / MLP channels, dense
    tensors, layouts = sparse_tensors(merged, masks)        # CSR or packed 2:4, only where it is smaller
    dense = dense_from_sparse(tensors, layouts)             # the round trip
    export_program(model, seq_len, "model.pt2")             # torch.export program, runs without meshtune

Sparse layouts (plain tensors, so safetensors can hold them), per pruned weight W (out x in):
    csr  `<name>.crow` (int32, out + 1), `<name>.col` (int16 when in < 2^15, else int32), `<name>.values`:
         torch's CSR (`Tensor.to_sparse_csr`) with narrower indices. Pays below 2/3 density in fp32 with
         int16 columns (values + column = 6 bytes per kept weight vs 4 per dense weight): 0.77x at 50%.
    2:4  `<name>.values` (out x in/2, the 2 kept weights of every 4 in order) and `<name>.index` (uint8,
         out x in/8: the 2-bit positions within their group, four per byte): 0.53x of fp32.
A weight whose sparse form would not be smaller is written dense under its own name.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from meshtune.config import ModelConfig


def shrink_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Cut structurally pruned heads and MLP channels out of a merged state dict (masks multiplied in).

    A key/value group (kv head + its query heads) is removed where its key rows are all zero, an MLP
    channel where its gate and up rows are; q/k/v biases (Qwen2) lose the same rows, per-head q/k norms
    (Qwen3) stay. Every layer must keep the same number of each (the recipe prunes the same count per layer)
    because the model's sizes are uniform.

    Returns:
        The smaller state dict and the model config with n_heads, n_kv_heads, head_dim and ffn_dim set.

    Raises:
        ValueError: when layers kept different numbers of heads or channels.
    """
    from meshtune.models.families import family
    from meshtune.models.sizes import head_dim

    names = family(cfg.family).names
    hd, n_kv = head_dim(cfg), cfg.n_kv_heads or cfg.n_heads
    n_rep = cfg.n_heads // n_kv
    out = dict(state)
    kept_kv, kept_ffn = set(), set()
    layers = sorted({k.split(".")[1] for k in state if k.startswith("layers.")}, key=int)

    def cut(module: str, rows=None, cols=None) -> None:
        for leaf in ("weight", "bias"):
            t = state.get(f"{module}.{leaf}")
            if t is not None:
                t = t[rows] if rows is not None else t
                out[f"{module}.{leaf}"] = t[:, cols] if cols is not None and leaf == "weight" else t

    for i in layers:
        q, k, v, o = (f"layers.{i}.{n}" for n in names.attention)
        gate, up, down = (f"layers.{i}.{n}" for n in names.mlp)
        keep = state[k + ".weight"].view(n_kv, hd, -1).ne(0).flatten(1).any(1)  # (n_kv,)
        kept_kv.add(int(keep.sum()))
        q_rows, kv_rows = keep.repeat_interleave(n_rep * hd), keep.repeat_interleave(hd)
        cut(q, rows=q_rows)
        cut(k, rows=kv_rows)
        cut(v, rows=kv_rows)
        cut(o, cols=q_rows)
        ch = state[gate + ".weight"].ne(0).any(1) | state[up + ".weight"].ne(0).any(1)
        kept_ffn.add(int(ch.sum()))
        cut(gate, rows=ch)
        cut(up, rows=ch)
        cut(down, cols=ch)
    if len(kept_kv) > 1 or len(kept_ffn) > 1:
        raise ValueError(f"layers keep different numbers of kv heads {sorted(kept_kv)} or MLP channels "
                         f"{sorted(kept_ffn)}; a shrunk model needs the same sizes in every layer")
    kv = kept_kv.pop()
    new = dataclasses.replace(cfg, n_heads=kv * n_rep, n_kv_heads=kv, head_dim=hd, ffn_dim=kept_ffn.pop())
    return {k: v.contiguous() for k, v in out.items()}, new


def _pack_2bit(pos: torch.Tensor) -> torch.Tensor:
    """(out, n) values in 0..3, n divisible by 4 -> (out, n/4) uint8, four per byte, first in the low bits."""
    p = pos.to(torch.uint8).view(pos.shape[0], -1, 4)
    return p[..., 0] | (p[..., 1] << 2) | (p[..., 2] << 4) | (p[..., 3] << 6)


def _unpack_2bit(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], dim=-1).flatten(1).long()


def to_2of4(w: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The compact 2:4 layout of `w`, or None when some group of 4 has more than 2 nonzeros."""
    if w.ndim != 2 or w.shape[1] % 8:
        return None
    groups = w.view(w.shape[0], -1, 4)
    if int(groups.ne(0).sum(-1).max()) > 2:
        return None
    # the 2 kept positions of each group, in order (a group with fewer nonzeros keeps some zeros)
    score = groups.ne(0).float() * 8 - torch.arange(4.0)  # nonzeros first, then the lowest positions
    pos = score.topk(2, -1).indices.sort(-1).values
    values = groups.gather(-1, pos).flatten(1)
    return {"values": values.contiguous(), "index": _pack_2bit(pos.flatten(1))}


def from_2of4(values: torch.Tensor, index: torch.Tensor, shape: list[int]) -> torch.Tensor:
    pos = _unpack_2bit(index).view(shape[0], -1, 2)
    out = torch.zeros(shape[0], shape[1] // 4, 4, dtype=values.dtype)
    return out.scatter_(-1, pos, values.view(shape[0], -1, 2)).view(shape)


def to_csr(w: torch.Tensor) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        csr = w.to_sparse_csr()
    col_dtype = torch.int16 if w.shape[1] < 2**15 else torch.int32
    return {"crow": csr.crow_indices().to(torch.int32), "col": csr.col_indices().to(col_dtype),
            "values": csr.values().contiguous()}


def from_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: list[int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(crow.long(), col.long(), values, size=tuple(shape), check_invariants=True)
        return csr.to_dense()


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def sparse_tensors(state: dict[str, torch.Tensor], pruned: list[str], layout: str) -> tuple[dict, dict]:
    """Each weight in `pruned` in `layout` (`csr` or `2:4`) where that is smaller than dense; the rest dense.

    Returns:
        (tensors for safetensors, {weight name: {"layout", "shape"}} for the sparse ones)."""
    tensors, layouts = {}, {}
    for key, value in state.items():
        parts = None
        if key in pruned:
            parts = to_2of4(value) if layout == "2:4" else to_csr(value)
        if parts is not None and _nbytes(parts) < value.numel() * value.element_size():
            tensors.update({f"{key}.{k}": v for k, v in parts.items()})
            layouts[key] = {"layout": layout, "shape": list(value.shape)}
        else:
            tensors[key] = value
    return tensors, layouts


def dense_from_sparse(tensors: dict[str, torch.Tensor], layouts: dict) -> dict[str, torch.Tensor]:
    """Invert `sparse_tensors`: every weight dense again."""
    out = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in layouts}
    for key, info in layouts.items():
        if info["layout"] == "2:4":
            out[key] = from_2of4(tensors[key + ".values"], tensors[key + ".index"], info["shape"])
        else:
            out[key] = from_csr(tensors[key + ".crow"], tensors[key + ".col"], tensors[key + ".values"], info["shape"])
    return out


def semi_structured(model: torch.nn.Module) -> int:
    """Convert every 2:4-sparse linear weight of a CUDA fp16/bf16 model to torch's semi-structured sparse
    tensor (`to_sparse_semi_structured`, cuSPARSELt/CUTLASS kernels); returns how many were converted.

    Raises:
        RuntimeError: without CUDA (the kernels are CUDA-only).
    """
    from torch.sparse import to_sparse_semi_structured

    if not torch.cuda.is_available():
        raise RuntimeError("to_sparse_semi_structured needs a CUDA device; on CPU keep the dense or 2:4 export")
    n = 0
    for module in model.modules():
        w = module.weight if isinstance(module, torch.nn.Linear) else None
        if w is not None and w.is_cuda and to_2of4(w.detach()) is not None:
            module.weight = torch.nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
            n += 1
    return n


def export_program(model: torch.nn.Module, seq_len: int, path: str | Path) -> Path:
    """torch.export the model's forward (tokens (1, T) -> logits) with an example (1, seq_len) input, the
    length T dynamic (2 to model.max_seq_len; the batch of 1 is specialised), and save it as a .pt2 file.

    `torch.export.load(path).module()(tokens)` runs it with torch alone: no meshtune import is needed."""
    from torch.export import Dim

    model.eval()
    max_len = model.cfg.max_seq_len
    example = torch.zeros(1, seq_len, dtype=torch.long)
    shapes = {"tokens": {1: Dim("seq", min=2, max=max_len)}}
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=shapes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path
