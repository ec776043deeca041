"""`meshtune slurm submit --nodes 2` on a 2-node SLURM cluster of network namespaces (tests/infra/slurm_netns.py).

The rendered script runs one torchrun per node under srun; the nodes meet at a c10d rendezvous on the first
node of the allocation, across the namespaces' network, and 2 x 2 ranks train to completion. Needs root and
Debian's slurm packages; skipped with the reason otherwise. Every wait is bounded.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from tests.infra.slurm_netns import NetnsSlurm

pytestmark = [pytest.mark.slow, pytest.mark.infra]
REPO = Path(__file__).resolve().parents[2]
STEPS = 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    slurm = NetnsSlurm.start_or_skip(tmp_path_factory.mktemp("slurmns"), nodes=2)
    yield slurm
    slurm.stop()


def test_two_node_job_trains_across_the_nodes(cluster, tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    submit = cluster.run([sys.executable, "-m", "meshtune", "slurm", "submit", "pretrain/tiny", "--nodes", "2",
                          "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "15", f"run_dir={run_dir}",
                          f"train.steps={STEPS}", "train.micro_batch_size=8", "train.eval_every=1000",
                          "checkpoint.every=12", "train.log_every=4", "data.num_train=512", "data.num_eval=32",
                          "metrics.progress=false"], timeout=180, cwd=REPO, env=env)
    job = submit.stdout.strip()
    state = cluster.wait_job(job, timeout=420)
    log = "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(run_dir.glob(f"slurm-{job}.*")))
    assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", (state, log)
    assert "on node[0-1]" in log and "rendezvous at node0:29500" in log, log
    assert f"done at step {STEPS}" in log, log

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(curve) == list(range(4, STEPS + 1, 4))
    assert all(math.isfinite(v) for v in curve.values()) and curve[STEPS] < curve[4]
    meta = json.loads((run_dir / "checkpoints" / f"step_{STEPS:06d}" / "meta.json").read_text())
    assert meta["step"] == STEPS and "dp_shard=4" in meta["layout"], meta  # 2 nodes x 2 ranks, one FSDP group
    info = cluster.run(["scontrol", "show", "job", job]).stdout
    assert "NumNodes=2" in info, info
