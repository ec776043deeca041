"""Memory levers on a Llama-3.2-1B-shaped LoRA fine-tune: the frozen base in fp32, bf16 and NF4, NF4 + offload; each
run's counted per-rank peak against `meshtune validate`'s plan.

    flock /tmp/meshtune-1b.lock python bench/bench_lora_memory.py      # ~10 min on 2 cores (+1 min writing the
                                                                        # checkpoint once); ~5 GiB RSS per rank
    python bench/bench_lora_memory.py --steps 1 --variants qlora-nf4   # a subset

The checkpoint is bench_hf_load.py's (Llama-3.2-1B shape, 1.24B params, tied, random fp32 weights, written once
to --dir). Each variant is one run of `finetune/lora-hf-llama init_from=DIR` on 2 gloo ranks (FSDP2, LoRA r=16 on
every projection, activation checkpointing, seq 64, micro-batch 1, --steps optimizer steps), each rank started by
torchrun as bench/counted_rank.py, which trains as `meshtune train` does with torch's CPU allocator counted
(meshtune.counted_memory: the CPU analogue of CUDA's max_memory_allocated). In this order:
  lora-fp32        the frozen base in fp32 (the reference)
  lora-bf16        train.frozen_dtype=bf16, with the bf16 compute it needs
  qlora-nf4        recipe.name=qlora: the frozen base linear weights and the tied embedding / head in NF4
                   (recipe.qlora.quantize_embeddings, the default; norms fp32)
  qlora-nf4-offl   qlora + parallel.cpu_offload=true (FSDP2 CPUOffloadPolicy; on a CPU device the offload
                   copies are the tensors themselves, so this measures its overhead only)
For each: rank 0's model-state bytes (parameters held + fp32 gradients + AdamW state of the trainable ones) and
its ratio to lora-fp32; per rank the counted peak while loading and during the training steps (`train_step`: the
training peak), the planner's per-rank peak for the same config (`meshtune validate`'s "as configured" row,
runtime/plan_report.planned_memory; with cpu_offload its host bytes added, the same memory on a CPU device), the
ratio planner / counted training peak on the rank furthest from it, and each rank's peak RSS (ru_maxrss, under the
profiler: the interpreter, libraries, the allocator's retained pages and the profiler's own records included); the
median step time (under the profiler, which records every op: slower than a plain run).
Targets (issue "Memory levers"): NF4 base model state <= 0.2x the fp32 base's; planner within 10% of every peak.

Measured here (2026-12-07, 2 CPU cores, 2 steps each, one run; GiB per rank, r0 / r1):
    variant           state x fp32  counted load  counted step  planner plan/count     peak RSS  step s
    lora-fp32         2.386   1.00   2.81 / 2.81   4.32 / 4.32    4.343      1.005  5.78 / 5.59    12.5
    lora-bf16         1.235   0.52   1.42 / 1.42   2.19 / 2.19    2.213      1.010  3.00 / 2.96     6.2
    qlora-nf4         0.381   0.16   1.06 / 1.06   0.94 / 0.94    0.940      1.004  3.05 / 2.90    37.4
    qlora-nf4-offl    0.381   0.16   1.06 / 1.06   0.94 / 0.94    0.940      1.004  3.11 / 2.54    37.9
NF4 base model state / fp32 base's: 0.160 (target <= 0.2); the planner within 1% of every counted training peak.
Where the peaks are (bench/counted_rank.py with MESHTUNE_COUNTED_TOP: what is live there, by allocating op):
fp32 and bf16 at the start of forward, while FSDP2 copies the root unit (the tied 128K x 2048 embedding, gathered
whole) out of its all-gather output: the shards + AdamW state + the embedding twice (fp32: 2.32 + 0.04 + 2 x 0.98).
NF4 in backward, inside torchao's `linear_nf4` dequantizing a whole 8192 x 2048 projection: 320 MiB ((8 + 3 x 4)
bytes per weight: int64 code indices, looked-up and scaled values, the stacked fp32 weight) beside the shards,
the NF4 root and two NF4 blocks gathered, the logits the trainer holds and the LoRA gradients. The planner's terms
for these (runtime/memory_plan.step_moments, `dequantized_bytes` in recipes/qlora) are counted against the
allocator on small models in tests/unit/test_nf4_memory.py and tests/distributed/test_planned_peak.py.
Before (the same day, against peak RSS): the planner summed every term at its own largest (4.94 / 2.55 / 0.84 /
0.46 GiB: FSDP2's root counted gathered beside two blocks and a buffer, NF4's dequantization missing, offloaded
state left out on a CPU device); 11% under fp32's peak RSS, 66% under NF4's. Peak RSS stays 0.8-2.1 GiB above the
counted peak, not broken down here: the interpreter and libraries (~0.4 GiB), what the C allocator keeps of the
load's temporaries (to_nf4's, for NF4), the profiler's records.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hf_load import REPO, write_checkpoint  # noqa: E402

VARIANTS = {
    "lora-fp32": (),
    "lora-bf16": ("train.dtype=bf16", "train.frozen_dtype=bf16"),
    "qlora-nf4": ("recipe.name=qlora",),
    "qlora-nf4-offl": ("recipe.name=qlora", "parallel.cpu_offload=true"),
}


def overrides(path: Path, steps: int, extra: tuple[str, ...]) -> list[str]:
    return [f"init_from={path}", "model.max_seq_len=64", "data.seq_len=64", "data.num_train=64", "data.num_eval=2",
            f"train.steps={steps}", "train.global_batch_size=2", "train.micro_batch_size=1", "train.log_every=1",
            "train.eval_every=0", "train.eval_batches=0", "checkpoint.every=0", "checkpoint.save_final=false",
            "metrics.progress=false", "optim.warmup_steps=0", "train.dtype=fp32", *extra]


def planned(path: Path, extra: tuple[str, ...]) -> float:
    """`meshtune validate`'s per-rank peak for the same config, on a CPU device (offloaded state included)."""
    from meshtune.runtime.plan_report import planned_memory
    from meshtune.schema import load_config

    plan = planned_memory(load_config("finetune/lora-hf-llama", overrides(path, 1, extra)), 2)
    return plan["total"] + plan["host"]


