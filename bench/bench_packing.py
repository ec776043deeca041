"""Packing vs padding, and a data pipeline whose memory does not grow with the dataset.

    python bench/bench_packing.py                         # ~4-6 min on 2 cores
    python bench/bench_packing.py --sizes 100000 --steps 6  # quicker

Targets (issue "Real fine-tuning data"): useful (target, non-pad) tokens per second with `data.packing=true`
>= 2.5x padding, measured in one run; the data pipeline's per-rank RSS for 100k and 1M examples the same within
10%; time to the first batch on a cached dataset against an uncached one.

(1) Throughput: a JSONL of prompt/response pairs whose lengths are log-normal with a median of seq_len / 8
(sigma 1, like instruction data: many short, a long tail; byte tokenizer, so one character is one token), a
decoder of dim 256 x 4 layers, seq_len 512, global batch 8 (4 per rank), fp32, on 2 gloo ranks x 1 thread. One
launch builds both trainers (`data.packing` false and true, same model seed) and steps them in turn (the order
rotating); a step's time is the slower rank's (barrier before, all-reduce MAX after). Useful tokens are the
global count of labels != -100 in the step. Packed rows attend through a (B, 1, T, T) block-causal mask; padded
rows through SDPA's is_causal.

(2) Data memory: for each size, a JSONL of that many examples (same length mix, written once), then two fresh
processes doing one rank's data work: `build_datasets` with a token cache dir (the first tokenizes and packs,
the second maps the cache and reads the saved packing plan), a `StepSampler` for rank 0 of 2, and 200 steps of
micro-batches collated. Each reports its RSS (VmRSS, and RssAnon: memory that is not file pages) after imports
and after the batches, the peak (VmHWM), and the seconds to the first batch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_data(path: Path, n: int, seq_len: int, seed: int = 0) -> None:
    """n prompt/response pairs, total length log-normal with median seq_len / 8, clipped to [8, seq_len]."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    with path.open("w") as f:
        for _ in range(n):
            total = int(min(max(rng.lognormvariate(0.0, 1.0) * seq_len / 8, 8), seq_len))
            p = max(1, total // 3)
            prompt = "".join(rng.choice(letters) for _ in range(p))
            response = "".join(rng.choice(letters) for _ in range(max(1, total - p - 2)))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker_throughput(args) -> None:
    import torch
    import torch.distributed as dist

    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer
    from meshtune.schema import load_config

    torch.set_num_threads(1)
    env = DistEnv.from_environ()
    trainers = {}
    for name, packing in (("padded", False), ("packed", True)):
        cfg = load_config(None, [
            f"run_dir={args.tmp}/{name}", "model.dim=256", "model.n_layers=4", "model.n_heads=8",
            f"model.max_seq_len={args.seq_len}", "data.task=", f"data.train_path={args.data}",
            f"data.seq_len={args.seq_len}", "data.num_eval=8", f"data.packing={str(packing).lower()}",
            f"data.cache_dir={args.tmp}/cache", "train.global_batch_size=8", "train.micro_batch_size=4",
            "train.dtype=fp32", "train.steps=100000", "train.eval_every=0", "checkpoint.resume=never",
            "checkpoint.save_final=false", "metrics.progress=false", "parallel.dp_replicate=2", "parallel.dp_shard=1"])
        trainers[name] = build_trainer(cfg, env)
    names = list(trainers)
    times = {n: [] for n in names}
    useful = {n: [] for n in names}
    for step in range(args.steps + 2):
        order = names if step % 2 == 0 else names[::-1]
        for name in order:
            t = trainers[name]
            micro = t.next_micro_batches()
            dist.barrier()
            t0 = time.perf_counter()
            _, tokens, _ = t.train_step(micro)
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if step >= 2:  # warm-up steps dropped
                times[name].append(dt.item())
                useful[name].append(tokens.item())
    if env.rank == 0:
        rows = {n: {"rows": len(trainers[n].train_ds), "ms_per_step": 1000 * statistics.median(times[n]),
                    "useful_tokens_per_step": statistics.mean(useful[n]),
                    "useful_tokens_per_s": sum(useful[n]) / sum(times[n])} for n in names}
        print("RESULT " + json.dumps(rows), flush=True)
    dist.destroy_process_group()


def worker_rss(args) -> None:
    import torch

    from meshtune.config import DataConfig
    from meshtune.data import StepSampler, build_datasets, build_tokenizer, collate

    torch.set_num_threads(1)
    tok = build_tokenizer("byte")
    base = {"rss": status_kib("VmRSS"), "anon": status_kib("RssAnon")}
    cfg = DataConfig(task="", train_path=args.data, seq_len=args.seq_len, num_eval=8, packing=True)
    t0 = time.perf_counter()
    train, _ = build_datasets(cfg, tok, seed=0, cache_dir=args.cache)
    sampler = StepSampler(len(train), 8, 4, 0, 2, 0, True)
    first = None
    for _ in range(200):
        for idx in sampler.next_step():
            collate([train[i] for i in idx])
        if first is None:
            first = time.perf_counter() - t0
    print("RESULT " + json.dumps({
        "built": bool(getattr(train.store, "built", False)), "examples": len(train.store), "rows": len(train),
        "first_batch_s": first, "rss_mib": status_kib("VmRSS") / 1024, "anon_mib": status_kib("RssAnon") / 1024,
        "rss_delta_mib": (status_kib("VmRSS") - base["rss"]) / 1024,
        "anon_delta_mib": (status_kib("RssAnon") - base["anon"]) / 1024, "peak_mib": status_kib("VmHWM") / 1024}),
        flush=True)


def result(out: str) -> dict:
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(out[-3000:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=("throughput", "rss"))
    ap.add_argument("--data")
    ap.add_argument("--cache")
    ap.add_argument("--tmp")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--examples", type=int, default=4000, help="examples for the throughput part")
    ap.add_argument("--steps", type=int, default=12, help="measured steps per variant")
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--no-throughput", action="store_true")
    args = ap.parse_args()
    if args.worker == "throughput":
        return worker_throughput(args)
    if args.worker == "rss":
        return worker_rss(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    me = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_throughput:
            data = Path(tmp) / "sft.jsonl"
            write_data(data, args.examples, args.seq_len)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                   me, "--worker", "throughput", "--data", str(data), "--tmp", tmp, "--seq-len", str(args.seq_len),
                   "--steps", str(args.steps)]
            r = result(subprocess.run(cmd, env=env, capture_output=True, text=True).stdout)
            pad, pk = r["padded"], r["packed"]
            print(f"throughput: seq_len {args.seq_len}, {args.examples} examples (median length {args.seq_len // 8}),"
                  " 2 ranks, global batch 8, fp32")
            print(f"{'variant':<8} {'rows':>6} {'ms/step':>9} {'useful tok/step':>16} {'useful tok/s':>13}")
            for name, row in r.items():
                print(f"{name:<8} {row['rows']:>6} {row['ms_per_step']:>9.1f} {row['useful_tokens_per_step']:>16.0f} "
                      f"{row['useful_tokens_per_s']:>13.0f}")
            print(f"packed / padded: useful tokens/s {pk['useful_tokens_per_s'] / pad['useful_tokens_per_s']:.2f}x "
                  f"(target >= 2.5), step time {pk['ms_per_step'] / pad['ms_per_step']:.2f}x, rows "
                  f"{pk['rows'] / pad['rows']:.3f}x")
        rows = []
        for n in args.sizes:
            data = Path(tmp) / f"data-{n}.jsonl"
            t0 = time.perf_counter()
            write_data(data, n, args.seq_len, seed=1)
            wrote = time.perf_counter() - t0
            cache = Path(tmp) / f"cache-{n}"
            for run in ("uncached", "cached"):
                cmd = [sys.executable, me, "--worker", "rss", "--data", str(data), "--cache", str(cache),
                       "--seq-len", str(args.seq_len)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                rows.append({"examples": n, "run": run, "file_mib": data.stat().st_size / 2**20, "wrote_s": wrote,
                             **result(out.stdout + out.stderr)})
        print(f"\ndata pipeline, one rank's work (packing on, seq_len {args.seq_len}, 200 steps of batches):")
        print(f"{'examples':>9} {'run':>9} {'file MiB':>9} {'rows':>8} {'first batch s':>14} {'RSS MiB':>8} "
              f"{'anon MiB':>9} {'RSS delta':>10} {'anon delta':>11} {'peak MiB':>9}")
        for r in rows:
            print(f"{r['examples']:>9} {r['run']:>9} {r['file_mib']:>9.1f} {r['rows']:>8} {r['first_batch_s']:>14.2f} "
                  f"{r['rss_mib']:>8.0f} {r['anon_mib']:>9.0f} {r['rss_delta_mib']:>10.1f} "
                  f"{r['anon_delta_mib']:>11.1f} {r['peak_mib']:>9.0f}")
        cached = {r["examples"]: r for r in rows if r["run"] == "cached"}
        if len(cached) >= 2:
            lo, hi = cached[min(cached)], cached[max(cached)]
            print(f"cached, {max(cached)} vs {min(cached)} examples: RSS {hi['rss_mib'] / lo['rss_mib']:.3f}x "
                  f"(target within 1.10), anon {hi['anon_mib'] / lo['anon_mib']:.3f}x")
        for n in args.sizes:
            un = next(r for r in rows if r["examples"] == n and r["run"] == "uncached")
            print(f"{n} examples: first batch cached {cached[n]['first_batch_s']:.2f} s vs uncached "
                  f"{un['first_batch_s']:.2f} s ({un['first_batch_s'] / cached[n]['first_batch_s']:.0f}x)")


if __name__ == "__main__":
    main()
