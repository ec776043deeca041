"""Helpers for tests that start `meshtune launch` (2 CPU ranks through torchrun) and fault it from outside:
start it in a session of its own, find torchrun and the ranks, wait for a step, and finish within a bound."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAULTS = REPO / "tests" / "infra" / "faultinject"
TRAIN = ["train.log_every=1", "train.eval_every=0", "checkpoint.every=0", "data.num_train=512",
         "metrics.progress=false"]


def start(run_dir: Path, *args: str, **env: str) -> subprocess.Popen:
    """`meshtune launch pretrain/tiny --nproc-per-node 2 run_dir=RUN_DIR ARGS...`, output merged into stdout."""
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    full["PYTHONPATH"] = os.pathsep.join([str(FAULTS), str(REPO)])
    full.update(env)
    argv = [sys.executable, "-m", "meshtune", "launch", "pretrain/tiny", "--nproc-per-node", "2",
            f"run_dir={run_dir}", *TRAIN, *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=full,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """(exit code, output) once the launcher ends; an AssertionError if it runs `timeout` s more."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        ranks = descendants(proc.pid)  # the ranks run in sessions of their own: a group kill misses them
        os.killpg(proc.pid, signal.SIGKILL)
        kill_all(ranks)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"the job still ran {timeout} s after the fault:\n{out[-4000:]}") from None
    return proc.returncode, out


def summary(out: str) -> str:
    """meshtune's own lines first (torchrun's failure report would push them out of a plain tail)."""
    return "\n".join(line for line in out.splitlines() if line.startswith("meshtune")) + "\n...\n" + out[-1500:]


def children(pid: int) -> list[int]:
    r = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return sorted(int(x) for x in r.stdout.split())


def descendants(pid: int) -> list[int]:
    found = children(pid)
    return found + [d for c in found for d in descendants(c)]


def torchrun(launcher: int) -> int:
    """torchrun's pid: the launcher's only child."""
    (pid,) = children(launcher)
    return pid


def workers(launcher: int) -> list[int]:
    """The ranks' pids, in rank order (local rank order = start order): the children of torchrun."""
    return sorted(w for t in children(launcher) for w in children(t))


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not any(r.get("step") == step and "loss" in r for r in records(run_dir)):
        assert proc.poll() is None and time.monotonic() < deadline, summary(finish(proc, 10)[1])
        time.sleep(0.1)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
