"""Tests of the `meshtune` command line, run as a real process where exit codes, stderr and imports matter."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from meshtune import config as C
from meshtune import schema as S

REPO = Path(__file__).resolve().parents[2]
TINY = "pretrain/tiny"


def _env() -> dict:
    # a stray RANK would make the CLI stay silent (it reports errors on rank 0 only)
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}


def python(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=_env())


def meshtune(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return python("-m", "meshtune", *args, timeout=timeout)


def assert_config_error(result: subprocess.CompletedProcess, key: str) -> str:
    """Exit code 2, exactly one stderr line `meshtune: error: ...` naming `key`, and no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("meshtune: error: "), lines[0]
    assert key in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


# ---- no torch on the fast paths -------------------------------------------------------------------------


def test_import_does_not_import_torch():
    code = ("import sys, meshtune, meshtune.cli, meshtune.config, meshtune.launch.torchrun, meshtune.launch.slurm\n"
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "assert not bad, bad[:5]")
    result = python("-c", code)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["ls"], ["launch", TINY, "--dry-run"]])
def test_fast_commands_do_not_import_torch(argv):
    code = (f"import sys\nfrom meshtune.cli import main\n"
            f"try:\n    rc = main({argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
            "assert rc == 0, rc\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = python("-c", code)
    assert result.returncode == 0, result.stderr


def test_help_exits_zero_without_torch_and_is_timed():
    result = python("-X", "importtime", "-m", "meshtune", "--help")
    assert result.returncode == 0, result.stderr
    for sub in ("ls", "train", "launch", "validate", "demo"):
        assert sub in result.stdout
    report = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    imported = [line.rsplit("|", 1)[-1].strip() for line in report]
    assert "meshtune.cli" in imported  # the importtime report is what we think it is
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")]

    start = time.perf_counter()
    result = meshtune("--help")
    wall = time.perf_counter() - start
    assert result.returncode == 0
    print(f"\n`python -m meshtune --help` wall time: {wall:.3f} s (target < 0.3 s; not asserted)")


def test_version():
    from meshtune import __version__

    result = meshtune("--version")
    assert result.returncode == 0 and __version__ in result.stdout


# ---- help, ls --------------------------------------------------------------------------------------------


def test_train_help_lists_config_keys_with_docstrings():
    result = meshtune("train", "--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "usage: meshtune train" in out and "key=value" in out
    hints = typing.get_type_hints(S.Config)
    for section in S.SECTIONS:
        cls = hints[section]
        docs = C.field_docs(cls)
        nested = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name}:" in out
            if dataclasses.is_dataclass(nested[f.name]):  # a sub-section (recipe.lora): its keys are listed
                assert f"  {section}.{f.name}.{dataclasses.fields(nested[f.name])[0].name}:" in out
            else:
                assert " ".join(docs[f.name].split()) in out
    assert "Peak learning rate" in out


@pytest.mark.parametrize("command", ["validate", "launch"])
def test_validate_and_launch_help_list_config_keys(command):
    result = meshtune(command, "--help")
    assert result.returncode == 0
    assert "optim.lr:" in result.stdout and "checkpoint.keep_last:" in result.stdout
    if command == "launch":
        assert "--nproc-per-node" in result.stdout and "--dry-run" in result.stdout


def test_ls_lists_bundled_configs():
    result = meshtune("ls")
    assert result.returncode == 0
    names = result.stdout.split()
    assert TINY in names
    assert names == C.bundled_configs()


# ---- config errors through the CLI ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, key",
    [
        (["validate", TINY, "model.dimm=3"], "model.dimm"),
        (["validate", TINY, "optim.lr=abc"], "optim.lr"),
        (["validate", TINY, "optim.schedule=linear"], "optim.schedule"),
        (["validate", TINY, "model.dim=130"], "model.dim"),
        (["validate", "pretrain/nope"], "pretrain/nope"),
        (["train", TINY, "train.steps=0"], "train.steps"),  # fails before any training starts
        (["launch", TINY, "checkpoint.keep_last=0"], "checkpoint.keep_last"),  # before torchrun starts
        (["launch", TINY, "--nproc-per-node", "0", "--dry-run"], "--nproc-per-node"),
        (["validate", TINY, "train.steps=5", "oops"], "oops"),  # a stray word, not key=value
        (["train", TINY, "steps"], "steps"),
    ],
)
def test_config_error_is_one_line_exit_2(argv, key):
    assert_config_error(meshtune(*argv), key)


def test_invalid_yaml_via_cli(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  task: [reverse\n")
    line = assert_config_error(meshtune("validate", str(path)), str(path))
    assert "line" in line and "invalid YAML" in line


def test_validate_world_size_that_does_not_fit():
    # dp_replicate=2 with dp_shard=-1 cannot fill 3 ranks (other plan errors are covered in-process by test_config)
    line = assert_config_error(meshtune("validate", TINY, "--world-size", "3", "parallel.dp_replicate=2"), "parallel")
    assert "world size 3" in line


@pytest.mark.parametrize("overrides, mode, shard", [([], "fsdp", 2),
                                                    (["parallel.dp_replicate=-1", "parallel.dp_shard=1"], "ddp", 1)])
def test_validate_prints_layout_and_per_rank_parameters(overrides, mode, shard):
    result = meshtune("validate", TINY, *overrides, "--world-size", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"dp_shard={shard}" in out and f"= 2 ranks ({mode})" in out
    total = int(re.search(r"model: ([\d,]+) parameters", out).group(1).replace(",", ""))
    per_rank = int(re.search(r"per rank \(.*\): ([\d,]+) parameters", out).group(1).replace(",", ""))
    assert total > 0 and per_rank == total // shard


# ---- launch --------------------------------------------------------------------------------------------


def test_launch_dry_run_prints_torchrun_command():
    result = meshtune("launch", TINY, "train.steps=5", "optim.lr=1e-3", "run_dir=/tmp/a b", "--nproc-per-node", "2",
                      "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    argv = shlex.split(lines[0])
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in argv and "--standalone" in argv
    i = argv.index("meshtune")
    assert argv[i + 1] == "train" and Path(argv[i + 2]) == C.resolve_config_path(TINY)
    assert argv[i + 3:] == ["train.steps=5", "optim.lr=1e-3", "run_dir=/tmp/a b"]  # in order, quoted safely


def test_launch_overrides_after_options():
    result = meshtune("launch", TINY, "--nproc-per-node", "2", "train.steps=5", "--dry-run", "optim.lr=1e-3")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert "--nproc-per-node=2" in argv and argv[-2:] == ["train.steps=5", "optim.lr=1e-3"]


@pytest.mark.parametrize("argv", [["launch", TINY, "--dry-run", "--bogus"], ["ls", "train.steps=5"]])
def test_unknown_option_or_argument_exits_2(argv):
    result = meshtune(*argv)
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr and "Traceback" not in result.stderr


def test_launch_reports_a_malformed_data_line_before_starting_ranks(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a" "response": "b"}\n')
    result = meshtune("launch", TINY, "--nproc-per-node", "2", "data.task=", f"data.train_path={data}",
                      f"run_dir={tmp_path / 'run'}")
    message = assert_config_error(result, "data.train_path")
    assert f"{data} line 2" in message
    assert not (tmp_path / "run").exists()  # no rank ever started
