"""A full disk during a save, and a read-only run dir: one line each naming the path and the cause, the last
good checkpoint kept, nothing half-written left. Real file systems: a small tmpfs (needs root for `mount`;
skipped with the reason otherwise)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.integration.jobs import REPO, TRAIN, summary

pytestmark = pytest.mark.slow


@pytest.fixture
def mount(tmp_path):
    """mount(size, read_only=False) -> a fresh tmpfs folder of `size` (e.g. "10m"), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def make(size: str, read_only: bool = False):
        path = tmp_path / f"mnt{len(mounted)}"
        path.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def launch(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    argv = [sys.executable, "-m", "meshtune", "launch", "pretrain/tiny", "--nproc-per-node", "2", *TRAIN, *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_a_full_disk_during_a_save_is_one_line_per_rank_and_keeps_the_last_checkpoint(mount):
    run_dir = mount("10m") / "run"  # one checkpoint of pretrain/tiny is ~7.4 MB: the second does not fit
    result = launch(f"run_dir={run_dir}", "train.steps=6", "checkpoint.every=2")
    out = result.stdout + result.stderr
    assert result.returncode == 1, summary(out)
    failed = [line for line in result.stderr.splitlines() if line.startswith("meshtune: rank ")]
    assert failed and all("CheckpointWriteError: checkpoint: cannot write " in line and
                          "step_000004.tmp: No space left on device" in line and
                          "the last complete checkpoint step_000002 is kept" in line for line in failed), summary(out)
    assert "Traceback" not in out and "unexpected pos" not in out, summary(out)
    assert len([line for line in result.stderr.splitlines() if line.strip()]) <= len(failed) + 1, result.stderr
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_000002"] and (run_dir / "checkpoints" / "step_000002" / "meta.json").is_file(), ckpts


def test_a_read_only_run_dir_is_one_line_before_any_rank_starts(mount):
    run_dir = mount("1m", read_only=True) / "run"
    result = launch(f"run_dir={run_dir}", "train.steps=2")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"meshtune: error: run_dir: {run_dir.parent} is not writable (a read-only "
                                     "file system); give a run_dir you can write"), result.stderr
