"""Fused Hugging Face tensors: several meshtune tensors stored as row ranges of one HF tensor (Phi-3's
`qkv_proj` = rows of wq, then wk, then wv; `gate_up_proj` = rows of w1, then w3), as the family spec's
`hf_fused` declares. meshtune keeps the parts apart; hf.py reads each part's rows on load and concatenates
them on export, and PEFT export (`fuse_lora`) writes one adapter per fused module.

    rows = fused_rows(fam, hf_names(cfg, shapes), shapes)    # {"layers.0.attention.wk.weight": RowRange(...)}
    want = hf_key_shapes(names, shapes, rows)                  # HF key -> shape of the whole (fused) tensor
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowRange:
    """Rows `start:stop` of the HF tensor `key` hold one meshtune tensor."""

    key: str
    start: int
    stop: int


def fused_rows(fam, names: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> dict[str, RowRange]:
    """meshtune name -> its row range in an HF tensor, for every tensor in `names` (meshtune -> HF name) that
    is part of a fused one; `shapes` gives the parts' rows. Empty for a family without fused tensors."""
    if not fam.hf_fused:
        return {}
    out = {}
    for name, key in names.items():
        module, leaf = name.rsplit(".", 1)
        if not module.startswith("layers.") or name in out:
            continue
        _, i, rest = module.split(".", 2)
        parts = fam.fused_parts(rest)
        if parts is None:
            continue
        start = 0
        for part in parts:
            part_name = f"layers.{i}.{part}.{leaf}"
            if part_name in shapes:
                rows = shapes[part_name][0]
                out[part_name] = RowRange(key, start, start + rows)
                start += rows
    return out


def hf_key_shapes(names: dict[str, str], shapes: dict[str, tuple[int, ...]],
                  rows: dict[str, RowRange]) -> dict[str, tuple[int, ...]]:
    """HF key -> the shape of its tensor: a part's own shape, or for a fused tensor the parts' rows summed."""
    out = {}
    for name, key in names.items():
        if name in rows:
            out[key] = (max(rows[name].stop, out.get(key, (0,))[0]), *shapes[name][1:])
        else:
            out[key] = shapes[name]
    return out


def parts_of(rows: dict[str, RowRange]) -> dict[str, list[str]]:
    """HF key -> the meshtune names it holds, in row order."""
    out: dict[str, list[str]] = {}
    for name, r in sorted(rows.items(), key=lambda kv: (kv[1].key, kv[1].start)):
        out.setdefault(r.key, []).append(name)
    return out


def fuse(tensors: dict[str, torch.Tensor], rows: dict[str, RowRange]) -> dict[str, torch.Tensor]:
    """The fused HF tensors from their parts (`tensors`, meshtune names, already in HF row layout)."""
    return {key: torch.cat([tensors[n] for n in names]) for key, names in parts_of(rows).items()}


def fuse_lora(parts: list[tuple[int, torch.Tensor | None, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA pair on a fused module from the parts' pairs, exactly: for the parts (rows, A, B), in row order,
    with A (r_i x in) and B (rows x r_i), or None where a part has no adapter, A is the stacked A's
    (sum r_i x in) and B block-diagonal (sum rows x sum r_i; a part without an adapter gets zero rows), so that
    B A x stacks the parts' B_i A_i x. The parts must share one scaling alpha / r_i: the caller scales the fused
    adapter's alpha with its rank (alpha * sum r_i / r_i)."""
    a_list = [a for _, a, _ in parts if a is not None]
    rank = sum(a.shape[0] for a in a_list)
    ref = a_list[0]
    b = torch.zeros(sum(r for r, _, _ in parts), rank, dtype=ref.dtype)
    row = col = 0
    for rows, a, b_i in parts:
        if a is not None:
            b[row: row + rows, col: col + a.shape[0]] = b_i
            col += a.shape[0]
        row += rows
    return torch.cat(a_list).contiguous(), b
