"""Quantization quality, size and QAT overhead: fp32, PTQ and QAT (int8-int8, int8-int4) on 8 bases, one run.

    python bench/bench_quant.py                          # 8 bases x (3000 steps, then 300 steps x 3): ~20 min
    python bench/bench_quant.py --base runs/bench-qbase  # train the bases there once (BASE/seedN), reuse them
    python bench/bench_quant.py --seeds 1234 --num-eval 2048 --lr 1e-3 --group-size 0   # one quick variant

Targets (issue 5): int8 QAT within 0.5 points of fp32; int4 QAT recovering >= 90% of the accuracy that PTQ
loses; QAT step time <= 1.15x and peak memory <= 1.3x of plain training (torchao's own prepared model:
1.27x and 1.54x).

Part 1 (quality), once per seed in --seeds (--jobs processes at once). The base is a small decoder
(bench/tiny_base.py: pretrain/tiny at --base-dim 64 x --base-layers 2, ~130K parameters, no weight decay)
trained on the bundled `sort` task for --base-steps 3000, to the end of its cosine schedule. A model trained
this long for its size is one int4 PTQ hurts measurably (-1.7 to -5.0 points); the dim-128 pretrain/tiny
model at 300-2000 steps loses <= 1 point (below), so there is nothing to recover. From the base, three
trainers run --steps steps each on sort with the same data order: fp32 (the control: plain fine-tuning), qat
int8-int8 and qat int8-int4 (recipe.name=qat, --lr with 5 warmup steps, cosine). They step in turn, one step
each. Then every model is evaluated with the trainer's teacher-forced exact match on --num-eval held-out
examples: the base and the control in fp32, PTQ of both (torchao quantize_ with the same
Int8DynamicActivationIntxWeightConfig), and each QAT model after torchao's convert step (real int8/int4
weights, run on CPU). int4 recovery = (QAT int4 - PTQ int4) / (fp32 - PTQ int4), all after the same
fine-tuning steps. Sizes: model_quantized.pt (meshtune export format: int8 codes, int4 codes two to a byte,
fp32 scales and zero points; embeddings and head stay fp32) vs fp32 safetensors.
Why 8 seeds and 8192 examples: one seed's recovery is a difference of a few tenths of a point divided by a
loss of 2-5 points. On 2048 examples the same seed read 87.5% and, on 8192, 102.4%; across seeds it spans
76-102%. The verdict is on the mean over seeds, printed with its standard error.

Part 2 (overhead). A larger decoder (--dim, --layers; seq 128, micro-batch 8, --accum micro-batches per
optimizer step, AdamW) trained from the same weights as plain fp32, torchao's prepared model
(FakeQuantizedLinear: weights fake-quantized in every forward) and meshtune's QAT (torchao's numbers in plain
torch ops; weights fake-quantized once per step, inputs once per tensor; backward keeps the inputs' int8
codes and dequantizes again): one step of each in turn, same batches; ms/step median and ratio to plain.
"peak MB" = parameters + gradients + AdamW state + what autograd saves for backward in one micro-batch
(unique storages, counted with saved-tensor hooks; includes meshtune's cached fake-quantized weights), i.e.
what a step holds at its peak; ru_maxrss on CPU cannot resolve it.

Measured 2026-11-26, 2 CPU cores, 1 thread per job, defaults unless named (deterministic: a rerun repeats
every accuracy to the digit):
  quality, 8 seeds, 8192 examples (accuracy of base and fp32; the rest in points vs fp32):
      seed    base    fp32  int8 QAT  int4 PTQ  int4 QAT  recovered
         4  0.8899  0.9158     +0.00     -3.72     -0.59      84.3%
         5  0.9305  0.9521     -0.09     -1.71     -0.42      75.7%
         6  0.8610  0.8938     +0.09     -3.54     -0.63      82.1%
         7  0.8971  0.9324     +0.07     -3.11     -0.62      80.0%
      1234  0.8900  0.9207     -0.24     -4.98     -0.12      97.5%
         1  0.9224  0.9438     -0.09     -2.76     -0.62      77.4%
         2  0.8687  0.8943     -0.10     -3.02     -0.31      89.9%
         3  0.8950  0.9233     -0.16     -3.04     +0.07     102.4%
    int8 QAT: -0.06 points on average, worst -0.24: MET. int4 QAT recovers 86.2% on average (standard error
    3.4, range 75.7-102.4%): MISSED. QAT int4 ends 0.3-0.6 points under fp32 on 6 of 8 seeds. Sizes: fp32
    519 KiB, int8 259 KiB (2.00x smaller), int4 211 KiB (2.46x; embeddings and head stay fp32 and are 0.26 of
    the model at this size).
    --lr on seeds 1234,1,2,3 (3e-4: 91.8% on these four): 2e-4 87.5%, 5e-4 84.6% (int8 -0.05 / +0.03).
    --steps (all 8 seeds, bases reused; fp32 and QAT fine-tune for the same steps): 300 86.2% (SE 3.4);
      1000 89.2% (SE 1.6, range 85.1-98.0%; int8 +0.02); 2000 84.7% (SE 4.2, range 66.7-102.6%; int8 -0.02).
      fp32 gains 3-7 points over its base by 2000 steps, and int4 QAT keeps pace: it ends 0.40, 0.38 and
      0.50 points under fp32 on average at 300, 1000 and 2000 steps. The gap does not close with more
      steps, so 300 steps stays the default (the longer runs are not better within their standard errors).
    --base-dim 96 (2.2x the parameters; seeds 1234,1,2,3): int4 PTQ loses less (0.7-1.4 points) but QAT
      still ends 0.1-0.7 points under fp32, so it recovers 63.0% (SE 7.9); int8 -0.01. A bigger model does
      not shrink the gap at this scale: int4 QAT costs a steady ~0.4 points here whatever was tried.
    Also tried (throwaway scripts), all 8 seeds at 300 steps, one extra trainer, same data: freezing weights
      whose int4 code oscillates (Nagel et al. 2022, "Overcoming Oscillations in QAT": EMA 0.99 of sign
      flips, freeze above 0.02; ~6% of weights frozen) 87.2% (range 81.9-92.5%), and at 1000 steps on seeds
      4-7 no gain (92.3% vs 92.7%); the same freezing at the rounded EMA code, as in the paper, 85.0%; the
      straight-through gradient also through clamped weight codes (a group's positive max lands on 7.5 and
      clamps to 7 in ~40% of groups, so by torchao's STE it gets no gradient): 84.4%. On seeds 4,5: pulling
      each weight towards its grid point after every step (dampening, 1% of the distance) -57%/-120%, 0.3%
      78.0%/72.1% (QAT 84.3%/75.7%); an EMA (0.95) of the QAT weights 83.6%/80.7%; lr 5e-4 for QAT alone
      73.4%/84.3%; no gradient clipping for QAT 79.3%/85.7% (QAT's mean gradient norm is 1.1-1.3x fp32's,
      so the 1.0 clip binds it a little more often).
    Tried, no better (scripts were not kept; each on 2-4 seeds): the weight scales learned (torchao's
    range_learning: as a parameter, in log space, or as a learned ratio to the max-abs scale), fake
    quantization switched on after half the steps, optim.min_lr_ratio=0 (8192 examples: 81.9% over 4 seeds
    vs 91.8% for the same seeds at 0.1), distillation from the fine-tuned fp32 model (QAT from it, alpha 0, T
    1: below plain QAT on 4 of 4 seeds), 9000-step bases (PTQ loses only 0.7-1.9 points; 87%), global batch 64
    for all three trainers (seeds 1234,1,2,3: 78.6%; fp32 gains more from the extra data than int4 QAT).
    One seed, 2048 examples (the old default): --group-size 0 (per channel): int8 +0.05 points, int4 PTQ
      -6.10, QAT recovers 94.4%. --steps 500: 90.9%. lr 1e-4: 87.2%. --lr 1e-3: 300 steps int8 -0.54, int4
      76.8%; 600 steps int8 -0.00, int4 51.9%: QAT fine-tuning wants a low lr (finetune/qat uses 3e-4); at
      1e-3 both models first lose ~5 points, and the int4 one regains less of it. Seed 1: lr 1e-4 / 2e-4:
      73.2% / 89.1%.
    PTQ int4 of the dim-128 pretrain/tiny model (group 32 / per channel / per channel + head), 2048 examples:
      500 steps 0.385 -> 0.388 / 0.388 / 0.391; 1000: 0.466 -> 0.467 / 0.462 / 0.463; 2000: 0.780 -> 0.783 /
      0.771 / 0.767. An older default of this bench (300-step dim-128 base) measured int4 recovery as noise.
  overhead (int8-int4 group 32, 20 steps each), meshtune vs plain: 1.08x (2318 / 2153 ms), 1.11x (2441 /
      2199 ms); torchao's prepared model 1.31x / 1.36x. HEAD before this change, same machine: 1.15x (2341 /
      2027 ms). Peak 138.2 MB plain, 212.6 MB torchao (1.54x), 136.6 MB meshtune (0.99x; 131.1 MB, 0.95x,
      when the weight cache held int8 codes). What changed: per-token min / max with amin + amax (aminmax
      over the last dim is ~10x slower on CPU), int8 codes cast to float before the broadcast subtract (the
      mixed-dtype path was ~15x slower), trained weights cached as their float fake-quantized value (no
      dequantization per micro-batch), the straight-through mask applied at the clamped codes' indices.
  fine-tuning step of the part-1 model (dim 64, one 32-example micro-batch): QAT 1.3x; its small matmuls
      leave the per-layer quantization passes and Python autograd nodes a larger share.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import multiprocessing as mp
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SCHEMES = ("int8-int8", "int8-int4")


BASE_MODEL = ("model.dim={dim}", "model.n_layers={layers}", "optim.weight_decay=0", "train.seed={seed}")


def base_overrides(args, seed: int) -> list[str]:
    return [o.format(dim=args.base_dim, layers=args.base_layers, seed=seed) for o in BASE_MODEL]


def trainer_for(args, seed: int, tmp: Path, name: str, base: Path, recipe: str = "", scheme: str = "int8-int4"):
    from tiny_base import base_config

    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer

    cfg = base_config(tmp / name, "sort", args.steps, args.num_eval, *base_overrides(args, seed), f"init_from={base}",
                      f"optim.lr={args.lr}", "optim.warmup_steps=5", "checkpoint.save_final=false",
                      "checkpoint.resume=never", f"recipe.name={recipe}", f"recipe.qat.scheme={scheme}",
                      f"recipe.qat.group_size={args.group_size}")
    return build_trainer(cfg, DistEnv())


def pretrain_base(args, seed: int, tmp: Path) -> Path:
    """The base of one seed (bench/tiny_base.py at --base-dim x --base-layers, no weight decay), exported merged."""
    from tiny_base import train_base

    from meshtune.export import export

    trainer, how = train_base(Path(args.base) / f"seed{seed}" if args.base else tmp / "base", "sort",
                              args.base_steps, args.num_eval, *base_overrides(args, seed))
    (path,) = export(trainer.cfg.run_dir, "merged", quiet=True)
    print(f"seed {seed}: base dim {args.base_dim} x {args.base_layers} layers on sort, {args.base_steps} steps "
          f"({how}) -> {path}", flush=True)
    return path


def accuracy(trainer, model) -> float:
    """The trainer's evaluation (teacher-forced exact match, whole eval split) of another model."""
    saved = trainer.model
    trainer.model = model
    try:
        return trainer.evaluate()["eval_accuracy"]
    finally:
        trainer.model = saved


