"""`meshtune launch` for one node and many: flag validation, the torchrun argv of each rendezvous mode,
the dry run printed for every node, and the workers' environment. No processes are started except the CLI."""

from __future__ import annotations

import shlex
import sys

import pytest

from meshtune import config as C
from meshtune.launch import torchrun as T
from tests.unit.test_cli import TINY, assert_config_error, meshtune, python

CONFIG = str(C.resolve_config_path(TINY))


def flags(argv: list[str]) -> dict[str, str]:
    """torchrun's `--key=value` flags (the ones before `-m meshtune`)."""
    head = argv[: argv.index("meshtune")]
    return dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in head if a.startswith("--"))


# ---- validation ------------------------------------------------------------------------------------------


def test_defaults_are_standalone():
    spec = T.node_spec()
    assert spec.mode == "standalone" and (spec.min_nodes, spec.max_nodes) == (1, 1)
    assert T.node_spec(nnodes="1").mode == "standalone"


@pytest.mark.parametrize("kwargs, mode, nnodes", [
    (dict(nnodes="2", rdzv_endpoint="node0:29500", rdzv_id="j7"), "c10d", "2"),
    (dict(nnodes="2:4", rdzv_endpoint="node0:29500"), "c10d", "2:4"),
    (dict(nnodes="1", rdzv_endpoint="10.0.0.1:1234"), "c10d", "1"),
    (dict(nnodes="3", node_rank=2, rdzv_endpoint="node0:29500"), "static", "3"),
    (dict(nnodes="2", rdzv_endpoint="[fe80::1]:29500"), "c10d", "2"),
])
def test_valid_multi_node_specs(kwargs, mode, nnodes):
    spec = T.node_spec(**kwargs)
    assert spec.mode == mode and spec.nnodes == nnodes


@pytest.mark.parametrize("kwargs, flag, words", [
    (dict(nnodes="0"), "--nnodes", ">= 1"),
    (dict(nnodes="-1"), "--nnodes", ">= 1"),
    (dict(nnodes="4:2"), "--nnodes", "MIN 4 is larger than MAX 2"),
    (dict(nnodes="two"), "--nnodes", "MIN:MAX"),
    (dict(nnodes="1:2:3"), "--nnodes", "MIN:MAX"),
    (dict(nnodes="2"), "--rdzv-endpoint", "needed with --nnodes 2"),
    (dict(nnodes="1:2"), "--rdzv-endpoint", "needed with --nnodes 1:2"),
    (dict(nnodes="2", rdzv_endpoint="node0"), "--rdzv-endpoint", "has no port"),
    (dict(nnodes="2", rdzv_endpoint="node0:"), "--rdzv-endpoint", "not a number"),
    (dict(nnodes="2", rdzv_endpoint=":29500"), "--rdzv-endpoint", "has no host"),
    (dict(nnodes="2", rdzv_endpoint="node0:99999"), "--rdzv-endpoint", "1-65535"),
    (dict(nnodes="2", rdzv_endpoint="fe80::1:29500"), "--rdzv-endpoint", "brackets"),
    (dict(nnodes="2", node_rank=2, rdzv_endpoint="n:1"), "--node-rank", "not in 0..1"),
    (dict(nnodes="2", node_rank=-1, rdzv_endpoint="n:1"), "--node-rank", "not in 0..1"),
    (dict(nnodes="2:4", node_rank=0, rdzv_endpoint="n:1"), "--node-rank", "fixed --nnodes"),
    (dict(rdzv_id="job7"), "--rdzv-id", "--rdzv-endpoint"),
    (dict(nnodes="2", rdzv_endpoint="n:1", rdzv_id="a b"), "--rdzv-id", "no spaces"),
    (dict(max_restarts=-1), "--max-restarts", ">= 0"),
])
def test_invalid_flags_name_the_flag(kwargs, flag, words):
    with pytest.raises(T.LaunchError) as e:
        T.node_spec(**kwargs)
    assert str(e.value).startswith(f"{flag}: ") and words in str(e.value), str(e.value)
    assert isinstance(e.value, C.ConfigError)  # the CLI prints it as one line, exit 2


# ---- argv ------------------------------------------------------------------------------------------------


def test_standalone_argv_is_unchanged():
    argv = T.torchrun_argv(CONFIG, ["a=1"], 2, nodes=T.node_spec(max_restarts=3))
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert flags(argv) == {"standalone": "", "nproc-per-node": "2", "max-restarts": "3"}
    assert argv[-5:] == ["-m", "meshtune", "train", CONFIG, "a=1"]


