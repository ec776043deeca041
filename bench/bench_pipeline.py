"""Pipeline bubble and bytes per collective: meshtune's GPipe/1F1B against stall-free work, and the bytes each
parallel layout sends per step against its analytical minimum, on 2 CPU gloo ranks.

    python bench/bench_pipeline.py                  # 3.5-4.5 min on 2 shared cores: one launch of 2 ranks
    python bench/bench_pipeline.py --steps 3 --micro-counts 2 4 --no-bytes    # quicker

Targets (issue 3, "the pipeline bubble"):
  * for p=2 stages and m = 2, 4, 8 micro-batches: measured bubble of GPipe and 1F1B next to the theory
    (p-1)/(m+p-1) (Huang et al. 2019, GPipe; Narayanan et al. 2021, 1F1B / PipeDream-Flush);
  * bytes sent per step per rank by each collective, next to the layout's analytical minimum:
    measured/minimum <= 1.05.

Bubble. A step is `Trainer.forward_backward` (the schedule over m micro-batches; optimizer excluded), timed
after a barrier on both ranks; its time is the slower rank's. "The same work without stalls" is each rank's
busy time: its own stage module running forward+backward of the same m micro-batches back to back with no
communication (the first stage on the real tokens with a fixed random output gradient, the last stage on a
fixed random hidden state with the real loss), measured next to the step (before it on even steps, after it
on odd ones) with the other rank doing the same, so both see the same core contention. Measured bubble =
1 - mean over ranks(busy) / step: the share of rank-time not spent computing, which is what (p-1)/(m+p-1)
predicts for equal stages and free communication. Pipeline and busy runs of all variants are interleaved
step by step; the bubble is the median of the per-step ratios. "max/mean" is the stage imbalance: with
unequal stages part of the bubble is the faster stage waiting, which no schedule removes; "theory+imbal" is
the bubble a perfect schedule with free communication would show for the measured stage times
t_r = busy_r / m: 1 - m mean(t) / ((m-1) max(t) + t_0 + t_1).

Bytes. Counted from what actually ran: a torch.profiler trace (record_shapes) of --byte-steps training
steps per layout (train_step + the loss-report `mean_loss`), summing every `c10d::*` op (the dispatcher ops
that DDP's C++ reducer, FSDP2, DTensor's functional collectives and pipelining's P2P ops all go through) and
matching each to the `gloo:*` op the backend ran. "sent" is the per-rank bytes a bandwidth-optimal
algorithm sends for the call (all-reduce of B: 2(N-1)/N B; all-gather: (N-1)/N of the output;
reduce-scatter: (N-1)/N of the input; send: B; recv: 0), N = 2 for every group here. "gloo" is the same
for the op gloo ran (its reduce-scatter is a full all-reduce), and "wire" is the TCP bytes_sent of the
rank's sockets over those steps (`ss -tinp`; all sockets, so it includes the store and barriers).
Calls of < 1024 elements are "control": the token-count normaliser and loss-report scalars, the grad norm's
per-parameter partial sums, DDP's bookkeeping broadcasts.
Minima per rank and step (P parameters, m micro-batches per rank, A = micro x seq x dim x 4 bytes):
  ddp    all-reduce 2(N-1)/N 4P (one per step, accumulation under no_sync)
  fsdp2  all-gather (N-1)/N 4 m (P + P_resharded) (each micro-batch gathers every parameter for forward,
         and again for backward those resharded after forward: every block but the last); reduce-scatter
         (N-1)/N 4P (once, on the last micro-batch)
  tp     all-reduce 2(N-1)/N A m (4L + 2) (Megatron: one per sub-layer forward and one backward, plus the
         vocabulary-split embedding forward and the head's input backward); all-gather of logits (the plan's
         output_layouts=Replicate) (N-1)/N m micro x seq x V x 4
  pp     send m A (activations forward on stage 0, their gradients backward on stage 1)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEDULES = ("GPipe", "1F1B")
LAYOUTS = {  # name -> parallel overrides (2 ranks each); pp layouts also take --bytes-micro-count
    "ddp": ["parallel.dp_replicate=2", "parallel.dp_shard=1"],
    "fsdp2": ["parallel.dp_replicate=1", "parallel.dp_shard=2"],
    "tp": ["parallel.dp_replicate=1", "parallel.dp_shard=1", "parallel.tp=2"],
    "pp_gpipe": ["parallel.dp_replicate=1", "parallel.dp_shard=1", "parallel.pp=2", "parallel.pp_schedule=GPipe"],
    "pp_1f1b": ["parallel.dp_replicate=1", "parallel.dp_shard=1", "parallel.pp=2", "parallel.pp_schedule=1F1B"],
}
CONTROL_NUMEL = 1024  # smaller calls are bookkeeping: token counts, loss reports, per-parameter norm partials
# c10d dispatcher op -> (collective, index of the tensor(s) gloo receives among its inputs)
C10D_OPS = {"c10d::allreduce_": ("all_reduce", 0), "c10d::allreduce_coalesced_": ("all_reduce", 0),
            "c10d::_allgather_base_": ("all_gather", 1), "c10d::allgather_into_tensor_coalesced_": ("all_gather", 1),
            "c10d::_reduce_scatter_base_": ("reduce_scatter", 1),
            "c10d::reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1), "c10d::send": ("send", 0),
            "c10d::recv_": ("recv", 0), "c10d::broadcast_": ("broadcast", 0)}
DTYPE_BYTES = {"float": 4, "double": 8, "long int": 8, "int": 4, "c10::BFloat16": 2, "c10::Half": 2,
               "bool": 1, "unsigned char": 1}


def config_overrides(args, run_dir: str, parallel: list[str], micro_count: int) -> list[str]:
    dp = 2 if "parallel.dp_replicate=2" in parallel or "parallel.dp_shard=2" in parallel else 1
    return [
        f"run_dir={run_dir}", f"model.dim={args.dim}", f"model.n_layers={args.layers}", f"model.n_heads={args.heads}",
        f"model.max_seq_len={args.seq_len}", "data.task=reverse", f"data.seq_len={args.seq_len}",
        "data.num_train=512", "data.num_eval=8", f"train.global_batch_size={args.micro_batch * micro_count * dp}",
        f"train.micro_batch_size={args.micro_batch}", "train.dtype=fp32", "train.steps=100000",
        "train.eval_every=0", "checkpoint.resume=never", "metrics.progress=false", *parallel,
    ]


def build(args, env, tmp: str, name: str, parallel: list[str], micro_count: int):
    from meshtune.runtime.run import build_trainer
    from meshtune.schema import load_config

    cfg = load_config(None, config_overrides(args, f"{tmp}/{name}", parallel, micro_count))
    trainer = build_trainer(cfg, env)
    return trainer, [trainer.next_micro_batches() for _ in range(4)]


# ---------------------------------------------------------------------------------------------------------
# The bubble


def local_work(trainer, batches: list[list[dict]]):
    """This rank's stage, forward+backward of each micro-batch back to back, no communication."""
    import torch

    from meshtune.runtime.grads import summed_loss

    pipe = trainer.pipeline
    part = pipe.parts[0]
    torch.manual_seed(0)
    fixed = []
    for mb in batches[0]:
        shape = (*mb["input_ids"].shape, pipe.dim)  # (B, T, dim)
        x = mb["input_ids"] if pipe.is_first else torch.randn(shape, requires_grad=True)
        fixed.append((x, None if pipe.is_last else torch.randn(shape), mb["labels"]))

    def run():
        for x, grad, labels in fixed:
            out = part(x)
            if pipe.is_last:
                (summed_loss(out, labels) * 1e-3).backward()
            else:
                out.backward(grad)
    return run