def part1(args, seed: int, tmp: Path) -> dict:
    """One seed: its base, then fp32 / QAT fine-tuning side by side, then every model's accuracy and size."""
    import torch

    from meshtune.export import save_safetensors
    from meshtune.export.quantized import save_quantized
    from meshtune.recipes.qat import convert, ptq

    torch.set_num_threads(args.threads)
    tmp.mkdir(parents=True, exist_ok=True)
    base = pretrain_base(args, seed, tmp)
    trainers = {"fp32": trainer_for(args, seed, tmp, "fp32", base)}
    for s in SCHEMES:
        trainers[f"qat {s}"] = trainer_for(args, seed, tmp, f"qat-{s}", base, "qat", s)
    ctl = trainers["fp32"]
    qcfg = {s: dataclasses.replace(ctl.cfg.recipe.qat, scheme=s) for s in SCHEMES}
    r = {"base fp32": accuracy(ctl, ctl.model)}
    for s in SCHEMES:
        r[f"base PTQ {s}"] = accuracy(ctl, ptq(copy.deepcopy(ctl.model), qcfg[s]))
    print(f"seed {seed}: before fine-tuning: {r}", flush=True)
    names, times = list(trainers), {n: [] for n in trainers}
    t0 = time.time()
    for step in range(args.steps):
        for n in names[step % len(names):] + names[: step % len(names)]:
            t = trainers[n]
            mbs = t.next_micro_batches()
            start = time.perf_counter()
            t.train_step(mbs)
            times[n].append(time.perf_counter() - start)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            acc = ", ".join(f"{n} {accuracy(t, t.model):.3f}" for n, t in trainers.items())
            print(f"seed {seed}: step {step + 1}: {acc} ({time.time() - t0:.0f} s)", flush=True)
    r["fp32"] = accuracy(ctl, ctl.model)
    sizes = {"fp32": save_safetensors(ctl.model.state_dict(), tmp / "fp32.safetensors").stat().st_size}
    for s in SCHEMES:
        post = ptq(copy.deepcopy(ctl.model), qcfg[s])
        r[f"PTQ {s}"] = accuracy(ctl, post)
        t = trainers[f"qat {s}"]
        t.model.eval()
        with torch.no_grad():
            converted = convert(copy.deepcopy(t.model), qcfg[s])
        r[f"QAT {s}"] = accuracy(ctl, converted)
        r[f"QAT {s} fake"] = accuracy(ctl, t.model)
        vocab = ctl.model.tok_embeddings.num_embeddings
        path = save_quantized(converted, tmp / f"q-{s}.pt", ctl.cfg.model, vocab, qcfg[s], "qat")
        sizes[s] = path.stat().st_size
    skip = args.warmup
    r["step_ms"] = {n: 1000 * statistics.median(v[skip:]) for n, v in times.items()}
    r["sizes"] = sizes
    return r


