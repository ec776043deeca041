"""`--format quantized`: model_quantized.pt, real int8 / int4 weights (torchao). A run trained with a recipe
that offers `quantized` (QAT) is converted by it (`recipe.quantize(model, scheme)`); any other run is quantized
after training (post-training quantization, recipes merged first) with the scheme, group size and targets of
its `recipe.qat` section (`--scheme` overrides the scheme). Prints its size against fp32. The file holds the
quantized weights as plain tensors (int4 codes packed two to a byte), the other tensors as they are, and the
model / quantization config; `meshtune.artifacts` loads it back (meshtune/artifacts/quantized.py).
It is an interchange format, not a deployment one: torchao's eager int8/int4 linears dequantize the weights in
every call and run slower than fp32 on CPU (bench/bench_executorch.py: 6x slower batch-1 decode, 1.8-2.3x slower
prefill); `--format executorch` runs the same schemes in XNNPACK's kernels. So the export prints the measured
speed next to the size: batch-1 decode tokens/s (1 thread, a few steps; not under quiet) of the file loaded back vs
the run's fp32 model, both eager through the same static KV cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from meshtune.config import ConfigError, ModelConfig
from meshtune.export.base import Format, dense_model, human_size, merged_state, register
from meshtune.recipes.qat import QuantConfig

FILE = "model_quantized.pt"


def quantize_loaded(run, scheme: str | None = None) -> tuple[torch.nn.Module, QuantConfig, str]:
    """(quantized model, its QuantConfig, "qat" or "ptq") for a LoadedRun, in place."""
    from meshtune.recipes.qat import ptq

    c = run.artifact.recipe_cfg.qat
    trained = [r for r in run.recipes if "quantized" in r.export_formats()]
    if trained and scheme is not None and scheme != c.scheme:
        raise ConfigError(f"--scheme: this run trained with recipe.qat.scheme={c.scheme}; converting it to "
                          f"{scheme} would discard its QAT; omit --scheme")
    if scheme is not None:
        c = dataclasses.replace(c, scheme=scheme)
    model = trained[0].quantize(run.model, c) if trained else ptq(run.model, c)
    return model.eval(), c, "qat" if trained else "ptq"


def _is_quantized(t: torch.Tensor) -> bool:
    from torchao.quantization import IntxUnpackedToInt8Tensor

    return isinstance(t, IntxUnpackedToInt8Tensor)


def save_quantized(model: torch.nn.Module, path: Path, model_cfg: ModelConfig, vocab_size: int, c: QuantConfig,
                   how: str) -> Path:
    """torch.save the quantized weights as plain tensors (int4 codes packed two to a byte) and the rest of the
    state dict, with the configs needed to rebuild the model."""
    from meshtune.artifacts.quantized import pack_int4

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


def fp32_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of a state dict's tensors in float32 (the size of the unquantized model)."""
    seen, n = set(), 0
    for t in state.values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * 4
    return n


def decode_speeds(fp32: torch.nn.Module, quantized: torch.nn.Module, steps: int = 8) -> tuple[float, float]:
    """(fp32, quantized) batch-1 greedy decode tokens/s, eager through the same static KV cache, on 1 thread and
    taking turns (meshtune.measure): `steps` steps after a one-token prompt. One thread: batch-1 steps are too
    small to share, and on a loaded machine a second thread made them 30-80x slower (3 vs 223 tokens/s)."""
    from meshtune.measure import cached_step, speeds

    steps = max(1, min(steps, fp32.cfg.max_seq_len - 2))
    got = speeds({"fp32": cached_step(fp32, steps + 2), "quantized": cached_step(quantized, steps + 2)},
                 prompt_len=1, new_tokens=steps, vocab=fp32.vocab_size, reps=1)
    return got["fp32"][1], got["quantized"][1]


def write(run, out, opts) -> list:
    art = run.artifact
    if opts.scheme == "fp32":
        raise ConfigError("--scheme fp32: --format quantized writes int8-int4 or int8-int8 weights; give one of "
                          "them (fp32 is for --format executorch)")
    state = merged_state(run)
    fp32 = fp32_bytes(state)
    reference = None if opts.quiet else dense_model(art.model_cfg, art.vocab_size, state)  # before quantizing
    model, qcfg, how = quantize_loaded(run, opts.scheme)
    written = [save_quantized(model, out / FILE, art.model_cfg, art.vocab_size, qcfg, how)]
    if reference is not None:
        from meshtune.artifacts.quantized import load_quantized

        fp32_tps, tps = decode_speeds(reference, load_quantized(written[0]))
        size = written[0].stat().st_size
        print(f"meshtune export: {how.upper()} {qcfg.scheme} group_size={qcfg.group_size}: "
              f"{human_size(size)} on disk vs {human_size(fp32)} of fp32 weights ({fp32 / size:.2f}x smaller); "
              f"eager decode {tps:.0f} tokens/s vs {fp32_tps:.0f} fp32 ({tps / fp32_tps:.2f}x, batch 1, 1 thread): "
              "an interchange format; for speed, --format executorch")
    return written


register(Format("quantized", "torchao int8/int4 weights (model_quantized.pt); QAT runs converted, others PTQ",
                write, merges=True))
