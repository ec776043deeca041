"""`meshtune train CONFIG [k=v ...]`: train in this process, alone or as one rank under torchrun.

SIGTERM (preemption, scancel, torchrun shutting down) and SIGUSR1 (SLURM's warning before the time limit)
make every rank checkpoint after the current step and stop; a failure is reported as one line naming the
rank, the step and the call it failed in (runtime/watchdog.py names silent peers).
"""

from __future__ import annotations

import os
import sys

from meshtune.cli.common import config_command, load


def add(sub):
    return config_command(sub, "train", "train in this process (alone or as a torchrun rank)")


def _stop_on_signals(trainer) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: trainer.request_stop(signum))


def _after_stop(trainer, cfg) -> None:
    """Report the stop; under SLURM, a time-limit stop (SIGUSR1) requeues the job, which resumes."""
    import signal
    import subprocess

    if int(os.environ.get("RANK", "0")) != 0:
        return
    name = signal.Signals(trainer.stop_signal).name
    print(f"meshtune: stopped at step {trainer.step} on {name}; checkpoint saved in {cfg.run_dir}/checkpoints, "
          "`checkpoint.resume: auto` continues from it", flush=True)
    job = os.environ.get("SLURM_JOB_ID")
    if job and trainer.stop_signal == signal.SIGUSR1:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        print(f"meshtune: scontrol requeue {job}: " + ("ok" if result.returncode == 0 else result.stderr.strip()),
              flush=True)


def _save_traceback(run_dir: str, rank: str) -> str:
    """The current exception's traceback into RUN_DIR/logs/rank<N>-traceback.txt: the terminal gets one line
    (`MESHTUNE_TRACEBACK=1` prints the traceback instead). Returns the text that points at the file."""
    import traceback
    from pathlib import Path

    path = Path(run_dir) / "logs" / f"rank{rank}-traceback.txt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(traceback.format_exc())
    except OSError:
        return ""
    return f" (traceback: {path})"


def run(args) -> int:
    from meshtune.runtime.run import build_trainer
    from meshtune.runtime.watchdog import describe_failure, start_watchdog

    cfg, _, _ = load(args)
    trainer = build_trainer(cfg)
    _stop_on_signals(trainer)
    watchdog = start_watchdog(lambda: trainer.step, cfg.parallel.timeout_s)  # a stuck rank: named, exits
    try:
        summary = trainer.fit()
    except Exception as e:  # name the rank and step: torchrun's summary names neither the cause nor them
        first = (str(e).strip().splitlines() or [""])[0][:300]
        rank = os.environ.get("RANK", "0")
        where = _save_traceback(cfg.run_dir, rank)
        # one write: ranks share torchrun's stderr, and a write under PIPE_BUF bytes is never interleaved
        sys.stderr.write(f"meshtune: rank {rank} failed at step {trainer.step}{describe_failure(e)}: "
                         f"{type(e).__name__}: {first}{where}\n")
        sys.stderr.flush()
        if watchdog is not None:
            watchdog.after_failure(e)  # a broken collective: names the silent peers and exits right away
        if os.environ.get("MESHTUNE_TRACEBACK"):
            raise
        return 1
    finally:
        if watchdog is not None:
            watchdog.stop()
    if summary["stopped"]:
        _after_stop(trainer, cfg)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    last = summary["final_eval"] or {}
    if int(os.environ.get("RANK", "0")) == 0:
        losses = [r["loss"] for r in summary["history"] if "loss" in r]
        print(f"meshtune: done at step {summary['step']}: loss {losses[-1] if losses else float('nan'):.4f}, "
              f"eval accuracy {last.get('eval_accuracy', float('nan')):.3f}; run dir {cfg.run_dir}")
    return 0
