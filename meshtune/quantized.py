"""Quantized exports: a run's model with real int8 / int4 weights (torchao), saved, reloaded and sized.

    meshtune export runs/finetune-qat --format quantized          # QAT run: torchao's convert step
    meshtune export runs/tiny --format quantized --scheme int8-int8   # any other run: post-training quantization

A run trained with the `qat` recipe is converted (`recipes.qat.convert`: LoRA merged first for `lora+qat`);
any other run is quantized after training (`recipes.qat.ptq`, LoRA merged first) with the scheme, group size
and targets of its `recipe.qat` section (`--scheme` overrides the scheme). The file `model_quantized.pt` holds
the quantized weights as plain tensors (int8 codes, int4 codes packed two to a byte, per-group scales and zero
points), the other tensors as they are, and the model / quantization config; `load_quantized` rebuilds a
runnable model (torchao IntxUnpackedToInt8Tensor weights) from it in a process that has meshtune and torchao
(`torch.export` of it, for runtimes without meshtune, traces: see tests/unit/test_qat.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from meshtune.config import ConfigError, ModelConfig, QuantConfig

FILE = "model_quantized.pt"


def quantize_loaded(run, scheme: str | None = None) -> tuple[nn.Module, QuantConfig, str]:
    """(quantized model, its QuantConfig, "qat" or "ptq") for a `meshtune.export.LoadedRun`, in place."""
    from meshtune.recipes.qat import QATRecipe, convert, ptq

    c = run.cfg.recipe.qat
    if scheme is not None:
        c = dataclasses.replace(c, scheme=scheme)
    qat = any(isinstance(r, QATRecipe) for r in run.recipes)
    if qat and scheme is not None and scheme != run.cfg.recipe.qat.scheme:
        raise ConfigError(f"--scheme: this run trained with recipe.qat.scheme={run.cfg.recipe.qat.scheme}; "
                          f"converting it to {scheme} would discard its QAT; omit --scheme")
    model = convert(run.model, c) if qat else ptq(run.model, c)
    return model.eval(), c, "qat" if qat else "ptq"


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] -> uint8, two to a byte (low nibble first; an odd count is padded)."""
    u = (q.flatten().to(torch.int16) + 8).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, u.new_zeros(1)])
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `pack_int4`: int8 codes of that shape."""
    u = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten()[: torch.Size(shape).numel()]
    return (u.to(torch.int16) - 8).to(torch.int8).reshape(shape)


def _is_quantized(t: torch.Tensor) -> bool:
    from torchao.quantization import IntxUnpackedToInt8Tensor

    return isinstance(t, IntxUnpackedToInt8Tensor)


def save_quantized(model: nn.Module, path: Path, model_cfg: ModelConfig, vocab_size: int, c: QuantConfig,
                   how: str) -> Path:
    """torch.save the quantized weights as plain tensors (int4 codes packed two to a byte) and the rest of the
    state dict, with the configs needed to rebuild the model."""
    meta = {"model": dataclasses.asdict(model_cfg), "vocab_size": vocab_size, "qat": dataclasses.asdict(c),
            "how": how}
    state, quantized = {}, {}
    for k, t in model.state_dict().items():
        if not _is_quantized(t):
            state[k] = t
            continue
        int4 = t.target_dtype == torch.int4
        quantized[k] = {"codes": pack_int4(t.qdata) if int4 else t.qdata, "packed": int4,
                        "scale": t.scale, "zero_point": t.zero_point}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meshtune": json.dumps(meta), "state": state, "quantized": quantized}, path)
    return path


def load_quantized(path: str | Path) -> nn.Module:
    """The quantized model saved by `save_quantized`, on CPU in eval mode.

    Raises:
        ConfigError: when the file is missing or not a meshtune quantized export.
    """
    from torchao.quantization import IntxUnpackedToInt8Tensor

    from meshtune.models import build_model
    from meshtune.recipes.qat import ptq

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; write it with `meshtune export RUN_DIR --format quantized`")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "meshtune" not in blob or "quantized" not in blob:
        raise ConfigError(f"{path}: not a meshtune quantized export (no 'meshtune' / 'quantized' entry); "
                          f"write it again with `meshtune export RUN_DIR --format quantized`")
    meta = json.loads(blob["meshtune"])
    model = build_model(ModelConfig(**meta["model"]), meta["vocab_size"], device="meta")
    model.to_empty(device="cpu")
    model.init_weights()  # rotary tables; every weight is replaced below
    model = ptq(model, QuantConfig(**meta["qat"]))  # the same quantized layout (placeholders), then the values
    state, placeholders = dict(blob["state"]), model.state_dict()
    for k, q in blob["quantized"].items():
        like = placeholders.get(k)
        if like is None or not _is_quantized(like):
            raise ConfigError(f"{path}: {k} is quantized in the file but not in the model its config builds; "
                              "write it again with `meshtune export RUN_DIR --format quantized`")
        codes = unpack_int4(q["codes"], tuple(like.shape)) if q["packed"] else q["codes"]
        state[k] = IntxUnpackedToInt8Tensor(codes, q["scale"], q["zero_point"], like.target_dtype, like.block_size,
                                            like.dtype, like.activation_quantization)
    model.load_state_dict(state, assign=True)
    return model.eval()


def fp32_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of a state dict's tensors in float32 (the size of the unquantized model)."""
    seen, n = set(), 0
    for t in state.values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * 4
    return n