def bubble(args, env, tmp: str) -> dict:
    import torch
    import torch.distributed as dist

    variants = {}
    for sched in SCHEDULES:
        for m in args.micro_counts:
            trainer, batches = build(args, env, tmp, f"{sched}_{m}", LAYOUTS["pp_" + sched.lower()], m)
            variants[f"{sched} m={m}"] = (trainer, batches, local_work(trainer, batches))
    names = list(variants)
    step_t = {n: [] for n in names}
    busy_t = {n: [] for n in names}
    for i in range(args.warmup + args.steps):
        for n in names[i % len(names):] + names[: i % len(names)]:
            trainer, batches, local = variants[n]
            runs = [(functools.partial(trainer.forward_backward, batches[i % len(batches)]), step_t[n]),
                    (local, busy_t[n])]
            for fn, out in runs[:: 1 if i % 2 else -1]:  # alternate which of the pair runs first
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                if i >= args.warmup:
                    out.append(time.perf_counter() - t0)
                trainer.optimizer.zero_grad(set_to_none=True)
    result = {}
    for n in names:
        steps = torch.tensor(step_t[n], dtype=torch.float64)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)  # a step takes as long as its slower rank
        busy = [torch.zeros(len(busy_t[n]), dtype=torch.float64) for _ in range(env.world_size)]
        dist.all_gather(busy, torch.tensor(busy_t[n], dtype=torch.float64))
        result[n] = {"step": steps.tolist(), "busy": [b.tolist() for b in busy],
                     "layers": len(variants[n][0].model.layers)}
    return result


