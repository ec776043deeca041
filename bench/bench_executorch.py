"""Deployment speed and size: ExecuTorch programs (fp32, int8-int8, int8-int4) vs eager PyTorch, in one run.

    python bench/bench_executorch.py                           # base (500 steps on sort) + 6 programs: ~3-8 min
    python bench/bench_executorch.py --base runs/bench-sort    # reuse the base of bench_prune / bench_distill

Targets (issue 20): the int8 program >= 3x the decode tokens/s of eager fp32 and >= 3.5x smaller on disk;
int4 >= 4.5x smaller.

The model is the demo's base: pretrain/tiny (dim 128 x 3 layers, byte vocabulary, max_seq_len 64) trained on
`sort` (bench/tiny_base.py; reused from --base when it holds the finished run). Exported with `meshtune export`:
merged (fp32 safetensors: the eager size), quantized int8-int8 / int8-int4 (`.pt`, PTQ, group 32) and
executorch fp32 / int8-int8 / int8-int4 (.pte, batch 1, KV cache of 64). For the (32, 40) prefill, programs of
the same models with a batch-32 cache are lowered here too. Everything on 1 thread (torch and the ExecuTorch
threadpool), median of --reps:
  decode: batch-1 greedy steps after an 8-token prompt, --decode-tokens of them, tokens/s. Eager rows run
    meshtune's model through the static KV cache of `meshtune.export.static_cache.StaticCacheDecoder` (plain torch
    ops: the eager reference of the program's decoder, a fair eager baseline), and "eager fp32, no cache" is
    `meshtune.inference.generate`'s way (the whole sequence again every step);
  prefill: one forward of a (32, 40) batch, ms;
  size: the file on disk; x = ratio to eager fp32 (speed) or to the fp32 safetensors (size).

Measured 2026-12-07, 2 shared CPU cores (others' jobs running, lightly loaded at the time), 1 thread, base reused
(500 steps), exports + 6 lowerings 115 s (`meshtune export --format executorch`: fp32 10.8 s, int8-int8 22.5 s,
int8-int4 23.8 s):
    variant                          size KiB  x smaller  decode tok/s      x  prefill ms     x
    eager fp32, no cache (generate)    2431.8       1.00         880.2   0.75           -     -
    eager fp32 (KV cache)              2431.8       1.00        1175.2   1.00       16.79  1.00
    eager torchao int8-int8             913.9       2.66         205.8   0.18       34.30  0.49
    eager torchao int8-int4             643.8       3.78         206.7   0.18       34.06  0.49
    program fp32                       2471.1       0.98        7620.6   6.48       14.79  1.13
    program int8-int8                   677.8       3.59       18234.9  15.52       11.19  1.50
    program int8-int4                   398.4       6.10       19269.1  16.40       12.83  1.31
  decode: int8 program 15.5x eager fp32 with a KV cache (target 3: met), int4 16.4x. The programs are lowered from
    `meshtune.export.program_decoder.ProgramDecoder`: ExecuTorch's custom_sdpa / update_cache for the cache and
    attention, norms / rotary / reshapes in ops XNNPACK takes, so a step is n_layers + 1 XNNPACK partitions and 9
    LLM-kernel calls (was 29 partitions and ~200 portable ops: 2.6x). On this tiny model a step is mostly per-op
    overhead, which the program removes (eager pays Python and dispatch per op); on larger models the ratio will be
    set by the kernels (XNNPACK int8 GEMMs vs fp32). The eager torchao models decode 5.7x SLOWER than fp32: their
    int8 matmul dequantizes the weights in every call (the `.pt` is an interchange format; deploy the program).
  size: int8 3.59x (target 3.5: met), int4 6.10x (target 4.5: met). Quantized schemes now also quantize the head
    (8da, XNNPACK) and the embedding (weight-only, ExecuTorch's embedding_byte / embedding_4bit kernels), which were
    ~30% of the int8 file in fp32. Beyond the weights a program holds its rotary tables, XNNPACK's graph descriptions
    and the flatbuffer (+44 KiB fp32, +52 KiB int8); the KV cache is planned memory, not in the file.
  prefill (32, 40): the programs are now 1.1-1.5x eager (were 0.41-0.48x).
  Timings on this shared machine move 2-3x with the other jobs' load (the previous run measured eager fp32 at
  427 tok/s); the ratios are from one run, each row on the same machine minutes apart.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_base import train_base  # noqa: E402

from meshtune.measure import decode_timer, median_time, program_step, prompt_tokens  # noqa: E402

SCHEMES = ("fp32", "int8-int8", "int8-int4")


def decode_fn(step, prompt_len: int, n: int):
    """A closure: prefill a fixed `prompt_len`-token prompt (untimed), then n greedy decode steps; returns their
    seconds (meshtune.measure's decode timing)."""
    return decode_timer(step, prompt_tokens(prompt_len, 256), n)


def eager_no_cache_fn(model, prompt_len: int, n: int):
    prompt = torch.randint(0, 256, (1, prompt_len), generator=torch.Generator().manual_seed(0))

    def run() -> float:
        seq = prompt
        t0 = time.perf_counter()
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
        return time.perf_counter() - t0

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="the base's run dir (trained there once, else reused); default: a temp dir")
    p.add_argument("--base-steps", type=int, default=500)
    p.add_argument("--decode-tokens", type=int, default=48, help="timed decode steps (8 + this <= 64)")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()

    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    from meshtune.artifacts import find, find_checkpoint, load_run
    from meshtune.artifacts.quantized import load_quantized
    from meshtune.export import export
    from meshtune.export.executorch import program_model, program_scheme, quantize_program_model
    from meshtune.export.program_decoder import load_runtime_ops, lower
    from meshtune.export.static_cache import StaticCacheDecoder

    load_runtime_ops()  # the programs' LLM and quantized-embedding kernels, before program_step loads one
    torch.set_num_threads(1)
    _unsafe_reset_threadpool(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-et-"))
    base = Path(args.base) if args.base else tmp / "base"
    trainer, how = train_base(base, "sort", args.base_steps, 128)
    del trainer
    print(f"base: pretrain/tiny on sort, {args.base_steps} steps, {how}", flush=True)
    seq_len, batch, prompt_len, n = 40, 32, 8, args.decode_tokens

    t0 = time.perf_counter()
    merged = export(base, "merged", tmp / "merged", quiet=True)[0]
    files = {"eager fp32": merged}
    for scheme in ("int8-int8", "int8-int4"):
        files[f"eager torchao {scheme}"] = export(base, "quantized", tmp / scheme, scheme=scheme, quiet=True)[0]
    export_s = {}
    for scheme in SCHEMES:
        t1 = time.perf_counter()
        files[f"program {scheme}"] = export(base, "executorch", tmp / f"et-{scheme}", scheme=scheme, quiet=True)[0]
        export_s[scheme] = time.perf_counter() - t1
    run = load_run(find(find_checkpoint(base, None), key="--base"))
    prefill_pte = {}
    for scheme in SCHEMES:  # the same models with a batch-32 cache, for the (32, 40) prefill
        _, qcfg = program_scheme(run, scheme)
        model = program_model(run)
        model = model if qcfg is None else quantize_program_model(model, qcfg)[0]
        prefill_pte[scheme] = tmp / f"prefill-{scheme}.pte"
        prefill_pte[scheme].write_bytes(lower(model, seq_len, batch=batch).buffer)
    print(f"exports and lowering: {time.perf_counter() - t0:.0f} s; `meshtune export --format executorch` (batch 1, "
          f"cache of 64): " + ", ".join(f"{k} {v:.1f} s" for k, v in export_s.items()), flush=True)

    fp32_model = program_model(run)
    eager = {"eager fp32": fp32_model, **{f"eager torchao {s}": load_quantized(files[f"eager torchao {s}"])
                                         for s in ("int8-int8", "int8-int4")}}
    x = torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    rows = []
    with torch.no_grad():
        nc = median_time(eager_no_cache_fn(fp32_model, prompt_len, n), args.reps)
        rows.append(("eager fp32, no cache (generate)", merged, n / nc, None))
        for name, model in eager.items():
            cached = StaticCacheDecoder(model, prompt_len + n + 1)
            dec = median_time(decode_fn(cached, prompt_len, n), args.reps)
            pre = median_time(lambda m=model: m(x), args.reps)
            rows.append((name, files[name], n / dec, pre))
        for scheme in SCHEMES:
            # program_step (meshtune.measure.ProgramStep) keeps each Program alive with its method: a Program loaded
            # from bytes holds the constants its method reads (dropping it segfaulted)
            step = program_step(str(files[f"program {scheme}"]))
            dec = median_time(decode_fn(step, prompt_len, n), args.reps)
            pstep = program_step(str(prefill_pte[scheme]))
            pre = median_time(lambda s=pstep: s(x, torch.arange(seq_len)), args.reps)
            rows.append((f"program {scheme}", files[f"program {scheme}"], n / dec, pre))

    ref_tps, ref_pre, ref_size = rows[1][2], rows[1][3], merged.stat().st_size
    print(f"\n1 thread; decode: {n} tokens after a {prompt_len}-token prompt, batch 1; prefill: ({batch}, {seq_len}); "
          "x = vs eager fp32 (KV cache) / vs the fp32 safetensors")
    print(f"{'variant':34} {'size KiB':>9} {'x smaller':>9} {'decode tok/s':>12} {'x':>6} {'prefill ms':>10} {'x':>6}")
    for name, path, tps, pre in rows:
        size = path.stat().st_size
        pre_s = f"{pre * 1e3:10.2f} {ref_pre / pre:6.2f}" if pre is not None else f"{'-':>10} {'-':>6}"
        print(f"{name:34} {size / 1024:9.1f} {ref_size / size:9.2f} {tps:12.1f} {tps / ref_tps:6.2f} {pre_s}")
    by = {r[0]: r for r in rows}
    i8, i4 = by["program int8-int8"], by["program int8-int4"]
    print(f"\nint8 program: {i8[2] / ref_tps:.2f}x decode tokens/s (target >= 3), "
          f"{ref_size / i8[1].stat().st_size:.2f}x smaller (target >= 3.5); int4 program: "
          f"{ref_size / i4[1].stat().st_size:.2f}x smaller (target >= 4.5), {i4[2] / ref_tps:.2f}x decode")


if __name__ == "__main__":
    main()
