"""Single-GPU throughput and MFU of a ~1B-parameter meshtune decoder in bf16, with and without torch.compile.

    python bench/bench_mfu.py                          # H100/H200/A100: peak bf16 FLOPs looked up by name
    python bench/bench_mfu.py --micro-batch 4 --peak-tflops 989   # other GPUs: give the dense bf16 peak
    python bench/bench_mfu.py --smoke                  # tiny config on CPU: checks the code path, no MFU

Without a CUDA GPU (and without --smoke) it prints one line and exits 0.

Target (issue "throughput"): report tokens/s and MFU = model FLOPs/s / the GPU's dense bf16 peak for eager
and compiled steps, and their ratio. Model FLOPs per token are `Transformer.flops_per_token(seq_len)`:
6 N + 12 n_layers dim seq_len (PaLM appendix B: matmul FLOPs of forward + backward, attention included,
the causal mask not discounted; the embedding lookup excluded).

What runs: the Llama-3.2-1B shape (dim 2048, 16 layers, 32 query / 8 key-value heads, SwiGLU 8192, vocab
128256, tied embeddings; 1.24B parameters) on random tokens, seq_len 2048. Parameters, gradients and AdamW
state are fp32 (fused AdamW); forward and backward run under bf16 autocast, the way meshtune's Trainer runs a
run without FSDP on GPU; the loss is fp32 cross-entropy; gradients are clipped to norm 1. "compiled" applies
`block.compile()` to every transformer block, as `parallel.compile: true` does in meshtune, to the same
model and optimizer after the eager measurement. Steps are timed with torch.cuda.synchronize() after warmup.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from meshtune.config import ModelConfig
from meshtune.models import build_model

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets; first match wins.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
)

LLAMA_1B = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, rope_theta=500000.0,
                tie_embeddings=True)
SMOKE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=0, rope_theta=10000.0, tie_embeddings=True)


def peak_flops(name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    return next((flops for key, flops in PEAK_BF16 if key in name), None)


def time_steps(step, n: int, sync) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per step (one micro-batch)")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this GPU in TFLOP/s (overrides the table)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="measure eager only")
    p.add_argument("--smoke", action="store_true", help="tiny config on CPU, fp32, to check the code path")
    args = p.parse_args()

    if args.smoke:
        device, shape, autocast_dtype = torch.device("cpu"), SMOKE, None
        args.seq_len, args.vocab, args.micro_batch = min(args.seq_len, 128), min(args.vocab, 512), 2
    elif not torch.cuda.is_available():
        print("bench_mfu: needs a CUDA GPU and none is visible; nothing measured (use --smoke to test on CPU)")
        return 0
    else:
        device, shape, autocast_dtype = torch.device("cuda"), LLAMA_1B, torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name, args.peak_tflops) if device.type == "cuda" else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    cfg = ModelConfig(**shape, max_seq_len=args.seq_len)
    model = build_model(cfg, args.vocab, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]  # (B, T) each

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(inputs)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    n_params = model.num_params()
    flops_per_step = model.flops_per_token(args.seq_len) * args.micro_batch * args.seq_len
    tokens_per_step = args.micro_batch * args.seq_len
    print(f"device: {name}; peak bf16: {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (give --peak-tflops)'}")
    print(f"model: {n_params / 1e9:.3f}B parameters ({cfg.dim} dim, {cfg.n_layers} layers, {cfg.n_heads}/"
          f"{cfg.n_kv_heads} heads, vocab {args.vocab}); seq {args.seq_len} x micro-batch {args.micro_batch}; "
          f"{model.flops_per_token(args.seq_len) / 1e9:.2f} GFLOP/token; fp32 params, "
          f"{'bf16 autocast' if autocast_dtype else 'fp32'}, {'fused ' if device.type == 'cuda' else ''}AdamW")

    results = {}
    modes = ["eager", "compiled"] if args.compile else ["eager"]
    for mode in modes:
        compile_s = None
        if mode == "compiled":
            for block in model.layers.values():
                block.compile()
            t0 = time.perf_counter()
            step()  # the first call compiles
            sync()
            compile_s = time.perf_counter() - t0
        for _ in range(args.warmup):
            step()
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = time_steps(step, args.steps, sync)
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        results[mode] = (statistics.median(times), compile_s, mem)

    print(f"\n{'mode':<10}{'ms/step':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}{'peak GiB':>10}{'compile s':>11}")
    for mode, (t, compile_s, mem) in results.items():
        achieved = flops_per_step / t
        mfu = f"{achieved / peak:.1%}" if peak else "n/a"
        cs = f"{compile_s:.1f}" if compile_s is not None else "-"
        print(f"{mode:<10}{t * 1e3:>10.1f}{tokens_per_step / t:>12.0f}{achieved / 1e12:>10.1f}{mfu:>8}{mem:>10.1f}"
              f"{cs:>11}")
    if "compiled" in results:
        ratio = results["eager"][0] / results["compiled"][0]
        print(f"\ncompiled / eager throughput: {ratio:.3f}x (median step times; {args.steps} steps after "
              f"{args.warmup} warmup)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