def counted_run(path: Path, run_dir: Path, steps: int, extra: tuple[str, ...]) -> list[dict]:
    """Every rank's bench/counted_rank.py record for one 2-rank run."""
    out = run_dir / "counted"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(REPO / "bench" / "counted_rank.py"), str(out), "finetune/lora-hf-llama", f"run_dir={run_dir}",
            *overrides(path, steps, extra)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")  # as `meshtune launch` sets it: cores / ranks
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"counted run failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = sorted(r["step_time_s"] for r in records if "step_time_s" in r)
    for r in ranks:
        r["step_s"] = times[len(times) // 2] if times else None
    return ranks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "meshtune-bench-hf-llama32-1b"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    path = Path(args.dir)
    nbytes = write_checkpoint(path)
    print(f"checkpoint: {path} ({nbytes / 2**30:.2f} GiB fp32, Llama-3.2-1B shape); 2 ranks, FSDP2, LoRA r=16, "
          f"seq 64, {args.steps} steps; GiB per rank (r0 / r1)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            results[name] = (counted_run(path, Path(tmp) / name, args.steps, VARIANTS[name]),
                             planned(path, VARIANTS[name]))
    ref = results.get("lora-fp32")
    gib = 2**30

    def pair(ranks, key):
        return " / ".join(f"{r[key] / gib:.2f}" for r in ranks)

    print(f"{'variant':<16}{'state':>7}{'x fp32':>7}{'counted load':>14}{'counted step':>14}{'planner':>9}"
          f"{'plan/count':>11}{'peak RSS':>13}{'step s':>8}")
    for name, (ranks, plan) in results.items():
        state = ranks[0]["model_state_bytes"]
        x = f"{state / ref[0][0]['model_state_bytes']:.2f}" if ref else "-"
        worst = max((plan / r["step"] for r in ranks), key=lambda v: abs(v - 1))
        step = f"{ranks[0]['step_s']:.1f}" if ranks[0]["step_s"] else "-"
        print(f"{name:<16}{state / gib:>7.3f}{x:>7}{pair(ranks, 'load'):>14}{pair(ranks, 'step'):>14}"
              f"{plan / gib:>9.3f}{worst:>11.3f}{pair(ranks, 'peak_rss'):>13}{step:>8}")
    if ref and "qlora-nf4" in results:
        print(f"NF4 base model state / fp32 base's: "
              f"{results['qlora-nf4'][0][0]['model_state_bytes'] / ref[0][0]['model_state_bytes']:.3f} "
              "(target <= 0.2); planner within 10% of every counted training peak: "
              f"{all(abs(p / r['step'] - 1) <= 0.10 for rs, p in results.values() for r in rs)}")


if __name__ == "__main__":
    main()
