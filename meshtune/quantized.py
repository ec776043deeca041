"""Quantized exports: a run's model with real int8 / int4 weights (torchao), saved, reloaded and sized.

    meshtune export runs/finetune-qat --format quantized          # QAT run: torchao's convert step
    meshtune export runs/tiny --format quantized --scheme int8-int8   # any other run: post-training quantization

A run trained with the `qat` recipe is converted (`recipes.qat.convert`: LoRA merged first for `lora+qat`);
any other run is quantized after training (`recipes.qat.ptq`, LoRA merged first) with the scheme, group size
and targets of its `recipe.qat` section (`--scheme` overrides the scheme). The file `model_quantized.pt` holds
the quantized state dict (torchao IntxUnpackedToInt8Tensor weights: int8 storage, for int4 one value per
byte, plus per-group scales) and the model / quantization config; `load_quantized` rebuilds a runnable model
from it in a process that has meshtune and torchao (`torch.export` of it, for runtimes without meshtune,
traces: see tests/unit/test_qat.py).
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


def save_quantized(model: nn.Module, path: Path, model_cfg: ModelConfig, vocab_size: int, c: QuantConfig,
                   how: str) -> Path:
    """torch.save the quantized state dict with the configs needed to rebuild the model."""
    meta = {"model": dataclasses.asdict(model_cfg), "vocab_size": vocab_size, "qat": dataclasses.asdict(c),
            "how": how}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meshtune": json.dumps(meta), "state": model.state_dict()}, path)
    return path


def load_quantized(path: str | Path) -> nn.Module:
    """The quantized model saved by `save_quantized`, on CPU in eval mode.

    Raises:
        ConfigError: when the file is missing or not a meshtune quantized export.
    """
    import torchao  # noqa: F401  (registers its tensor subclasses as safe globals for weights_only loading)

    from meshtune.models import build_model
    from meshtune.recipes.qat import ptq

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; write it with `meshtune export RUN_DIR --format quantized`")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "meshtune" not in blob:
        raise ConfigError(f"{path}: not a meshtune quantized export (no 'meshtune' entry)")
    meta = json.loads(blob["meshtune"])
    model = build_model(ModelConfig(**meta["model"]), meta["vocab_size"], device="meta")
    model.to_empty(device="cpu")
    model.init_weights()  # rotary tables; every weight is replaced below
    model = ptq(model, QuantConfig(**meta["qat"]))  # the same quantized layout, then the saved values
    model.load_state_dict(blob["state"], assign=True)
    return model.eval()


def fp32_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of a state dict's tensors in float32 (the size of the unquantized model)."""
    seen, n = set(), 0
    for t in state.values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * 4
    return n
