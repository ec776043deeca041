"""`meshtune train CONFIG [k=v ...]`: train in this process, alone or as one rank under torchrun.

SIGTERM (preemption, scancel, torchrun shutting down), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's warning before
the time limit), to any one rank, make every rank checkpoint after the current step and stop: exit code 75
(exit_codes.STOPPED), or 0 for a rank under torchrun, whose launcher then exits 75. A failure is reported as
one line naming the rank, the step and the call it failed in (runtime/watchdog.py names silent peers).
"""

from __future__ import annotations

import os
import sys

from meshtune.cli.common import config_command, load


def add(sub):
    return config_command(sub, "train", "train in this process (alone or as a torchrun rank)")


class _StopSignals:
    """SIGTERM, SIGINT and SIGUSR1 ask the trainer to checkpoint and stop after the current step. Installed
    before the trainer is built, so a signal during start-up (SLURM may send its warning early) is kept
    and passed on once the trainer exists, instead of killing the rank."""

    def __init__(self):
        import signal

        self.trainer, self.pending = None, None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        import signal

        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.trainer is None:
            self.pending = signum
        else:
            self.trainer.request_stop(signum)

    def attach(self, trainer) -> None:
        self.trainer = trainer
        if self.pending is not None:
            trainer.request_stop(self.pending)


def _after_stop(trainer, cfg) -> int:
    """Report a stop on a signal (the checkpoint is saved) and return this process's exit code.

    The first rank of each node prints the line (`meshtune launch` reads it on its node to exit with
    STOPPED). Under torchrun a rank exits 0, so that torchrun neither restarts the group nor reports a
    failure; alone, `meshtune train` exits STOPPED itself."""
    import signal

    from meshtune.exit_codes import OK, STOPPED, STOPPED_LINE

    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        name = signal.Signals(trainer.stop_signal).name
        sys.stderr.write(f"{STOPPED_LINE}{trainer.step} on {name}; checkpoint saved in {cfg.run_dir}/checkpoints, "
                         f"`checkpoint.resume: auto` continues from it (exit code {STOPPED})\n")
        sys.stderr.flush()
    return OK if "TORCHELASTIC_RUN_ID" in os.environ else STOPPED


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
    from torch.distributed.checkpoint import CheckpointException  # a BaseException: caught by name below

    from meshtune.runtime.run import build_trainer
    from meshtune.runtime.watchdog import describe_failure, start_watchdog

    cfg, _, _ = load(args)
    signals = _StopSignals()
    trainer = build_trainer(cfg)
    signals.attach(trainer)
    watchdog = start_watchdog(lambda: trainer.step, cfg.parallel.timeout_s)  # a stuck rank: named, exits
    try:
        summary = trainer.fit()
    except (Exception, CheckpointException) as e:  # name the rank and step: torchrun's summary names neither
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
    import torch.distributed as dist

    if summary["stopped"]:
        code = _after_stop(trainer, cfg)
        if dist.is_initialized():
            dist.destroy_process_group()
        return code
    if dist.is_initialized():
        dist.destroy_process_group()
    last = summary["final_eval"] or {}
    if int(os.environ.get("RANK", "0")) == 0:
        losses = [r["loss"] for r in summary["history"] if "loss" in r]
        print(f"meshtune: done at step {summary['step']}: loss {losses[-1] if losses else float('nan'):.4f}, "
              f"eval accuracy {last.get('eval_accuracy', float('nan')):.3f}; run dir {cfg.run_dir}")
    return 0
