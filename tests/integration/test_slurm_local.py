"""`meshtune slurm` on a real single-node SLURM cluster that the test starts (tests/infra/slurm_local.py).

Needs root and Debian's slurm packages (installed on first use, ~15 s); skipped with the reason otherwise.
A 2-rank training job runs to completion through the rendered script; a running job is cancelled; a job
that reaches its real time limit gets SIGUSR1, stops at one step with a checkpoint there, is requeued,
resumes and ends with the uninterrupted run's loss.
Every wait is bounded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.infra.slurm_local import LocalSlurm

pytestmark = [pytest.mark.slow, pytest.mark.infra]
REPO = Path(__file__).resolve().parents[2]
TRAIN = ["train.eval_every=1000", "checkpoint.every=1000", "train.log_every=10", "data.num_train=512",
         "metrics.progress=false"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    slurm = LocalSlurm.start_or_skip(tmp_path_factory.mktemp("slurm"))
    yield slurm
    slurm.stop()


def meshtune(cluster: LocalSlurm, *args: str, timeout: float = 180, env: dict | None = None
             ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in {**cluster.env, **(env or {})}.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "meshtune", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)


def submit(cluster: LocalSlurm, run_dir: Path, *extra: str, time_limit: str = "15", env: dict | None = None) -> str:
    result = meshtune(cluster, "slurm", "submit", "pretrain/tiny", "--nodes", "1", "--gpus-per-node", "0",
                      "--tasks-per-node", "2", "--time", time_limit, f"run_dir={run_dir}", *TRAIN, *extra, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def job_log(run_dir: Path, job: str) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(run_dir.glob(f"slurm-{job}.*")))


def wait_for(ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.25)
    raise AssertionError(f"{what} not within {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """A 2-rank job of 40 steps, with a hostile job name and override; returns (run_dir, job id, name)."""
    tmp = tmp_path_factory.mktemp("run")
    sentinel = tmp / "pwned"
    name = f"n$(touch {sentinel})`touch {sentinel}`\"';x # y \\ z"
    run_dir = tmp / "plain run"
    job = submit(cluster, run_dir, "--job-name", name, "train.steps=40",
                 f"metrics.wandb_project=a\n#PBS -N evil\n$(touch {sentinel})'\"")
    state = cluster.wait_job(job, timeout=300)
    assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", (state, job_log(run_dir, job))
    assert not sentinel.exists()
    return run_dir, job, name


def test_two_rank_job_trains_and_checkpoints(cluster, uninterrupted):
    run_dir, job, name = uninterrupted
    curve = losses(run_dir)
    assert sorted(curve) == [10, 20, 30, 40]
    assert curve[40] < curve[10]
    ckpt = run_dir / "checkpoints" / "step_000040"
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 40
    log = job_log(run_dir, job)
    assert "done at step 40" in log and "rendezvous at" in log
    # sbatch read the #SBATCH name exactly, and no #PBS line from inside an override
    assert f"JobName={name}" in cluster.run(["scontrol", "show", "job", job]).stdout.splitlines()[0]

    status = meshtune(cluster, "slurm", "status", job)
    assert status.returncode == 0 and f"job {job}: COMPLETED, exit code 0:0" in status.stdout, status.stderr
    logs = meshtune(cluster, "slurm", "logs", job)
    assert logs.returncode == 0 and "done at step 40" in logs.stdout


def test_cancel_a_running_job(cluster, tmp_path):
    job = submit(cluster, tmp_path / "run", "train.steps=100000")
    cluster.wait_state(job, "RUNNING", timeout=60)
    result = meshtune(cluster, "slurm", "cancel", job)
    assert result.returncode == 0 and "cancel requested" in result.stdout, result.stderr
    assert cluster.wait_job(job, timeout=120).get("JobState") == "CANCELLED"


def test_time_limit_signal_stops_every_rank_at_one_step_requeues_and_resumes(cluster, uninterrupted, tmp_path):
    """The real time limit: `--time 2 --signal-before 40` asks for SIGUSR1 80 s into the job (SLURM may send
    it up to 60 s earlier), and every step sleeps 2 s (tests/infra/faultinject), so the first run is always
    cut short. No periodic checkpoint: the only one is the stop's. Every rank stops at one step, the
    checkpoint there holds every rank's state, the script requeues the job and exits 75, and the resumed
    run ends with the uninterrupted run's final loss."""
    run_dir = tmp_path / "run"
    slow = {"MESHTUNE_FAULT": "slow:2", "PYTHONPATH": f"{REPO / 'tests' / 'infra' / 'faultinject'}:{REPO}"}
    job = submit(cluster, run_dir, "train.steps=40", "--signal-before", "40", time_limit="2", env=slow)
    wait_for(lambda: cluster.job_state(job).get("Restarts") == "1" and
             cluster.job_state(job).get("JobState") == "PENDING", 240, "the time-limit signal and the requeue")
    first = job_log(run_dir, job)
    stops = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r.get("event") == "stopped"]
    assert len(stops) == 1 and stops[0]["signal"] == 10, (stops, first)  # SIGUSR1, agreed by every rank
    step = stops[0]["step"]
    assert 0 < step < 40, (step, first)
    assert f"meshtune: stopped at step {step} on SIGUSR1" in first and "requeueing job" in first, first
    saved = run_dir / "checkpoints" / f"step_{step:06d}"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [saved.name], first
    assert sorted(p.name for p in (saved / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]
    # time enough for the rest (no second signal); the requeue hold is cred_expire + 1 s (tests/infra/slurm_local)
    cluster.run(["scontrol", "update", f"jobid={job}", "TimeLimit=15"])
    state = cluster.wait_job(job, timeout=300)
    log = job_log(run_dir, job)
    assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", (state, log)
    assert f"resumed from {saved}" in log, log
    assert losses(run_dir)[40] == losses(uninterrupted[0])[40]  # the same curve as the uninterrupted run
