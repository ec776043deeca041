"""Reading `meshtune export --format quantized` files (model_quantized.pt) back into runnable models.

The file holds the quantized weights as plain tensors (int8 codes, int4 codes packed two to a byte, per-group
scales and zero points), the other tensors as they are, and the model / quantization config; `load_quantized`
rebuilds a model with torchao IntxUnpackedToInt8Tensor weights from it (in a process with meshtune and
torchao; `torch.export` of it, for runtimes without meshtune, traces: see tests/unit/test_qat.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from meshtune.artifacts.safe import load_torch_file
from meshtune.config import ConfigError, ModelConfig
from meshtune.recipes.qat import QuantConfig


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


def load_quantized(path: str | Path) -> nn.Module:
    """The quantized model saved by `meshtune.export.quantized.save_quantized`, on CPU in eval mode.

    Raises:
        ConfigError: when the file is missing, unsafe or not a meshtune quantized export.
    """
    from meshtune.quiet import quiet_torchao

    quiet_torchao()
    from torchao.quantization import IntxUnpackedToInt8Tensor

    from meshtune.models import build_model
    from meshtune.recipes.qat import ptq

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; write it with `meshtune export RUN_DIR --format quantized`")
    blob = load_torch_file(path)
    if not isinstance(blob, dict) or "meshtune" not in blob or "quantized" not in blob:
        raise ConfigError(f"{path}: not a meshtune quantized export (no 'meshtune' / 'quantized' entry); "
                          f"write it again with `meshtune export RUN_DIR --format quantized`")
    meta = json.loads(blob["meshtune"])
    model = build_model(ModelConfig(**meta["model"]), meta["vocab_size"], device="meta")
    model.to_empty(device="cpu")
    model.init_buffers()  # rotary tables; every weight is replaced below
    model = ptq(model, QuantConfig(**meta["qat"]))  # the same quantized layout (placeholders), then the values
    state, placeholders = dict(blob["state"]), model.state_dict()
    for k, q in blob["quantized"].items():
        like = placeholders.get(k)
        if like is None or not isinstance(like, IntxUnpackedToInt8Tensor):
            raise ConfigError(f"{path}: {k} is quantized in the file but not in the model its config builds; "
                              "write it again with `meshtune export RUN_DIR --format quantized`")
        codes = unpack_int4(q["codes"], tuple(like.shape)) if q["packed"] else q["codes"]
        state[k] = IntxUnpackedToInt8Tensor(codes, q["scale"], q["zero_point"], like.target_dtype, like.block_size,
                                            like.dtype, like.activation_quantization)
    model.load_state_dict(state, assign=True)
    return model.eval()
