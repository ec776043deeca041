"""Data-parallel overhead: meshtune's DDP and FSDP2 against a hand-written PyTorch loop, on 2 CPU ranks.

    python bench/bench_ddp.py                      # ~4-5 min on 2 cores: timing launch + one launch per variant
    python bench/bench_ddp.py --steps 8 --no-rss     # quicker, no peak-memory column

Targets (issue "DDP/FSDP2 throughput"):
  * meshtune DDP / plain DDP median step time <= 1.02 (same model, same batches, one run);
  * meshtune FSDP2 (dp_shard=2) <= 1.15x plain DDP's step time, at 1/N of the per-rank model-state bytes
    (parameters + gradients + AdamW state; ideal 0.5 on 2 ranks). Reference measured earlier on this
    machine kind: plain DDP 684 ms/step, raw per-block FSDP2 1.25x that.

What runs: a ~10.8M-parameter meshtune Llama decoder (dim 384, 6 layers, 8 heads, byte vocabulary 264),
seq_len 128, global batch 8 (4 per rank), fp32, one thread per rank. All variants live in ONE launch of
2 gloo ranks and are measured step by step in turn (one step of each, the order rotating), so machine
noise hits them alike; each step starts after a barrier and its time is the slower rank's. train.deterministic
keeps meshtune's default (true); torch makes it process-wide, so every variant, plain ones included, runs
under it (--no-deterministic turns it off for all). Variants:
  plain_ddp        build_model + DistributedDataParallel + AdamW + mean cross-entropy, a hand-written loop
  meshtune_ddp     build_trainer(parallel.dp_replicate=2, dp_shard=1); Trainer.train_step
  plain_fsdp2      build_model + fully_shard per block and root (the raw FSDP2 reference) + the same loop
  meshtune_fsdp2   build_trainer(parallel.dp_shard=2)
  meshtune_fsdp2_noreshard   the same with parallel.reshard_after_forward=false
  plain_fsdp2_root (only with --variants)   raw FSDP2 with a single fully_shard on the root
  plain_ddp_clip (only with --variants)     plain_ddp plus clip_grad_norm_(optim.grad_clip), as meshtune does
`--profile` instead prints rank 0's self CPU time per op and step for each of --variants.
Every variant gets the same pre-collated micro-batches (sampler + collate are outside the timed region).
Model-state bytes are summed over rank-local tensors (DTensor.to_local()); gradients are counted as the
local parameter bytes (they have the parameter's local shape; train_step frees them with set_to_none).
Peak RSS (ru_maxrss) is process-wide and never decreases, so each variant gets its own 2-rank launch for
that column; "delta" is the peak minus the peak reached before the model was built.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("plain_ddp", "meshtune_ddp", "plain_fsdp2", "meshtune_fsdp2", "meshtune_fsdp2_noreshard")
# on request (--variants): raw FSDP2 with one group for the whole model; plain DDP that also clips the grad norm
EXTRA_VARIANTS = ("plain_fsdp2_root", "plain_ddp_clip")


def config_overrides(args, run_dir: str, variant: str) -> list[str]:
    shard = "fsdp2" in variant
    return [
        f"run_dir={run_dir}", f"model.dim={args.dim}", f"model.n_layers={args.layers}", f"model.n_heads={args.heads}",
        f"model.max_seq_len={args.seq_len}", "data.task=reverse", f"data.seq_len={args.seq_len}",
        "data.num_train=1024", "data.num_eval=8", f"train.global_batch_size={args.global_batch}",
        f"train.micro_batch_size={args.micro_batch}", "train.dtype=fp32", "train.steps=100000",
        "train.eval_every=0", f"train.deterministic={str(args.deterministic).lower()}", "checkpoint.resume=never",
        "metrics.progress=false", f"parallel.dp_replicate={1 if shard else args.nproc}",
        f"parallel.dp_shard={args.nproc if shard else 1}",
        f"parallel.reshard_after_forward={str(not variant.endswith('noreshard')).lower()}",
    ]


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def local_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def model_state_bytes(model, optimizer) -> dict[str, int]:
    """This rank's bytes of parameters, gradients (= local parameter bytes) and optimizer state."""
    params = sum(local_bytes(p) for p in model.parameters())
    grads = sum(local_bytes(p) for p in model.parameters() if p.requires_grad)
    optim = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if hasattr(v, "numel"))
    return {"params": params, "grads": grads, "optim": optim, "total": params + grads + optim}