# ---------------------------------------------------------------------------------------------------------
# Bytes per collective


def tcp_bytes_sent() -> int | None:
    """bytes_sent summed over this process's TCP sockets (`ss -tinp`), or None where ss is missing."""
    try:
        out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return None
    tag, total = f"pid={os.getpid()},", 0
    for line, info in zip(out, out[1:], strict=False):
        if tag in line and (hit := re.search(r"bytes_sent:(\d+)", info)):
            total += int(hit.group(1))
    return total


def sent_bytes(kind: str, nbytes: float, n: int = 2) -> float:
    """Per-rank bytes a bandwidth-optimal algorithm sends; `nbytes` is the tensor gloo receives (the input).
    A broadcast counts as the root's bytes (with N = 2 the root sends B, the other rank nothing)."""
    return {"all_reduce": 2 * (n - 1) / n * nbytes, "all_gather": (n - 1) * nbytes,
            "reduce_scatter": (n - 1) / n * nbytes, "send": nbytes, "broadcast": nbytes}.get(kind, 0.0)


def count_collectives(events, steps: int) -> dict:
    """{collective: {calls, sent, gloo}} per step from profiler events; matches c10d ops to gloo ops."""
    gloo = sorted((e for e in events if e.name.startswith("gloo:")), key=lambda e: e.time_range.start)
    used = [False] * len(gloo)
    table: dict[str, dict] = {}
    for e in sorted((e for e in events if e.name.startswith("c10d::")), key=lambda e: e.time_range.start):
        if e.name not in C10D_OPS:
            if e.name not in ("c10d::barrier",):
                table.setdefault(e.name, {"calls": 0, "sent": 0.0, "gloo": 0.0, "unmatched": 0})["calls"] += 1
            continue
        kind, idx = C10D_OPS[e.name]
        shapes = e.structured_input_shapes[idx]
        shapes = shapes if shapes and isinstance(shapes[0], list) else [shapes]  # a TensorList or one tensor
        numel = sum(math.prod(s) for s in shapes)
        ran, dtype = None, "float"
        for j, g in enumerate(gloo):  # the backend's op: same shapes, started after the request
            if not used[j] and g.time_range.start >= e.time_range.start - 1 and g.input_shapes == shapes:
                used[j], ran, dtype = True, g.name.removeprefix("gloo:"), g.input_dtypes[0]
                break
        nbytes = numel * DTYPE_BYTES.get(dtype, 4)
        row = table.setdefault("control" if numel < CONTROL_NUMEL else kind,
                               {"calls": 0, "sent": 0.0, "gloo": 0.0, "unmatched": 0, "ran": set()})
        row["calls"] += 1
        row["sent"] += sent_bytes(kind, nbytes)
        row["gloo"] += sent_bytes(ran or kind, nbytes)
        row["unmatched"] += ran is None
        row.setdefault("ran", set()).add(ran or "?")
    for row in table.values():
        row["ran"] = sorted(row.get("ran", ()))
        for k in ("calls", "sent", "gloo", "unmatched"):
            row[k] /= steps
    return table


