"""End to end: `meshtune launch` on 2 CPU ranks through torchrun, then a longer run that resumes from it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshtune.schema import load_config

REPO = Path(__file__).resolve().parents[2]


def launch(run_dir: Path, steps: int) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "meshtune", "launch", "pretrain/tiny", "--nproc-per-node", "2",
            f"run_dir={run_dir}", f"train.steps={steps}", "train.eval_every=15", "checkpoint.every=15",
            "data.num_train=1024", "metrics.progress=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=run_dir.parent, env=env)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.mark.slow
def test_launch_two_ranks_then_resume(tmp_path):
    run_dir = tmp_path / "run"

    # 30 steps on 2 ranks (FSDP2 over dp_shard=2): log every 10, evaluate and checkpoint every 15
    first = launch(run_dir, steps=30)
    assert "resumed" not in first.stdout
    assert "done at step 30" in first.stdout
    train, evals = read_metrics(run_dir)
    assert [r["step"] for r in train] == [10, 20, 30]
    assert all(math.isfinite(r["loss"]) for r in train)
    assert train[-1]["loss"] < train[0]["loss"], [r["loss"] for r in train]
    assert [r["step"] for r in evals] == [15, 30]
    assert all(math.isfinite(r["eval_loss"]) and 0 <= r["eval_accuracy"] <= 1 for r in evals)

    cfg = load_config(run_dir / "config.yaml")  # the resolved config, loadable as is
    assert (cfg.run_dir, cfg.train.steps, cfg.data.num_train, cfg.checkpoint.keep_last) == (str(run_dir), 30, 1024, 2)
    assert checkpoints(run_dir) == ["step_000015", "step_000030"]  # keep_last=2, no .tmp left behind
    meta = json.loads((run_dir / "checkpoints" / "step_000030" / "meta.json").read_text())
    assert meta["step"] == 30

    # the same command with more steps continues from step 30 instead of starting over
    second = launch(run_dir, steps=40)
    assert "resumed from" in second.stdout and "at step 30" in second.stdout, second.stdout
    train2, evals2 = read_metrics(run_dir)
    assert train2[: len(train)] == train and evals2[: len(evals)] == evals  # metrics.jsonl is appended to
    new_train, new_evals = train2[len(train):], evals2[len(evals):]
    assert [r["step"] for r in new_train] == [40] and [r["step"] for r in new_evals] == [40]
    assert new_train[0]["loss"] < train[0]["loss"]  # it kept the trained weights
    assert load_config(run_dir / "config.yaml").train.steps == 40
    assert checkpoints(run_dir) == ["step_000030", "step_000040"]  # step 15 pruned by keep_last=2
    assert (run_dir / "checkpoints" / "step_000040" / "meta.json").is_file()


def test_a_failure_only_a_worker_can_see_is_its_line_then_one_summary_line(tmp_path):
    """A loss that diverges (only training finds it): each rank's one line, then torchrun's failure banner
    condensed to one line; no traceback on the terminal (it is in RUN_DIR/logs), the exit code kept."""
    run_dir = tmp_path / "nan"
    argv = [sys.executable, "-m", "meshtune", "launch", "pretrain/tiny", "--nproc-per-node", "2", "model.dim=32",
            "model.n_layers=1", "train.steps=6", "train.log_every=1", "optim.lr=1e30", "optim.warmup_steps=0",
            f"run_dir={run_dir}", "metrics.progress=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith("meshtune: rank ")]
    assert failed and all("FloatingPointError: step " in line and "loss is nan" in line for line in failed), lines
    assert lines[-1].startswith("meshtune launch: torchrun: rank ") and "exited with code 1" in lines[-1], lines
    assert len(lines) == len(failed) + 1, lines  # nothing else: no traceback, no ChildFailedError banner
    rank = failed[0].split()[2]
    assert "FloatingPointError" in (run_dir / "logs" / f"rank{rank}-traceback.txt").read_text()
