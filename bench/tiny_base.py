"""The trained pretrain/tiny model both bench_distill.py (the teacher) and bench_prune.py (the base) start from.

    python bench/bench_distill.py --teacher runs/bench-sort     # trains it there once
    python bench/bench_prune.py --base runs/bench-sort          # reuses it (same task and steps)

One process, world size 1: the tiny config (dim 128 x 3 layers, global batch 32, lr 3e-3 cosine) on a bundled
task, checkpointed at its last step; a run dir that already holds that step is resumed, so nothing is trained
again. Both benches build it from this one function, so their configs match and the dir can be shared.
"""

from __future__ import annotations

import time
from pathlib import Path


def base_config(run_dir: Path, task: str, steps: int, num_eval: int, *extra: str):
    from meshtune.schema import load_config

    return load_config("pretrain/tiny", [
        f"run_dir={run_dir}", f"data.task={task}", f"data.num_eval={num_eval}", f"train.steps={steps}",
        "train.eval_every=0", "train.eval_batches=0", "train.global_batch_size=32", "train.micro_batch_size=32",
        "checkpoint.every=0", "checkpoint.save_final=true", "checkpoint.resume=auto", "metrics.progress=false",
        "train.log_every=1000000", *extra])


def train_base(run_dir: Path, task: str, steps: int, num_eval: int, *extra: str):
    """(trainer at its last step, how it got there: "trained in N s" or "reused from DIR")."""
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer

    trainer = build_trainer(base_config(run_dir, task, steps, num_eval, *extra), DistEnv())
    t0, reused = time.perf_counter(), trainer.step == steps
    trainer.fit()  # nothing to do when resumed at the last step
    return trainer, f"reused from {run_dir}" if reused else f"trained in {time.perf_counter() - t0:.0f} s"
