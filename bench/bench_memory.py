"""Peak memory of the loss with a 128K vocabulary at seq 2048: chunked (train.loss_chunk_size) vs full logits.

In one process, then with parallel.vocab_parallel on 2 ranks.

    python bench/bench_memory.py                     # ~1 min on 2 cores
    python bench/bench_memory.py --chunks 256 1024 --seq 4096

Each variant runs in a fresh subprocess (one thread): a head of dim 64 x vocab 131072 (fp32), hidden states
(1, seq, 64) that require grad, the summed cross-entropy (meshtune.runtime.grads.summed_loss, full logits or
ChunkedLogits), then backward. The measured peak is VmHWM minus VmRSS just before the loss (large tensors are
mmapped by glibc, so a freed buffer leaves RSS at once and the high-water mark counts live bytes). Next to it:
the planner's prediction for the loss (runtime/memory_plan.logits_bytes 'peak': the fp32 log-probabilities
kept for backward plus the logits alive with them), which `meshtune validate` prints.

Measured here (2-core CPU, torch 2.13, fp32, batch 1, seq 2048, vocab 131072, dim 64; 50 s), peak above the
loss's inputs, the full-logits peak being logits + log-probs + both their gradients (4 x 1 GiB):
    full logits   measured 4.00 GiB   planner 4.03 GiB   1.00x
    chunk 1024    measured 1.53 GiB   planner 1.53 GiB   0.38x
    chunk 256     measured 0.41 GiB   planner 0.41 GiB   0.10x   (target <= 0.3x of full: met from chunk 512 down)
    chunk 128     measured 0.22 GiB   planner 0.22 GiB   0.06x
Then parallel.vocab_parallel on 2 ranks (torchrun, gloo; each rank scores its half of the vocabulary for both ranks'
tokens, so as many logits as one process), the larger rank's peak, VocabParallelLogits unchunked or chunked
(2026-12-07, ~25 s more):
    unchunked     measured 3.00 GiB   planner 3.02 GiB   0.75x   (the loss holds no logits beside its own)
    chunk 1024    measured 1.52 GiB   planner 1.52 GiB   0.38x
    chunk 256     measured 0.43 GiB   planner 0.39 GiB   0.11x
    chunk 128     measured 0.24 GiB   planner 0.20 GiB   0.06x
(the planner 9% / 17% under at chunks 256 / 128: a fixed ~0.04 GiB per rank beside the chunk, not broken down)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def one(vocab: int, seq: int, dim: int, chunk: int) -> dict:
    """In this (fresh) process: the loss forward and backward; peak bytes above the inputs."""
    import torch

    from meshtune.runtime.chunked_loss import ChunkedLogits
    from meshtune.runtime.grads import summed_loss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    head = torch.nn.Linear(dim, vocab, bias=False)
    hidden = torch.randn(1, seq, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (1, seq))
    head.weight.grad = torch.zeros_like(head.weight)  # gradient buffers exist before, as in training
    hidden.grad = torch.zeros_like(hidden)
    small = torch.nn.Linear(dim, 64, bias=False)  # warm up: page in the kernels' code, which RSS counts too
    for c in (0, 8):
        h = torch.randn(1, 16, dim, requires_grad=True)
        summed_loss(ChunkedLogits(h, small, c) if c else small(h), torch.randint(0, 64, (1, 16))).backward()
    base = _status("VmRSS")
    logits = ChunkedLogits(hidden, head, chunk) if chunk else head(hidden)
    summed_loss(logits, labels).backward()
    return {"peak": _status("VmHWM") - base}


def one_rank_vp(vocab: int, seq: int, dim: int, chunk: int) -> dict:
    """Under torchrun (2 gloo ranks): the vocabulary-parallel loss (parallel.vocab_parallel: each rank's head rows
    for both ranks' tokens) forward and backward, full or chunked; this rank's peak bytes above the inputs."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from meshtune.runtime.grads import summed_loss
    from meshtune.runtime.vocab_parallel import VocabParallelLogits, apply_vocab_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(dist.get_rank())
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def split(v: int):
        model = torch.nn.Module()
        model.tok_embeddings, model.output = torch.nn.Embedding(v, dim), torch.nn.Linear(dim, v, bias=False)
        apply_vocab_parallel(model, mesh, None)
        model.output.weight.grad = torch.zeros_like(model.output.weight)  # as in training
        return model.output

    head, small = split(vocab), split(64)
    hidden = torch.randn(1, seq, dim, requires_grad=True)
    hidden.grad = torch.zeros_like(hidden)
    labels = torch.randint(0, vocab, (1, seq))
    for c in (0, 8):  # warm up the kernels and the collectives
        h = torch.randn(1, 16, dim, requires_grad=True)
        summed_loss(VocabParallelLogits(h, small, small.vocab_shard, c), torch.randint(0, 64, (1, 16))).backward()
    dist.barrier()
    base = _status("VmRSS")
    summed_loss(VocabParallelLogits(hidden, head, head.vocab_shard, chunk), labels).backward()
    peak = _status("VmHWM") - base
    dist.destroy_process_group()
    return {"peak": peak}


def measure_vp(vocab: int, seq: int, dim: int, chunk: int) -> int:
    """The larger rank's peak of one_rank_vp, run under torchrun on 2 ranks."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(Path(__file__).resolve()), "--rank-vp", str(vocab), str(seq), str(dim), str(chunk)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    found = re.findall(r"VP: (\{[^}]*\})", out.stdout)  # the two ranks' lines may share one
    assert len(found) == 2, out.stdout
    return max(json.loads(f)["peak"] for f in found)


def measure(vocab: int, seq: int, dim: int, chunk: int) -> int:
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from bench.bench_memory import one; "
            f"print(json.dumps(one({vocab}, {seq}, {dim}, {chunk})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--chunks", type=int, nargs="+", default=[1024, 256, 128])
    ap.add_argument("--rank-vp", type=int, nargs=4, help=argparse.SUPPRESS)  # one rank of measure_vp
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.rank_vp:
        print("VP: " + json.dumps(one_rank_vp(*args.rank_vp)), flush=True)
        return
    from meshtune.runtime.memory_plan import Shapes, logits_bytes

    shapes = Shapes(dim=args.dim, q=args.dim, kv=args.dim, ffn=0, heads=1, vocab=args.vocab)
    full = None
    print(f"vocab {args.vocab}, seq {args.seq}, dim {args.dim}, fp32, batch 1 (peak above the loss's inputs)")
    for chunk in [0, *args.chunks]:
        peak = measure(args.vocab, args.seq, args.dim, chunk)
        plan = logits_bytes(shapes, 1, args.seq, 4, chunk)["peak"]
        full = full or peak
        name = f"chunk {chunk}" if chunk else "full logits"
        print(f"  {name:<12} measured {peak / 2**30:6.2f} GiB   planner {plan / 2**30:6.2f} GiB   "
              f"{peak / full:.2f}x of full")
    print("parallel.vocab_parallel on 2 ranks (each rank's vocabulary half for both ranks' tokens), the larger rank:")
    for chunk in [0, *args.chunks]:
        peak = measure_vp(args.vocab, args.seq, args.dim, chunk)
        plan = logits_bytes(shapes, 1, args.seq, 4, chunk, vocab_shards=2)["peak"]
        name = f"chunk {chunk}" if chunk else "unchunked"
        print(f"  {name:<12} measured {peak / 2**30:6.2f} GiB   planner {plan / 2**30:6.2f} GiB   "
              f"{peak / full:.2f}x of one process's full logits")


if __name__ == "__main__":
    main()