def minimum_bytes(name: str, trainer, args, n: int = 2) -> dict[str, float]:
    """The analytical per-rank, per-step minimum of each collective for this layout (module docstring)."""
    from meshtune.runtime.data_parallel import unwrap

    model = unwrap(trainer.model)
    numel = lambda mod: sum(p.numel() for p in mod.parameters())  # DTensor: the global size
    m, L = trainer.sampler.accum_steps, args.layers
    act = args.micro_batch * args.seq_len * args.dim * 4
    if name == "ddp":
        return {"all_reduce": 2 * (n - 1) / n * 4 * numel(model)}
    if name == "fsdp2":
        p = numel(model)
        resharded = sum(numel(b) for b in list(model.layers.values())[:-1])
        return {"all_gather": (n - 1) / n * 4 * m * (p + resharded), "reduce_scatter": (n - 1) / n * 4 * p}
    if name == "tp":
        logits = args.micro_batch * args.seq_len * model.vocab_size * 4
        return {"all_reduce": 2 * (n - 1) / n * act * m * (4 * L + 2), "all_gather": (n - 1) / n * logits * m}
    return {"send": m * act}


def collective_bytes(args, env, tmp: str) -> dict:
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    result = {}
    for name, parallel in LAYOUTS.items():
        m = args.bytes_micro_count if name.startswith("pp") else 2
        trainer, batches = build(args, env, tmp, f"bytes_{name}", parallel, m)
        train_step(trainer, batches[0])  # warm-up: pipelining infers shapes, FSDP2 lazily initialises
        dist.barrier()
        wire0 = tcp_bytes_sent()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for i in range(args.byte_steps):
                train_step(trainer, batches[(i + 1) % len(batches)])
        dist.barrier()
        wire1 = tcp_bytes_sent()
        table = count_collectives(prof.events(), args.byte_steps)
        wire = None if wire0 is None else (wire1 - wire0) / args.byte_steps
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, {"table": table, "wire": wire})
        result[name] = {"ranks": gathered, "minimum": minimum_bytes(name, trainer, args), "m": m}
    return result


def train_step(trainer, micro_batches: list[dict]) -> None:
    loss, tokens, _ = trainer.train_step(micro_batches)
    trainer.mean_loss(loss, tokens)  # the loss-report all-reduce, as fit() does on log steps


