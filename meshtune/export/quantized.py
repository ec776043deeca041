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
import time
from pathlib import Path

import torch

from meshtune.config import ConfigError, ModelConfig
from meshtune.export.base import Format, human_size, merged_state, register
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


@torch.no_grad()
def decode_tokens_per_s(model: torch.nn.Module, steps: int = 8) -> float:
    """Batch-1 greedy decode tokens/s of `model` on 1 thread (eager, through `StaticCacheDecoder`), timed over
    `steps` steps after a one-token prompt and one warm-up step. One thread: batch-1 steps are too small to share,
    and on a loaded machine a second thread made them 30-80x slower (measured: 3 vs 223 tokens/s)."""
    from meshtune.export.static_cache import StaticCacheDecoder

    steps = max(1, min(steps, model.cfg.max_seq_len - 2))
    cached = StaticCacheDecoder(model, steps + 2)
    tok = torch.zeros(1, 1, dtype=torch.long)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cached(tok, torch.tensor([0]))
        cached(tok, torch.tensor([1]))  # warm-up
        t0 = time.perf_counter()
        for i in range(steps):
            tok = cached(tok, torch.tensor([2 + i]))[:, -1:].argmax(-1)  # (1, 1)
        return steps / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def fp32_model(run, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The run's architecture with `state` (merged, base-model names) in fp32, to compare speed with."""
    from meshtune.models import build_model

    model = build_model(run.artifact.model_cfg, run.artifact.vocab_size, device="meta")
    model.to_empty(device="cpu")
    model.init_buffers()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def write(run, out, opts) -> list:
    art = run.artifact
    if opts.scheme == "fp32":
        raise ConfigError("--scheme fp32: --format quantized writes int8-int4 or int8-int8 weights; give one of "
                          "them (fp32 is for --format executorch)")
    state = merged_state(run)
    fp32 = fp32_bytes(state)
    fp32_tps = None if opts.quiet else decode_tokens_per_s(fp32_model(run, state))
    model, qcfg, how = quantize_loaded(run, opts.scheme)
    written = [save_quantized(model, out / FILE, art.model_cfg, art.vocab_size, qcfg, how)]
    if not opts.quiet:
        from meshtune.artifacts.quantized import load_quantized

        size, tps = written[0].stat().st_size, decode_tokens_per_s(load_quantized(written[0]))
        print(f"meshtune export: {how.upper()} {qcfg.scheme} group_size={qcfg.group_size}: "
              f"{human_size(size)} on disk vs {human_size(fp32)} of fp32 weights ({fp32 / size:.2f}x smaller); "
              f"eager decode {tps:.0f} tokens/s vs {fp32_tps:.0f} fp32 ({tps / fp32_tps:.2f}x, batch 1, 1 thread): "
              "an interchange format; for speed, --format executorch")
    return written


register(Format("quantized", "torchao int8/int4 weights (model_quantized.pt); QAT runs converted, others PTQ",
                write, merges=True))