def report1(args, seed: int, r: dict) -> None:
    print(f"\n== quality, seed {seed}: {args.steps} fine-tuning steps from the base, exact match on {args.num_eval} "
          "held-out examples")
    print(f"{'model':<22}{'accuracy':>10}")
    for k, v in r.items():
        if isinstance(v, float):
            print(f"{k:<22}{v:>10.4f}")
    s = r["sizes"]
    print("size on disk: " + ", ".join(f"{k} {v / 1024:.0f} KiB ({s['fp32'] / v:.2f}x smaller)" if k != "fp32"
                                       else f"fp32 {v / 1024:.0f} KiB" for k, v in s.items()))
    ms = r["step_ms"]
    print(f"fine-tuning step (dim {args.base_dim} x {args.base_layers}, one 32-example micro-batch): " + ", ".join(
        f"{k} {v:.0f} ms ({v / ms['fp32']:.2f}x)" for k, v in ms.items()))


def summary1(results: dict[int, dict]) -> None:
    """Per seed and over all seeds: int8 QAT vs fp32, and the share of int4 PTQ's loss that QAT recovers.

    One seed's recovery is noisy (a difference of a few tenths of a point over a loss of a few points), so the
    verdicts are on the mean over seeds, printed with its standard error and the range."""
    print(f"\n== quality over {len(results)} seed(s): accuracy of base and fp32; the others in points vs fp32")
    print(f"{'seed':>6}{'base':>8}{'fp32':>8}{'int8 QAT':>10}{'int4 PTQ':>10}{'int4 QAT':>10}{'recovered':>11}")
    d8s, recs = [], []
    for seed, r in results.items():
        fp32, ptq4, qat4 = r["fp32"], r["PTQ int8-int4"], r["QAT int8-int4"]
        d8s.append(100 * (r["QAT int8-int8"] - fp32))
        lost = fp32 - ptq4
        if lost > 0:
            recs.append((qat4 - ptq4) / lost)
        rec = f"{100 * recs[-1]:>10.1f}%" if lost > 0 else f"{'n/a':>11}"
        print(f"{seed:>6}{r['base fp32']:>8.4f}{fp32:>8.4f}{d8s[-1]:>+10.2f}{-100 * lost:>+10.2f}"
              f"{100 * (qat4 - fp32):>+10.2f}{rec}")
    d8 = statistics.mean(d8s)
    print(f"int8 QAT vs fp32: {d8:+.2f} points on average, worst {max(d8s, key=abs):+.2f} "
          f"(target: within 0.5) -> {'MET' if abs(d8) <= 0.5 else 'MISSED'}")
    if not recs:
        print("int4: PTQ lost nothing on any seed: no recovery to measure (train the bases longer)")
        return
    rec = statistics.mean(recs)
    spread = f", standard error {100 * statistics.stdev(recs) / len(recs) ** 0.5:.1f}" if len(recs) > 1 else ""
    print(f"int4: QAT recovers {100 * rec:.1f}% of PTQ's loss on average over {len(recs)} seed(s){spread}, range "
          f"{100 * min(recs):.1f}-{100 * max(recs):.1f}% (target >= 90%) -> {'MET' if rec >= 0.9 else 'MISSED'}")