# ---------------------------------------------------------------------------------------------------------


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from meshtune.runtime.env import DistEnv

    torch.set_num_threads(1)
    env = DistEnv.from_environ(use_cuda=False)
    env.init_process_group()
    tmp = str(Path(args.out).parent / "runs")
    result = {"world": env.world_size}
    if args.bubble:
        result["bubble"] = bubble(args, env, tmp)
    if args.bytes:
        result["bytes"] = collective_bytes(args, env, tmp)
    if env.rank == 0:
        Path(args.out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def report_bubble(args, res: dict) -> None:
    p = 2
    print(f"\npipeline bubble: p={p} stages ({args.layers} layers, dim {args.dim}, {args.heads} heads), micro-batch "
          f"{args.micro_batch} x seq {args.seq_len}, fp32, 2 gloo ranks x 1 thread; {args.steps} steps per variant "
          f"(+{args.warmup} warmup), interleaved; step = forward_backward, slower rank; busy = the rank's stage "
          "fwd+bwd of the same m micro-batches with no communication; medians")
    head = (f"{'variant':<12}{'step ms':>9}{'busy r0/r1 ms':>16}{'max/mean':>10}{'per-mb ms':>11}{'bubble':>8}"
            f"{'p25':>7}{'p75':>7}{'theory':>8}{'meas-theory':>13}{'theory+imbal':>14}")
    print(head)
    print("-" * len(head))
    for n, r in res.items():
        m = int(n.split("m=")[1])
        step = r["step"]
        busy = list(zip(*r["busy"], strict=True))  # per step: (r0, r1)
        ratios = [1 - statistics.mean(b) / s for b, s in zip(busy, step, strict=True)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        b0, b1 = (statistics.median(x) for x in r["busy"])
        theory = (p - 1) / (m + p - 1)
        # unequal stages t_r = busy_r / m: the slower stage paces m-1 micro-batches, fill and drain take both
        imbal = 1 - (b0 + b1) / 2 / ((m - 1) * max(b0, b1) / m + (b0 + b1) / m)
        print(f"{n:<12}{statistics.median(step) * 1e3:>9.0f}{f'{b0 * 1e3:.0f}/{b1 * 1e3:.0f}':>16}"
              f"{max(b0, b1) / statistics.mean((b0, b1)):>10.3f}{(b0 + b1) / 2 / m * 1e3:>11.1f}"
              f"{q[1]:>8.3f}{q[0]:>7.3f}{q[2]:>7.3f}{theory:>8.3f}{q[1] - theory:>+13.3f}{imbal:>14.3f}")


def report_bytes(res: dict) -> None:
    mb = 2**20
    print("\nbytes sent per rank per step (MiB; the larger of the 2 ranks); sent = bandwidth-optimal bytes for "
          "the calls that ran, gloo = the same for the op gloo ran, wire = TCP bytes_sent of the rank's sockets")
    head = (f"{'layout':<10}{'collective':<16}{'calls':>7}{'sent':>10}{'minimum':>10}{'sent/min':>10}{'gloo':>10}"
            f"{'gloo/min':>10}{'  gloo ran':<22}")
    print(head)
    print("-" * len(head))
    for name, r in res.items():
        kinds = sorted({k for rank in r["ranks"] for k in rank["table"]}, key=lambda k: (k == "control", k))
        tot_gloo = max(sum(v["gloo"] for v in rank["table"].values()) for rank in r["ranks"])
        for k in kinds:
            rows = [rank["table"].get(k, {"calls": 0, "sent": 0, "gloo": 0, "ran": []}) for rank in r["ranks"]]
            sent, gl = max(x["sent"] for x in rows), max(x["gloo"] for x in rows)
            calls = max(x["calls"] for x in rows)
            mn = r["minimum"].get(k)
            ratio = lambda v, mn=mn: f"{v / mn:>10.3f}" if mn else f"{'-':>10}"
            ran = ",".join(sorted({a for x in rows for a in x["ran"]}))
            unmatched = max(x.get("unmatched", 0) for x in rows)
            note = f" ({unmatched:g} unmatched)" if unmatched else ""
            print(f"{name:<10}{k:<16}{calls:>7g}{sent / mb:>10.3f}{(mn or 0) / mb:>10.3f}{ratio(sent)}"
                  f"{gl / mb:>10.3f}{ratio(gl)}  {ran + note:<20}")
        wire = [rank["wire"] for rank in r["ranks"]]
        if None not in wire:
            print(f"{name:<10}{'(wire, all)':<16}{'':>7}{max(wire) / mb:>10.3f}{'':>20}{tot_gloo / mb:>10.3f}"
                  f"  wire/gloo {max(wire) / tot_gloo:.3f}  (r0/r1 {wire[0] / mb:.3f}/{wire[1] / mb:.3f})")
    print("target: sent/min <= 1.05 per collective")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4, help="decoder blocks (split evenly over the 2 stages)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--micro-counts", type=int, nargs="+", default=[2, 4, 8], help="m for the bubble table")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=16, help="measured steps per bubble variant")
    p.add_argument("--byte-steps", type=int, default=2, help="profiled steps per layout for the byte counts")
    p.add_argument("--bytes-micro-count", type=int, default=4, help="m for the pp layouts' byte counts")
    p.add_argument("--no-bubble", dest="bubble", action="store_false")
    p.add_argument("--no-bytes", dest="bytes", action="store_false")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/result.json"
        forwarded = [a for a in sys.argv[1:]]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
               *forwarded, "--worker", "--out", out]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        res = json.loads(Path(out).read_text())
    if "bubble" in res:
        report_bubble(args, res["bubble"])
    if "bytes" in res:
        report_bytes(res["bytes"])


if __name__ == "__main__":
    main()
