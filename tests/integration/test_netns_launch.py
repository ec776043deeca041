"""`meshtune launch` on two fake hosts (network namespaces, tests/infra/netns.py): 2 nodes x 2 ranks, c10d.

An uninterrupted 4-rank run trains, logs and checkpoints; a second run loses one worker to SIGKILL after
its first checkpoint, torchrun (`--max-restarts 1`) restarts the group on both nodes, `resume: auto`
continues from the newest complete checkpoint, and the run ends with the uninterrupted run's final loss,
bit for bit. Needs root; skipped with the reason otherwise. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.infra.netns import NetnsHosts

pytestmark = [pytest.mark.slow, pytest.mark.infra]
REPO = Path(__file__).resolve().parents[2]
STEPS = 24
TRAIN = [f"train.steps={STEPS}", "train.micro_batch_size=8", "train.eval_every=1000", "checkpoint.every=8",
         "train.log_every=1", "data.num_train=512", "data.num_eval=32", "metrics.progress=false"]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    h = NetnsHosts.start_or_skip(tmp_path_factory.mktemp("netns"), nodes=2)
    yield h
    h.stop()


def start_job(hosts: NetnsHosts, run_dir: Path, rdzv_id: str, port: int) -> list[subprocess.Popen]:
    """The same `meshtune launch` on both nodes; nodes meet at node0:port."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT",
                                                             "MASTER_ADDR")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = ["timeout", "-s", "KILL", "420", sys.executable, "-m", "meshtune", "launch", "pretrain/tiny",
            "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-endpoint", f"node0:{port}", "--rdzv-id", rdzv_id,
            "--max-restarts", "1", f"run_dir={run_dir}", *TRAIN]
    return [hosts.popen(i, argv, log=run_dir.parent / f"{run_dir.name}.node{i}.log", cwd=REPO, env=env)
            for i in range(2)]


def wait_job(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    return codes


def logs(run_dir: Path) -> str:
    return "\n".join(f"==> node{i} <==\n" + (run_dir.parent / f"{run_dir.name}.node{i}.log").read_text()[-4000:]
                     for i in range(2))


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss; a resumed run logs some steps twice: the last line per step wins."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def worker_pids(hosts: NetnsHosts, node: int) -> list[int]:
    """The `meshtune train` ranks running in that node (not torchrun or the launcher)."""
    found = []
    for pid in hosts.pids(node):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in cmd and not {b"launch", b"torch.distributed.run", b"meshtune.launch.gate"} & set(cmd):
            found.append(pid)
    return sorted(found)


@pytest.fixture(scope="module")
def uninterrupted(hosts, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    procs = start_job(hosts, run_dir, "plain", 29511)
    codes = wait_job(procs, 420)
    assert codes == [0, 0], (codes, logs(run_dir))
    return run_dir


def test_two_nodes_train_with_c10d(uninterrupted):
    run_dir = uninterrupted
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert curve[STEPS] < curve[1]
    ckpt = run_dir / "checkpoints" / f"step_{STEPS:06d}"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == STEPS and "dp_shard=4" in json.dumps(meta["layout"]), meta["layout"]
    text = logs(run_dir)
    assert f"done at step {STEPS}" in text and "resumed" not in text, text


def test_killed_worker_restarts_and_resumes_with_the_same_loss(hosts, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    procs = start_job(hosts, run_dir, "killed", 29512)
    deadline = time.monotonic() + 300
    while not (losses(run_dir).get(10) is not None and (run_dir / "checkpoints" / "step_000008").is_dir()):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs(run_dir)
        time.sleep(0.1)
    victims = worker_pids(hosts, 1)
    assert len(victims) == 2, victims
    os.kill(victims[-1], signal.SIGKILL)
    codes = wait_job(procs, 420)
    text = logs(run_dir)
    assert codes == [0, 0], (codes, text)
    assert "resumed from" in text and ("at step 8" in text or "at step 16" in text), text
    assert losses(run_dir)[STEPS] == losses(uninterrupted)[STEPS]  # bitwise: same layout, same data order
