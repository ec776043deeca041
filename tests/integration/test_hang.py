"""A stuck rank fails the job with a message naming the rank and the operation, instead of hanging.

Two ranks under `meshtune launch` with `parallel.timeout_s=3`: one rank is frozen with SIGSTOP (its peer's
collective times out, names the operation, and its heartbeat check names and kills the frozen rank), or
sleeps before a collective (tests/infra/faultinject: its own watchdog reports where it is stuck). The
detection time is measured by bench/bench_faults.py; here every wait is only bounded.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
FAULTS = REPO / "tests" / "infra" / "faultinject"
TIMEOUT_S = 3


def start(run_dir: Path, **env: str) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    full["PYTHONPATH"] = os.pathsep.join([str(FAULTS), str(REPO)])
    full.update(env)
    argv = [sys.executable, "-m", "meshtune", "launch", "pretrain/tiny", "--nproc-per-node", "2",
            f"run_dir={run_dir}", f"parallel.timeout_s={TIMEOUT_S}", "train.steps=1000", "train.log_every=1",
            "train.eval_every=0", "checkpoint.every=0", "data.num_train=512", "metrics.progress=false"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=full,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"the job still ran {timeout} s after the fault:\n{out[-4000:]}") from None
    return proc.returncode, out


def summary(out: str) -> str:
    """meshtune's own lines first (torchrun's failure report would push them out of a plain tail)."""
    return "\n".join(line for line in out.splitlines() if line.startswith("meshtune")) + "\n...\n" + out[-1500:]


def workers(launcher: int) -> list[int]:
    """The ranks: children of torchrun, the launcher's child."""
    def children(pid: int) -> list[int]:
        r = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
        return [int(x) for x in r.stdout.split()]

    return sorted(w for t in children(launcher) for w in children(t))


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and f'"step": {step},' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, summary(finish(proc, 10)[1])
        time.sleep(0.1)


def test_a_stopped_rank_is_named_and_the_job_fails(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for_step(proc, run_dir, 2)
    ranks = workers(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGSTOP)  # rank 1 (local rank order = start order)
    try:
        code, out = finish(proc)
    finally:
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert code != 0, summary(out)
    # the peer names itself and the collective it waited in (all_gather, reduce_scatter, all_reduce...)
    assert re.search(r"^meshtune: rank 0 (failed at step \d+ in|stuck in) \w*(all|reduce|barrier)\w* ", out, re.M), \
        summary(out)
    assert "no heartbeat from rank(s) 1 " in out and "killed frozen rank(s) 1" in out, summary(out)


def test_a_rank_stuck_before_a_collective_reports_itself(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, MESHTUNE_FAULT="hang:1:3", MESHTUNE_FAULT_MARK=str(tmp_path / "stuck"))
    code, out = finish(proc)
    assert (tmp_path / "stuck").exists(), summary(out)
    assert code != 0, summary(out)
    assert "meshtune: rank 1 stuck in _sleep at step 3 for " in out, summary(out)
    assert "meshtune/runtime/trainer.py" in out.split("meshtune: rank 1 stuck in")[1].splitlines()[0]
    assert "killed frozen rank(s) 0" not in out, summary(out)  # rank 0 only exited after its own timeout
