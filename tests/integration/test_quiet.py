"""Runs print what the user needs: a ZeRO-3 launch on 2 ranks and a QAT run + quantized export print none of
DeepSpeed's / torchao's load-time and per-step noise (meshtune.quiet), while real warnings of the same
category, module and logger still print in every process (each torchrun worker is a fresh interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.cases import TINY

NOISE = ("`torch.distributed.all_gather_into_tensor` is deprecated", "`torch.distributed.reduce_scatter_tensor` is "
         "deprecated", "Setting accelerator to CPU", "_C_mxfp8", "_C_cutlass", "KernelPreference",
         "ScaleCalculationMode")

# on the PYTHONPATH of the runs: at exit, after meshtune installed its filters, every process warns for real
REAL_WARNINGS = '''
import atexit, enum, logging, os, warnings

def real_warnings():
    who = "rank " + os.environ.get("RANK", "main")
    warnings.warn("real FutureWarning from " + who, FutureWarning)
    warnings.warn_explicit("`torch.distributed.broadcast_object_list` is deprecated, from " + who, FutureWarning,
                           "c10d_logger.py", 83, module="torch.distributed.c10d_logger")
    logging.getLogger("torch.utils._pytree").warning("%s is an Enum subclass (real, from %s)",
                                                     enum.Enum("Mine", "A"), who)
    logging.getLogger("torchao").warning("Failed to load /x/_C.abi3.so: real, from %s", who)
    logging.getLogger("DeepSpeed").warning("real DeepSpeed warning from %s", who)

atexit.register(real_warnings)
'''
REAL = ("real FutureWarning from {}", "`torch.distributed.broadcast_object_list` is deprecated, from {}",
        "is an Enum subclass (real, from {})", "Failed to load /x/_C.abi3.so: real, from {}",
        "real DeepSpeed warning from {}")


def meshtune(tmp_path: Path, *argv: str) -> str:
    """stdout + stderr of `python -m meshtune ARGV`, which must succeed."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(REAL_WARNINGS)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(Path(__file__).resolve().parents[2]),
                                         env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "meshtune", *argv], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"exit {result.returncode}\n{out[-3000:]}"
    return out


def assert_quiet(out: str, processes: list[str]) -> None:
    noise = [line for line in out.splitlines() if any(n in line for n in NOISE)]
    assert not noise, "\n".join(noise[:10])
    for who in processes:
        for real in REAL:
            assert real.format(who) in out, (real.format(who), out[-3000:])


@pytest.mark.slow
def test_deepspeed_zero3_on_two_ranks_prints_no_noise(tmp_path):
    out = meshtune(tmp_path, "launch", "pretrain/tiny", "--nproc-per-node", "2", *TINY, "train.steps=2",
                   "train.micro_batch_size=4", f"run_dir={tmp_path / 'run'}", "parallel.engine=deepspeed",
                   "parallel.zero_stage=3")
    assert "done at step 2" in out
    assert_quiet(out, ["rank 0", "rank 1"])


@pytest.mark.slow
def test_qat_run_and_quantized_export_print_no_torchao_noise(tmp_path):
    run_dir = tmp_path / "run"
    out = meshtune(tmp_path, "train", "finetune/qat", *TINY, "train.steps=2", f"run_dir={run_dir}",
                   "checkpoint.save_final=true")
    assert "done at step 2" in out
    assert_quiet(out, ["rank main"])
    out = meshtune(tmp_path, "export", str(run_dir), "--format", "quantized")
    assert "model_quantized.pt" in out
    assert_quiet(out, ["rank main"])