def part2(args) -> dict:
    import torch
    import torch.nn.functional as F
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    from meshtune.config import ModelConfig
    from meshtune.models import build_model
    from meshtune.recipes.qat import QuantConfig, base_config, prepare, qat_modules

    torch.manual_seed(0)
    vocab, seq, micro = 512, 128, 8
    mcfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=8, n_kv_heads=4, max_seq_len=seq)
    plain = build_model(mcfg, vocab)
    c = QuantConfig(scheme="int8-int4", group_size=32)
    ours = prepare(copy.deepcopy(plain), c)
    names = {n for n, _ in qat_modules(ours)}
    ao = copy.deepcopy(plain)
    quantize_(ao, QATConfig(base_config(c), step="prepare"), filter_fn=lambda m, fqn: fqn in names)
    models = {"plain": plain, "torchao QAT": ao, "meshtune QAT": ours}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    gen = torch.Generator().manual_seed(1)

    def step(k: str, batches) -> float:
        m, start = models[k], time.perf_counter()
        for x in batches:
            F.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
        opts[k].step()
        for _, q in qat_modules(m):
            q.invalidate()  # what QATRecipe.after_optimizer_step does
        opts[k].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times = {k: [] for k in models}
    for i in range(args.overhead_steps):
        batches = [torch.randint(0, vocab, (micro, seq), generator=gen) for _ in range(args.accum)]
        order = list(models)[i % 3:] + list(models)[: i % 3]
        for k in order:
            times[k].append(step(k, batches))
    x = torch.randint(0, vocab, (micro, seq), generator=gen)
    peak = {k: state_bytes(m, opts[k]) + saved_bytes(m, x) for k, m in models.items()}
    ms = {k: 1000 * statistics.median(v[args.warmup:]) for k, v in times.items()}
    return {"ms": ms, "peak": peak, "params": sum(p.numel() for p in plain.parameters())}


