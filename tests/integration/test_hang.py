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

import pytest

from tests.integration.jobs import finish, kill_all, start, summary, wait_for_step, workers

pytestmark = pytest.mark.slow
TIMEOUT_S = 3
HANG = [f"parallel.timeout_s={TIMEOUT_S}", "train.steps=1000"]


def test_a_stopped_rank_is_named_and_the_job_fails(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, *HANG)
    wait_for_step(proc, run_dir, 2)
    ranks = workers(proc.pid)
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGSTOP)  # rank 1 (local rank order = start order)
    try:
        code, out = finish(proc)
    finally:
        kill_all(ranks)
    assert code != 0, summary(out)
    # the peer names itself and the collective it waited in (all_gather, reduce_scatter, all_reduce...)
    assert re.search(r"^meshtune: rank 0 (failed at step \d+ in|stuck in) \w*(all|reduce|barrier)\w* ", out, re.M), \
        summary(out)
    assert "no heartbeat from rank(s) 1 " in out and "killed frozen rank(s) 1" in out, summary(out)


def test_a_rank_stuck_before_a_collective_reports_itself(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, *HANG, MESHTUNE_FAULT="hang:1:3", MESHTUNE_FAULT_MARK=str(tmp_path / "stuck"))
    code, out = finish(proc)
    assert (tmp_path / "stuck").exists(), summary(out)
    assert code != 0, summary(out)
    assert "meshtune: rank 1 stuck in _sleep at step 3 for " in out, summary(out)
    assert "meshtune/runtime/trainer.py" in out.split("meshtune: rank 1 stuck in")[1].splitlines()[0]
    assert "killed frozen rank(s) 0" not in out, summary(out)  # rank 0 only exited after its own timeout


def test_a_stopped_rank_0_is_named_and_the_job_ends(tmp_path):
    """Rank 0 hosts the job's store: its peer's heartbeat (and every other store call) waits for it with a
    deadline, so the peer names rank 0 as unreachable, kills it and exits, within timeout_s + 10 s."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, *HANG)
    wait_for_step(proc, run_dir, 2)
    ranks = workers(proc.pid)
    os.kill(ranks[0], signal.SIGSTOP)
    try:
        code, out = finish(proc, timeout=60)  # it hung forever before; bench/bench_faults.py times it
    finally:
        kill_all(ranks)
    assert code != 0, summary(out)
    assert re.search(r"^meshtune: rank 1 ", out, re.M) and "(rank 0) is frozen or dead" in out, summary(out)
    assert "killed frozen rank(s) 0" in out, summary(out)
