"""Pruning quality, size and CPU speed: a dense base fine-tuned with and without pruning, in one run.

    python bench/bench_prune.py                        # base + 4 fine-tunes + exports: 297 s on a quiet machine
    python bench/bench_prune.py --base runs/bench-sort  # train the base there once (bench_distill --teacher too)
    python bench/bench_prune.py --steps 300 --importance taylor

Targets (issue 5), against the dense model fine-tuned for the same steps in the same run: 50% unstructured
magnitude pruning within 1 point of dense accuracy, 2:4 within 2 points, structured pruning to <= 70% of the
parameters within 2 points and >= 1.3x faster CPU inference (batched forward of the shrunk model vs dense).

The base is pretrain/tiny trained on `sort` (bench/tiny_base.py, 500 steps; reused from --base when it holds
the finished run) and exported merged. Each variant then fine-tunes from it on `sort` for --steps (one step
of each in turn, so machine load hits all alike): dense (no recipe), magnitude (global, cubic ramp to 50%
over the first 60% of the steps), semi_structured (2:4, one shot after the first step, then recovery) and
structured (kv-head groups and MLP channels ranked by weight norm, or --importance taylor; ramp over the first
half).
Accuracy is the trainer's teacher-forced exact match on --num-eval held-out examples. Each run is checkpointed
and exported with `meshtune export` (merged = dense with zeros, sparse = CSR / packed 2:4, shrunk = the smaller
dense model); "nonzero" counts the parameters left after pruning. Inference: forward of a (--batch, seq_len)
batch, dense and shrunk interleaved, median over --reps, --threads torch threads.

Measured 2026-11-26, 2 shared CPU cores, base 500 steps (accuracy 0.462), 200 fine-tune steps, 2048 examples
(the standard error of one accuracy is ~1.1 points; the variants share the examples, so their gaps are tighter):
  norm (default):   dense 0.459 | magnitude 50% 0.463 (+0.4) | 2:4 0.465 (+0.6) | structured 0.455 (-0.4) at
                    62.0% of the parameters, 1.49x / 1.39x faster (two runs): all targets met.
  --importance taylor: the same but structured 0.449 (-1.1), 1.35x faster (timed under heavier load): met.
The runs are deterministic (dense, magnitude and 2:4 repeat to the digit), so the structured gap is the
criterion's alone, and within the noise. The default run with the base trained in it took 297 s (base 85 s) and
repeated the accuracies to the digit; an earlier one took ~25 min, most of it SIGSTOPped by another process.
Sparse files: 0.79x (CSR) and 0.59x (2:4) of the merged file; shrunk 0.62x. Structured pruning at 0.4 removes
one of the two kv-head groups of every layer (half the attention, in one go: a ramp cannot split a group)
and 40% of the MLP channels, so which group goes matters. Earlier (2026-11-25, base 300-600 steps, 512-1024
examples, norm importance): structured -0.2 and -6.2, magnitude +0.8 and -1.7: one run met all targets, the
longer one did not.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "dense": [],
    "magnitude": ["recipe.name=prune", "recipe.prune.method=magnitude", "recipe.prune.sparsity=0.5"],
    "2:4": ["recipe.name=prune", "recipe.prune.method=semi_structured"],
    "structured": ["recipe.name=prune", "recipe.prune.method=structured"],
}
TARGETS = {"magnitude": 1.0, "2:4": 2.0, "structured": 2.0}  # accuracy points below dense


def base_config(run_dir: Path, steps: int, num_eval: int, extra: list[str]):
    from meshtune.schema import load_config

    return load_config("pretrain/tiny", [f"run_dir={run_dir}", f"train.steps={steps}", "train.eval_every=0",
                                         "checkpoint.every=0", "checkpoint.resume=never", "metrics.progress=false",
                                         f"data.num_eval={num_eval}", *extra])


def schedule(name: str, steps: int, args) -> list[str]:
    if name == "magnitude":
        return [f"recipe.prune.end_step={int(0.6 * steps)}", "recipe.prune.frequency=10"]
    if name == "structured":
        return [f"recipe.prune.sparsity={args.structured_sparsity}", f"recipe.prune.end_step={steps // 2}",
                "recipe.prune.frequency=10", f"recipe.prune.importance={args.importance}"]
    return []


def run(args, tmp: Path) -> dict:
    from tiny_base import train_base

    from meshtune.artifacts import find, load_model
    from meshtune.export import export
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer

    base_trainer, how = train_base(Path(args.base) if args.base else tmp / "base", "sort", args.base_steps,
                                   args.num_eval)
    base_cfg = base_trainer.cfg
    (base,) = export(base_cfg.run_dir, "merged", quiet=True)
    print(f"base: pretrain/tiny on sort, {args.base_steps} steps ({how}), accuracy "
          f"{base_trainer.evaluate()['eval_accuracy']:.3f}", flush=True)
    ft = [f"init_from={base}", f"optim.lr={args.lr}", "optim.warmup_steps=10", "checkpoint.save_final=true"]
    trainers = {n: build_trainer(base_config(tmp / n.replace(":", "of"), args.steps, args.num_eval,
                                             ft + o + schedule(n, args.steps, args)), DistEnv())
                for n, o in VARIANTS.items()}
    t0 = time.time()
    names = list(trainers)
    for i in range(args.steps):
        for n in names[i % len(names):] + names[: i % len(names)]:
            trainers[n].train_step(trainers[n].next_micro_batches())
        if (i + 1) % args.eval_every == 0 and i + 1 < args.steps:
            accs = "  ".join(f"{n} {trainers[n].evaluate()['eval_accuracy']:.3f}" for n in names)
            print(f"  step {i + 1:>4} ({time.time() - t0:.0f} s): accuracy  {accs}", flush=True)
    out = {}
    for n, trainer in trainers.items():
        trainer.save()
        run_dir = Path(trainer.cfg.run_dir)
        model = trainer.model
        params = model.num_params()
        nonzero = sum(int(p.ne(0).sum()) for p in model.parameters())
        files = {"merged": export(run_dir, "merged", quiet=True)[0]}
        if n in ("magnitude", "2:4"):
            files["sparse"] = export(run_dir, "sparse", quiet=True)[0]
        if n == "structured":
            files["shrunk"] = export(run_dir, "shrunk", quiet=True)[0]
        out[n] = {"acc": trainer.evaluate()["eval_accuracy"], "params": params, "nonzero": nonzero,
                  "bytes": {k: v.stat().st_size for k, v in files.items()}, "files": files}
    out["_timing"] = inference(args, out["dense"]["files"]["merged"], out["structured"]["files"]["shrunk"],
                               base_cfg.data.seq_len)
    out["_params_shrunk"] = load_model(find(out["structured"]["files"]["shrunk"])).num_params()
    return out


def inference(args, dense_file: Path, shrunk_file: Path, seq_len: int) -> dict:
    import torch

    from meshtune.artifacts import find, load_model

    models = {"dense": load_model(find(dense_file)), "shrunk": load_model(find(shrunk_file))}
    tokens = torch.randint(0, models["dense"].vocab_size, (args.batch, seq_len))
    times = {n: [] for n in models}
    with torch.inference_mode():
        for m in models.values():
            m(tokens)  # warm-up
        for i in range(args.reps):
            for n in (list(models) if i % 2 == 0 else list(models)[::-1]):
                start = time.perf_counter()
                models[n](tokens)
                times[n].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def report(args, r: dict) -> None:
    dense = r["dense"]
    t = r["_timing"]
    print(f"\nfine-tuned {args.steps} steps from the same base on sort; accuracy on {args.num_eval} held-out "
          f"examples (points = 100 x exact-match rate); structured: sparsity {args.structured_sparsity}, "
          f"{args.importance} importance; sizes from meshtune export\n")
    head = (f"{'variant':<11}{'accuracy':>9}{'vs dense':>9}{'params':>9}{'nonzero':>9}{'% dense':>8}"
            f"{'merged B':>10}{'sparse B':>10}{'x merged':>9}{'shrunk B':>10}")
    print(head)
    print("-" * len(head))
    for n in VARIANTS:
        x = r[n]
        params = r["_params_shrunk"] if n == "structured" else x["params"]
        kept = params if n == "structured" else x["nonzero"]
        b = x["bytes"]
        small = b.get("sparse") or b.get("shrunk")
        print(f"{n:<11}{x['acc']:>9.3f}{100 * (x['acc'] - dense['acc']):>+9.1f}{params:>9,}{kept:>9,}"
              f"{100 * kept / dense['params']:>8.1f}{b['merged']:>10,}{b.get('sparse', 0) or '-':>10}"
              f"{(small / b['merged']) if small else float('nan'):>9.2f}{b.get('shrunk', 0) or '-':>10}")
    speed = t["dense"] / t["shrunk"]
    print(f"\nCPU inference, forward of ({args.batch}, seq) tokens, {args.threads} thread(s), median of {args.reps}: "
          f"dense {t['dense'] * 1e3:.1f} ms, shrunk {t['shrunk'] * 1e3:.1f} ms -> {speed:.2f}x faster")
    print("\ntargets (issue 5):")
    for n, pts in TARGETS.items():
        gap = 100 * (dense["acc"] - r[n]["acc"])
        extra, ok = "", gap <= pts
        if n == "structured":
            share = r["_params_shrunk"] / dense["params"]
            ok = ok and share <= 0.7 and speed >= 1.3
            extra = f", {100 * share:.1f}% of parameters (<= 70%), {speed:.2f}x faster (>= 1.3x)"
        print(f"  {n}: {gap:+.1f} points below dense (<= {pts:g}){extra}: {'met' if ok else 'NOT met'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-steps", type=int, default=500, help="pretraining steps of the base on sort")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps of each variant")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (cosine, 10 warmup)")
    p.add_argument("--structured-sparsity", type=float, default=0.4,
                   help="fraction of kv-head groups and MLP channels the structured variant removes")
    p.add_argument("--importance", default="norm", choices=["norm", "taylor"],
                   help="how the structured variant ranks heads and channels (recipe.prune.importance)")
    p.add_argument("--base", help="the base's run dir: trained there if it has no final checkpoint yet, else "
                   "reused (bench_distill.py --teacher takes the same dir; default: a temporary dir)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--num-eval", type=int, default=2048, help="held-out examples for the accuracy")
    p.add_argument("--batch", type=int, default=64, help="batch of the inference timing")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier ratios on a shared machine)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        report(args, run(args, Path(tmp)))
    print(f"\nbench wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
