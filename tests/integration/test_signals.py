"""A signal to any part of a `meshtune launch` job ends it with one checkpoint at one step and exit code 75.

SIGTERM or Ctrl-C (SIGINT to the launcher's process group) reach the launcher, which passes the signal on
to torchrun once; SIGUSR1 (SLURM's warning before the time limit) reaches torchrun, which now forwards it
instead of dying of it; SIGTERM may also reach one rank alone. In every case the ranks agree on the step
and the signal, save one checkpoint there, and the launcher exits with exit_codes.STOPPED.
"""

from __future__ import annotations

import os
import signal

import pytest

from meshtune.exit_codes import STOPPED
from tests.integration.jobs import finish, kill_all, records, start, summary, torchrun, wait_for_step, workers

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("target, sig", [
    ("launcher", signal.SIGTERM),
    ("launcher group", signal.SIGINT),  # Ctrl-C on the terminal
    ("torchrun", signal.SIGUSR1),
    ("rank 1", signal.SIGTERM),
])
def test_a_signal_stops_every_rank_at_one_step_with_one_checkpoint(tmp_path, target, sig):
    run_dir = tmp_path / "run"
    proc = start(run_dir, "train.steps=100000")
    wait_for_step(proc, run_dir, 2)
    ranks = workers(proc.pid)
    if target == "launcher":
        os.kill(proc.pid, sig)
    elif target == "launcher group":
        os.killpg(proc.pid, sig)
    elif target == "torchrun":
        os.kill(torchrun(proc.pid), sig)
    else:
        os.kill(ranks[1], sig)
    try:
        code, out = finish(proc)
    finally:
        kill_all(ranks)
    assert code == STOPPED, summary(out)
    stops = [r for r in records(run_dir) if r.get("event") == "stopped"]
    assert len(stops) == 1 and stops[0]["signal"] == sig, (stops, summary(out))
    step = stops[0]["step"]
    assert f"meshtune: stopped at step {step} on {sig.name}; checkpoint saved" in out, summary(out)
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == [f"step_{step:06d}"], ckpts  # one checkpoint (checkpoint.every=0), at the stop
    saved = run_dir / "checkpoints" / ckpts[0]
    assert (saved / "meta.json").is_file() and sorted(p.name for p in (saved / "rng").iterdir()) == \
        ["rank0.pt", "rank1.pt"]  # every rank reached the save
    assert "Traceback" not in out and "SignalException" not in out, summary(out)