def test_c10d_argv_is_the_same_on_every_node():
    spec = T.node_spec(nnodes="2:4", rdzv_endpoint="node0:29400", rdzv_id="job7", max_restarts=2)
    argv = T.torchrun_argv(CONFIG, ["x=1"], 8, nodes=spec)
    assert flags(argv) == {"nnodes": "2:4", "nproc-per-node": "8", "rdzv-backend": "c10d",
                           "rdzv-endpoint": "node0:29400", "rdzv-id": "job7", "max-restarts": "2"}
    assert "node-rank" not in " ".join(argv)


def test_static_argv_has_each_node_rank():
    spec = T.node_spec(nnodes="3", node_rank=1, rdzv_endpoint="node0:29400")
    assert flags(T.torchrun_argv(CONFIG, [], 2, nodes=spec))["node-rank"] == "1"
    for rank in range(3):
        f = flags(T.torchrun_argv(CONFIG, [], 2, nodes=spec, node_rank=rank))
        assert (f["node-rank"], f["rdzv-backend"], f["nnodes"]) == (str(rank), "static", "3")
        assert f["rdzv-id"] == T.DEFAULT_RDZV_ID


# ---- environment -----------------------------------------------------------------------------------------


def test_worker_env_disables_the_shared_store_and_keeps_user_values():
    env = T.worker_env({"PATH": "/bin"}, 2)
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1" and env["PATH"] == "/bin"
    assert int(env["OMP_NUM_THREADS"]) >= 1
    kept = T.worker_env({"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0", "OMP_NUM_THREADS": "7"}, 2)
    assert kept["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "0" and kept["OMP_NUM_THREADS"] == "7"


def test_worker_env_forwards_usr1_and_sets_the_grace_period():
    env = T.worker_env({}, 2)
    assert env["PET_SIGNALS_TO_HANDLE"].split(",")[-1] == "SIGUSR1" and T.GRACE_ENV not in env
    assert T.worker_env({}, 2, grace_s=90)[T.GRACE_ENV] == "90"  # torchrun waits 90 s before SIGKILL
    with pytest.raises(T.LaunchError, match="--grace-period: must be >= 1"):
        T.TorchrunLauncher(2, grace_s=0)


def test_launch_runs_torchrun_with_the_worker_env(monkeypatch):
    seen = {}

    def fake_call(argv, env, checks=None):
        seen.update(argv=argv, env=env)
        return 5

    monkeypatch.setattr(T, "run_torchrun", fake_call)
    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    spec = T.node_spec(nnodes="2", rdzv_endpoint="node0:29400")
    assert T.launch(CONFIG, ["k=v"], 2, nodes=spec) == 5
    assert seen["argv"] == T.torchrun_argv(CONFIG, ["k=v"], 2, nodes=spec)
    assert seen["env"]["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


@pytest.mark.parametrize("kwargs", [dict(), dict(nnodes="2", rdzv_endpoint="node0:29400")])
def test_launch_takes_max_restarts_from_the_node_spec_only(monkeypatch, kwargs):
    seen = {}
    monkeypatch.setattr(T, "run_torchrun", lambda argv, env, checks=None: seen.update(argv=argv) or 0)
    spec = T.node_spec(max_restarts=3, **kwargs)
    assert T.launch(CONFIG, [], 2, nodes=spec) == 0
    assert flags(seen["argv"])["max-restarts"] == "3"
    with pytest.raises(TypeError, match="max_restarts"):  # a second source could disagree with the spec's
        T.launch(CONFIG, [], 2, max_restarts=1, nodes=spec)
    with pytest.raises(TypeError, match="max_restarts"):
        T.torchrun_argv(CONFIG, [], 2, max_restarts=1, nodes=spec)
    with pytest.raises(TypeError):  # nodes is keyword-only: a positional restart count cannot become the spec
        T.launch(CONFIG, [], 2, False, 1)


def test_launch_without_a_spec_is_standalone_without_restarts(monkeypatch):
    seen = {}
    monkeypatch.setattr(T, "run_torchrun", lambda argv, env, checks=None: seen.update(argv=argv) or 0)
    assert T.launch(CONFIG, [], 2) == 0
    assert flags(seen["argv"]) == {"standalone": "", "nproc-per-node": "2", "max-restarts": "0"}


# ---- through the CLI -------------------------------------------------------------------------------------


def test_dry_run_c10d_prints_one_command_for_every_node():
    result = meshtune("launch", TINY, "--nnodes", "2:4", "--nproc-per-node", "2", "--rdzv-endpoint", "node0:29400",
                      "--rdzv-id", "job7", "--max-restarts", "1", "--dry-run", "optim.lr=1e-3", "run_dir=/tmp/a b",
                      "train.micro_batch_size=4")  # the layout is checked for 4 and 8 ranks
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("# the same command on each of the 2:4 nodes")
    argv = shlex.split(lines[1])
    n = len(T.WORKER_ENV_DEFAULTS)  # the env fixes (shared store, signal forwarding), copy-pasteable into a shell
    assert argv[:n] == [f"{k}={v}" for k, v in T.WORKER_ENV_DEFAULTS.items()]
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in argv[:n] and \
        "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in argv[:n]
    assert argv[n:] == T.torchrun_argv(CONFIG, ["optim.lr=1e-3", "run_dir=/tmp/a b", "train.micro_batch_size=4"], 2,
                                       nodes=T.node_spec("2:4", None, "node0:29400", "job7", 1))


def test_dry_run_standalone_passes_max_restarts():
    result = meshtune("launch", TINY, "--nproc-per-node", "2", "--max-restarts", "4", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert flags(shlex.split(result.stdout.strip()))["max-restarts"] == "4"


def test_dry_run_static_prints_each_node_rank():
    result = meshtune("launch", TINY, "--nnodes", "3", "--node-rank", "1", "--rdzv-endpoint", "node0:29400",
                      "--dry-run", "train.global_batch_size=48", "train.micro_batch_size=8")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0::2] == ["# node 0 of 3:", "# node 1 of 3 (this node):", "# node 2 of 3:"]
    for rank, line in enumerate(lines[1::2]):
        assert flags(shlex.split(line)[1:])["node-rank"] == str(rank)


def test_dry_run_keeps_a_user_store_setting():
    code = ("import os, sys\nos.environ['TORCH_DISABLE_SHARE_RDZV_TCP_STORE'] = '0'\n"
            "from meshtune.cli import main\n"
            f"sys.exit(main(['launch', {TINY!r}, '--nnodes', '2', '--rdzv-endpoint', 'n:1', '--dry-run', "
            "'train.micro_batch_size=8']))")
    result = python("-c", code)
    assert result.returncode == 0, result.stderr
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0 " in result.stdout


@pytest.mark.parametrize("extra, flag", [
    (["--nnodes", "0"], "--nnodes"),
    (["--nnodes", "4:2", "--rdzv-endpoint", "n:1"], "--nnodes"),
    (["--nnodes", "2", "--rdzv-endpoint", "node0"], "--rdzv-endpoint"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "n:1"], "--node-rank"),
    (["--nnodes", "2"], "--rdzv-endpoint"),
    (["--max-restarts", "-1"], "--max-restarts"),
])
def test_cli_flag_errors_are_one_line_exit_2(extra, flag):
    assert_config_error(meshtune("launch", TINY, *extra, "--dry-run"), flag)


# ---- held torchrun: started beside the checks, let go only after them -------------------------------------------


def _marker_argv(tmp_path) -> tuple[list[str], object]:
    """torchrun running one worker that writes a file: whether any rank started."""
    marker = tmp_path / "rank-started"
    script = tmp_path / "worker.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", str(script)]
    return argv, marker


def test_held_torchrun_starts_no_rank_when_the_checks_refuse(tmp_path):
    argv, marker = _marker_argv(tmp_path)
    ran = []

    def refuse():
        ran.append(1)
        raise C.ConfigError("train.steps: must be >= 1")

    with pytest.raises(C.ConfigError, match="train.steps"):
        T.run_torchrun(argv, T.worker_env(dict(T.os.environ), 1), refuse)
    assert ran == [1] and not marker.exists()


def test_held_torchrun_runs_the_ranks_after_the_checks(tmp_path):
    argv, marker = _marker_argv(tmp_path)
    order = []
    assert T.run_torchrun(argv, T.worker_env(dict(T.os.environ), 1),
                          lambda: order.append(marker.exists())) == 0
    assert order == [False] and marker.read_text() == "x"
