"""2:4 semi-structured sparsity on a CUDA GPU: the pruned model's inference with torch's sparse kernels vs dense.

    python bench/bench_sparse24.py                  # Llama-3.2-1B-shaped blocks, fp16, prefill of 8 x 2048 tokens
    python bench/bench_sparse24.py --layers 4 --batch 4
    python bench/bench_sparse24.py --smoke          # tiny shapes on CPU, dense path only: checks the code

Without a CUDA GPU it prints one line and exits 0: `to_sparse_semi_structured` has CUDA kernels only (CUTLASS /
cuSPARSELt), so on CPU meshtune trains with 2:4 masks and exports them dense or in its packed 2:4 layout.

Target (issue 5): on a CUDA device, 2:4-pruned weights converted with `to_sparse_semi_structured` for speed.
What runs: the transformer blocks of the Llama-3.2-1B shape (dim 2048, SwiGLU 8192, 32/8 heads; --layers of
them, no embedding or head: those stay dense in a 2:4 model) in fp16 on random inputs; every linear weight
gets meshtune's 2:4 mask (`recipes.prune.nm_mask`: the 2 largest |w| of every 4 inputs), then
`recipes.prune.export.semi_structured` converts them. Both models run the same (batch, seq) forward under
inference_mode; median ms after warmup, tokens/s, the speedup, and the largest output difference relative to
the output's scale (the sparse kernels sum in another order, so a few 1e-3 in fp16). Also one linear alone
(the MLP's 2048 -> 8192 up-projection), where the kernel's speedup shows without attention around it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from meshtune.config import ModelConfig
from meshtune.models import build_model
from meshtune.recipes.prune import nm_mask
from meshtune.recipes.prune.export import semi_structured

LLAMA_1B = dict(dim=2048, n_heads=32, n_kv_heads=8, ffn_dim=8192, rope_theta=500000.0)


def median_ms(fn, warmup: int, reps: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


@torch.no_grad()
def prune_2of4(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.mul_(nm_mask(m.weight))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, dense only: checks the code path")
    args = p.parse_args()
    if args.smoke:
        dev, shape, dtype = torch.device("cpu"), dict(dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128), torch.float32
        args.batch, args.seq_len, args.warmup, args.reps = 2, 32, 1, 2
    elif not torch.cuda.is_available():
        print("bench_sparse24: needs a CUDA GPU (to_sparse_semi_structured has CUDA kernels only); nothing measured")
        return 0
    else:
        dev, shape, dtype = torch.device("cuda"), LLAMA_1B, torch.float16
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    cfg = ModelConfig(**shape, n_layers=args.layers, max_seq_len=args.seq_len)
    model = build_model(cfg, 256, device=dev).to(dtype).eval()
    prune_2of4(model.layers)
    cos, sin = model.rope_cos[: args.seq_len], model.rope_sin[: args.seq_len]
    x = torch.randn(args.batch, args.seq_len, cfg.dim, device=dev, dtype=dtype)

    def blocks():
        h = x
        for block in model.layers.values():
            h = block(h, cos, sin)
        return h

    lin = torch.nn.Linear(cfg.dim, cfg.ffn_dim, bias=False, device=dev, dtype=dtype)
    prune_2of4(lin)
    xs = x.view(-1, cfg.dim)
    with torch.inference_mode():
        dense = {"blocks": (blocks(), median_ms(blocks, args.warmup, args.reps, sync)),
                 "linear": (lin(xs), median_ms(lambda: lin(xs), args.warmup, args.reps, sync))}
        if args.smoke:
            print(f"bench_sparse24 --smoke: dense blocks {dense['blocks'][1]:.2f} ms, linear {dense['linear'][1]:.2f} "
                  f"ms on CPU; the 2:4 conversion needs CUDA")
            return 0
        converted = semi_structured(model.layers) + semi_structured(lin)
        sparse = {"blocks": (blocks(), median_ms(blocks, args.warmup, args.reps, sync)),
                  "linear": (lin(xs), median_ms(lambda: lin(xs), args.warmup, args.reps, sync))}
    tokens = args.batch * args.seq_len
    print(f"device: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}; {converted} linears converted to "
          f"{type(lin.weight).__name__}")
    print(f"{'':<28}{'dense ms':>10}{'2:4 ms':>10}{'speedup':>9}{'2:4 tokens/s':>14}{'max rel diff':>14}")
    names = {"blocks": f"{args.layers} blocks, {args.batch}x{args.seq_len}",
             "linear": f"linear {cfg.dim}->{cfg.ffn_dim}"}
    for k, name in names.items():
        (a, d), (b, s) = dense[k], sparse[k]
        rel = float((a.float() - b.float()).abs().max() / a.float().abs().max())
        print(f"{name:<28}{d:>10.2f}{s:>10.2f}{d / s:>8.2f}x{tokens / (s / 1e3):>14.0f}{rel:>14.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