def state_bytes(model, optimizer) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    optim = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if hasattr(v, "numel"))
    return 2 * params + optim  # parameters, gradients, AdamW moments


def saved_bytes(model, x) -> int:
    """What autograd saves in one micro-batch's forward + loss (unique storages, parameters excluded)."""
    import torch
    import torch.nn.functional as F

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
    del loss
    return sum(saved.values())


def report2(args, r: dict) -> None:
    ms, peak = r["ms"], r["peak"]
    print(f"\n== QAT overhead: {r['params'] / 1e6:.1f}M-parameter decoder (dim {args.dim}, {args.layers} layers), "
          f"int8-int4, seq 128, micro-batch 8, {args.accum} micro-batches/step, {args.overhead_steps} steps each")
    print(f"{'variant':<16}{'ms/step':>10}{'x plain':>9}{'peak MB':>10}{'x plain':>9}")
    for k in ms:
        print(f"{k:<16}{ms[k]:>10.0f}{ms[k] / ms['plain']:>9.2f}{peak[k] / 2**20:>10.1f}"
              f"{peak[k] / peak['plain']:>9.2f}")
    t, m = ms["meshtune QAT"] / ms["plain"], peak["meshtune QAT"] / peak["plain"]
    print(f"meshtune QAT: {t:.2f}x time (target <= 1.15) -> {'MET' if t <= 1.15 else 'MISSED'}; {m:.2f}x memory "
          f"(target <= 1.3) -> {'MET' if m <= 1.3 else 'MISSED'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", help="train the bases into this dir (BASE/seedN) once and reuse them (default: a "
                   "temporary dir)")
    p.add_argument("--base-steps", type=int, default=3000)
    p.add_argument("--base-dim", type=int, default=64)
    p.add_argument("--base-layers", type=int, default=2)
    p.add_argument("--seeds", default="1234,1,2,3,4,5,6,7",
                   help="comma-separated train.seed values: one base and one set of fine-tunes each")
    p.add_argument("--jobs", type=int, default=2, help="seeds run in this many processes at once")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps of fp32 and of each QAT model")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--num-eval", type=int, default=8192)
    p.add_argument("--eval-every", type=int, default=0, help="print every model's accuracy every N steps; 0: never")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the step times")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--overhead-steps", type=int, default=20)
    p.add_argument("--work-dir", help="keep the runs here (WORK_DIR/seedN; its base in WORK_DIR/seedN/base "
                   "unless --base names a dir)")
    p.add_argument("--no-quality", dest="quality", action="store_false")
    p.add_argument("--no-overhead", dest="overhead", action="store_false")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.work_dir or tmp
        if args.quality:
            seeds = [int(x) for x in args.seeds.split(",")]
            with ProcessPoolExecutor(min(args.jobs, len(seeds)), mp_context=mp.get_context("spawn")) as pool:
                futures = {seed: pool.submit(part1, args, seed, Path(tmp) / f"seed{seed}") for seed in seeds}
                results = {seed: f.result() for seed, f in futures.items()}
            for seed, r in results.items():
                report1(args, seed, r)
            summary1(results)
        if args.overhead:
            report2(args, part2(args))


if __name__ == "__main__":
    main()
