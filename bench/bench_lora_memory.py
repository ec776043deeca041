"""Memory levers on a Llama-3.2-1B-shaped LoRA fine-tune: the frozen base in fp32, bf16 and NF4, NF4 + offload.

    python bench/bench_lora_memory.py               # ~6-8 min on 2 cores (+1 min writing the checkpoint once)
    python bench/bench_lora_memory.py --steps 2     # optimizer steps per variant (default 2)

The checkpoint is bench_hf_load.py's (Llama-3.2-1B shape, 1.24B params, tied, random fp32 weights, written once
to --dir). Each variant is `meshtune launch finetune/lora-hf-llama --nproc-per-node 2 init_from=DIR` (FSDP2 over
2 gloo ranks, LoRA r=16 on every projection, seq 64, micro-batch 1), one launch each, in this order:
  lora-fp32        the frozen base in fp32 (the reference)
  lora-bf16        train.frozen_dtype=bf16 (with bf16 compute, which it needs): stopped once the model is
                   ready, since a CPU bf16 step of this size takes minutes (model state and RSS to ready only)
  qlora-nf4        recipe.name=qlora: the frozen base linear weights and the tied embedding / head in NF4
                   (recipe.qlora.quantize_embeddings, the default; norms fp32)
  qlora-nf4-offl   qlora + parallel.cpu_offload=true (FSDP2 CPUOffloadPolicy; on a CPU device the offload
                   copies are the tensors themselves, so this measures its overhead only)
The NF4 variants stop once the model is ready unless --qlora-steps: torchao dequantizes every NF4 weight in
each forward and backward, which on CPU costs seconds per 2048 x 8192 weight (a step of this model: minutes).
For each: rank 0's model-state bytes (parameters held + fp32 gradients + AdamW state of the trainable ones,
from the start event), every rank's peak RSS (sampled from /proc every 0.1 s), the median step time after the
first step, and their ratios to lora-fp32, and `meshtune validate`'s per-rank total for the same config.
Targets (issue "Memory levers"): NF4 base model state <= 0.2x the fp32 base's; planner within 10% of the peaks.

Measured here (2026-12-07, 2 CPU cores shared with other jobs, 2 steps):
    variant          model state GiB  x fp32  peak RSS GiB  planner GiB  RSS to ready  step s
    lora-fp32                  2.386    1.00          5.55         4.94          2.64    31.3
    lora-bf16                  1.235    0.52             -         2.55          1.61       -
    qlora-nf4                  0.381    0.16             -         0.84          1.62       -
    qlora-nf4-offl             0.381    0.16             -         0.46          1.60       -
NF4 base model state / fp32 base's: 0.160, under the 0.2 target. Before the embedding was quantized (it stayed
fp32: 0.22x of the model on its own) the same run measured 0.807 GiB (0.34x), planner 2.97 GiB, RSS to ready
1.29 GiB. The RSS to ready is now 0.33 GiB higher: loading quantizes each rank's 64K x 2048 fp32 embedding shard
(0.49 GiB) with torchao's `to_nf4`, whose temporaries peak ~0.8 GiB above the shard (measured alone: +0.34 GiB
over a 1.28 GiB process peak that already held two shard-sized tensors). The planner's 4.94 GiB is 11% under
lora-fp32's measured peak RSS, which also holds the process itself (~0.4 GiB of libraries).
Stepped (`--variants qlora-nf4 --qlora-steps --steps 1`, same day, cores shared with tests): qlora-nf4 peak RSS
2.46 GiB, step 115 s (init_from 184 s), against the planner's 0.84 GiB: the planner misses NF4's CPU peak by
66%. Not counted by it: the RSS to ready (1.61 GiB: libraries, and load-time temporaries the allocator keeps),
and torchao's `linear_nf4` dequantizing each whole projection per call (int64 code indices and fp32 copies of a
2048 x 8192 weight, some hundreds of MiB at once).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hf_load import REPO, meshtune_launch, write_checkpoint  # noqa: E402

VARIANTS = {
    "lora-fp32": ((), False),
    "lora-bf16": (("train.dtype=bf16", "train.frozen_dtype=bf16"), True),
    "qlora-nf4": (("recipe.name=qlora",), False),
    "qlora-nf4-offl": (("recipe.name=qlora", "parallel.cpu_offload=true"), False),
}


def predicted(path: Path, extra: tuple[str, ...]) -> float:
    """`meshtune validate`'s per-rank total for the same launch, as configured (bytes)."""
    argv = [sys.executable, "-m", "meshtune", "validate", "finetune/lora-hf-llama", "--world-size", "2",
            f"init_from={path}", "model.max_seq_len=64", "data.seq_len=64", "train.global_batch_size=2",
            "train.micro_batch_size=1", "train.dtype=fp32", *extra]
    out = subprocess.run(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.strip().startswith("as configured"))
    return float(row.rsplit("=", 1)[1].split()[0]) * 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "meshtune-bench-hf-llama32-1b"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--qlora-steps", action="store_true", help="step the NF4 variants too (slow on CPU)")
    args = ap.parse_args()
    path = Path(args.dir)
    nbytes = write_checkpoint(path)
    print(f"checkpoint: {path} ({nbytes / 2**30:.2f} GiB fp32, Llama-3.2-1B shape); 2 ranks, FSDP2, LoRA r=16, "
          f"seq 64, {args.steps} steps")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            extra, stop = VARIANTS[name]
            stop = stop or (name.startswith("qlora") and not args.qlora_steps)
            r = meshtune_launch(path, Path(tmp) / name, (*extra, f"train.steps={args.steps}"), stop)
            steps = [rec["step_time_s"] for rec in r["records"] if "step_time_s" in rec]
            results[name] = {"state": r["marks"]["state_bytes"], "peak": max(r["peak"].values()),
                             "plan": predicted(path, extra),
                             "ready": max(r["loading"].values()),
                             "step": statistics.median(steps[1:] or steps) if steps and not stop else None}
    ref = results.get("lora-fp32")
    print(f"{'variant':<16}{'model state GiB':>16}{'x fp32':>8}{'peak RSS GiB':>14}{'x fp32':>8}"
          f"{'planner GiB':>13}{'RSS to ready':>14}{'step s':>9}{'x fp32':>8}")
    def ratio(r, key):
        return f"{r[key] / ref[key]:.2f}" if ref and r[key] and ref[key] else "-"

    for name, r in results.items():
        step = f"{r['step']:.1f}" if r["step"] else "-"
        peak = "-" if r["step"] is None else f"{r['peak'] / 2**30:.2f}"
        print(f"{name:<16}{r['state'] / 2**30:>16.3f}{ratio(r, 'state'):>8}{peak:>14}"
              f"{ratio(r, 'peak') if peak != '-' else '-':>8}{r['plan'] / 2**30:>13.2f}{r['ready'] / 2**30:>14.2f}"
              f"{step:>9}{ratio(r, 'step'):>8}")
    if ref and "qlora-nf4" in results:
        print(f"NF4 base model state / fp32 base's: {results['qlora-nf4']['state'] / ref['state']:.3f} "
              "(target <= 0.2)")


if __name__ == "__main__":
    main()