def build_variant(name: str, args, env, vocab: int, tmp: str):
    """Returns (step function taking a list of micro-batches, model, optimizer)."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from meshtune.models import build_model
    from meshtune.runtime.run import build_trainer
    from meshtune.schema import load_config

    cfg = load_config(None, config_overrides(args, f"{tmp}/{name}", name))
    if name.startswith("meshtune"):
        trainer = build_trainer(cfg, env)
        return trainer.train_step, trainer.model, trainer.optimizer

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, vocab, device="cpu")
    ddp = name.startswith("plain_ddp")
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        mesh = init_device_mesh("cpu", (env.world_size,))
        for block in model.layers.values() if name == "plain_fsdp2" else ():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay)

    def step(micro_batches):
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            if name.startswith("plain_fsdp2"):
                model.set_requires_gradient_sync(last)
            ctx = model.no_sync() if ddp and not last else torch.enable_grad()
            with ctx:
                logits = model(mb["input_ids"])  # (B, T, V)
                loss = F.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), ignore_index=-100)
                (loss / len(micro_batches)).backward()
        if name == "plain_ddp_clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model, optimizer


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from meshtune.data import StepSampler, build_datasets, build_tokenizer, collate
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.preflight import vocab_size
    from meshtune.schema import load_config

    torch.set_num_threads(1)
    env = DistEnv.from_environ(use_cuda=False)
    env.init_process_group()
    tmp = str(Path(args.out).parent / f"runs_{args.worker}")  # run_dirs; the launcher deletes them
    cfg = load_config(None, config_overrides(args, tmp, "plain_ddp"))
    tok = build_tokenizer(cfg.data.tokenizer)
    train_ds, _ = build_datasets(cfg.data, tok, cfg.train.seed)
    vocab = vocab_size(cfg, tok)
    sampler = StepSampler(len(train_ds), cfg.train.global_batch_size, cfg.train.micro_batch_size, env.rank,
                          env.world_size, cfg.train.seed)
    batches = [[collate([train_ds[i] for i in idx]) for idx in sampler.next_step()] for _ in range(16)]
    names = [args.variant] if args.worker == "rss" else args.variants
    rss_base = max_rss_mb()
    runners = {n: build_variant(n, args, env, vocab, tmp) for n in names}
    if args.worker == "profile":
        profile(args, env, runners, batches)
        return

    # one step of each variant in turn (the order rotating every step), so load changes hit all of them
    times = {n: [] for n in names}
    cpu_times = {n: [] for n in names}  # CPU seconds of this process (all threads): less load-sensitive
    for i in range(args.warmup + args.steps):
        for n in names[i % len(names):] + names[: i % len(names)]:
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            runners[n][0](batches[i % len(batches)])
            if i >= args.warmup:
                times[n].append(time.perf_counter() - t0)
                cpu_times[n].append(time.process_time() - c0)

    result = {"world": env.world_size, "rss_base_mb": [], "rss_peak_mb": [], "variants": {}}
    rss = torch.tensor([rss_base, max_rss_mb()], dtype=torch.float64)
    gathered = [torch.zeros_like(rss) for _ in range(env.world_size)]
    dist.all_gather(gathered, rss)
    result["rss_base_mb"] = [g[0].item() for g in gathered]
    result["rss_peak_mb"] = [g[1].item() for g in gathered]
    for n in names:
        t = torch.tensor([times[n], cpu_times[n]], dtype=torch.float64)  # (2, steps)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step takes as long as its slowest rank
        _, model, optimizer = runners[n]
        state = model_state_bytes(model, optimizer)
        st = torch.tensor([state["total"]], dtype=torch.float64)
        dist.all_reduce(st, op=dist.ReduceOp.MAX)
        module = model.module if hasattr(model, "module") else model
        result["variants"][n] = {"times": t[0].tolist(), "cpu_times": t[1].tolist(), "state": state,
                                 "state_max_rank": st.item(), "params": module.num_params()}
    if env.rank == 0:
        Path(args.out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def profile(args, env, runners: dict, batches: list) -> None:
    """Self CPU time per op and step on rank 0, for each variant: where the step time goes."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ops = {}
    for n, (step, _, _) in runners.items():
        for i in range(args.warmup):
            step(batches[i % len(batches)])
        dist.barrier()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(args.steps):
                step(batches[i % len(batches)])
        ops[n] = {e.key: (e.self_cpu_time_total / 1e3 / args.steps, e.count // args.steps)
                  for e in prof.key_averages()}
    if env.rank == 0:
        Path(args.out).write_text(json.dumps(ops))
    dist.barrier()
    dist.destroy_process_group()


def report_profile(ops: dict, top: int = 25) -> None:
    """Ops by self CPU ms per step, per variant, sorted by the largest difference from the first variant."""
    names = list(ops)
    keys = set().union(*ops.values())
    base = names[0]
    diff = lambda k: max(abs(ops[n].get(k, (0, 0))[0] - ops[base].get(k, (0, 0))[0]) for n in names)
    print(f"\nprofile (rank 0, self CPU ms per step, calls per step), top {top} by difference from {base}:")
    print(f"{'op':<48}" + "".join(f"{n[:22]:>24}" for n in names))
    for k in sorted(keys, key=diff, reverse=True)[:top]:
        cells = [ops[n].get(k, (0.0, 0)) for n in names]
        print(f"{k[:47]:<48}" + "".join(f"{ms:>16.1f} ({c:>4})" for ms, c in cells))
    print(f"{'total':<48}" + "".join(f"{sum(v[0] for v in ops[n].values()):>24.1f}" for n in names))


def launch(args, extra: list[str], out: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
           __file__, *forwarded(args), *extra, "--out", out]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(Path(out).read_text())


def forwarded(args) -> list[str]:
    flags = ["--ranks", args.nproc, "--dim", args.dim, "--layers", args.layers, "--heads", args.heads,
             "--seq-len", args.seq_len, "--global-batch", args.global_batch, "--micro-batch", args.micro_batch,
             "--warmup", args.warmup, "--steps", args.steps,
             "--variants", *args.variants]
    return [str(f) for f in flags] + ([] if args.deterministic else ["--no-deterministic"])


def report(args, timing: dict, rss: dict) -> None:
    v = timing["variants"]
    tokens = args.global_batch * args.seq_len
    med = {n: statistics.median(r["times"]) for n, r in v.items()}
    cpu = {n: statistics.median(r["cpu_times"]) for n, r in v.items()}
    base = "plain_ddp" if "plain_ddp" in v else next(iter(v))
    unsharded = v[base]["state"]["total"]
    print(f"\nmodel: {v[base]['params'] / 1e6:.2f}M parameters (dim {args.dim}, {args.layers} layers, "
          f"{args.heads} heads), seq {args.seq_len}, global batch {args.global_batch} ({args.micro_batch}/micro), "
          f"fp32, {timing['world']} gloo ranks x 1 thread, deterministic={args.deterministic}")
    print(f"timing: {args.steps} steps per variant (+{args.warmup} warmup), interleaved step by step; "
          f"step time = slower rank's; medians; cpu ms = process CPU time per step (all threads)\n")
    head = (f"{'variant':<26}{'ms/step':>9}{'x plain':>9}{'cpu ms':>8}{'x plain':>9}{'tok/s':>8}"
            f"{'state MB/rank':>15}{'x unshard':>11}"
            f"{'peak RSS MB r0/r1':>20}{'delta r0/r1':>14}")
    print(head)
    print("-" * len(head))
    for n in v:
        s = v[n]["state"]["total"]
        row = (f"{n:<26}{med[n] * 1e3:>9.1f}{med[n] / med[base]:>9.3f}{cpu[n] * 1e3:>8.0f}{cpu[n] / cpu[base]:>9.3f}"
               f"{tokens / med[n]:>8.0f}"
               f"{s / 2**20:>15.1f}{s / unsharded:>11.3f}")
        if n in rss:
            peak, basev = rss[n]["rss_peak_mb"], rss[n]["rss_base_mb"]
            row += f"{'/'.join(f'{p:.0f}' for p in peak):>20}"
            row += f"{'/'.join(f'{p - b:.0f}' for p, b in zip(peak, basev, strict=True)):>14}"
        print(row)
    print(f"\npaired ratio to {base} (step i of a variant / step i of {base}, measured back to back):")
    print(f"  {'variant':<26}{'median':>8}{'p25':>8}{'p75':>8}")
    for n in v:
        if n != base:
            q = statistics.quantiles([a / b for a, b in zip(v[n]["times"], v[base]["times"], strict=True)], n=4)
            print(f"  {n:<26}{q[1]:>8.3f}{q[0]:>8.3f}{q[2]:>8.3f}")
    print("\ntargets:")
    checks = [("meshtune_ddp", 1.02, "meshtune DDP / plain DDP"),
              ("meshtune_fsdp2", 1.15, "meshtune FSDP2 / plain DDP"),
              ("meshtune_fsdp2_noreshard", 1.15, "meshtune FSDP2 no-reshard / plain DDP"),
              ("plain_fsdp2", None, "raw FSDP2 / plain DDP (reference 1.25)")]
    for n, target, label in checks:
        if n in v:
            ratio = med[n] / med[base]
            verdict = "" if target is None else f"  (target <= {target}: {'met' if ratio <= target else 'NOT met'})"
            print(f"  {label:<40} {ratio:.3f}{verdict}")
    if "meshtune_fsdp2" in v:
        r = v["meshtune_fsdp2"]["state"]["total"] / unsharded
        print(f"  {'meshtune FSDP2 state bytes sharded/unsharded':<40} {r:.3f}  (ideal {1 / timing['world']:.3f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", dest="nproc", type=int, default=2)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="measured steps per variant")
    p.add_argument("--rss-steps", type=int, default=2, help="steps (after warmup) in each peak-RSS launch")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + EXTRA_VARIANTS)
    p.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                   help="train.deterministic=false (it is process-wide, so it applies to every variant)")
    p.add_argument("--no-rss", dest="rss", action="store_false", help="skip the per-variant peak-RSS launches")
    p.add_argument("--profile", action="store_true",
                   help="only profile --variants (one launch, --warmup then --steps steps each) and print op times")
    p.add_argument("--worker", choices=("time", "rss", "profile"), help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.profile:
            report_profile(launch(args, ["--worker", "profile"], f"{tmp}/profile.json"))
            return
        timing = launch(args, ["--worker", "time"], f"{tmp}/time.json")
        rss = {}
        if args.rss:
            for n in args.variants:
                extra = ["--worker", "rss", "--variant", n, "--warmup", "1", "--steps", str(args.rss_steps)]
                rss[n] = launch(args, extra, f"{tmp}/rss_{n}.json")
    report(args, timing, rss)


if __name__ == "__main__":
    main()
