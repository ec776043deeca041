"""`meshtune slurm`: the rendered sbatch script, run by bash with SLURM's commands replaced by stubs that
record their argv byte for byte, so hostile values can be shown to arrive intact and to run nothing.
The same script on a real single-node cluster: tests/integration/test_slurm_local.py."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshtune import config as C
from meshtune.exit_codes import STOPPED
from meshtune.launch import slurm as S
from meshtune.launch.torchrun import LaunchError
from tests.unit.test_cli import REPO, TINY, assert_config_error

CONFIG = str(C.resolve_config_path(TINY))

# Each is a config value (YAML keeps it a string) and a shell payload that would create `{p}` if it ran.
HOSTILE = ["v$(touch {p})", "v`touch {p}`", "v'; touch {p}; '", 'v"; touch {p}; "', "v;touch {p}",
           "v\ntouch {p}\n", "v && touch {p} || touch {p}", "v | touch {p} &", "v$HOME ${{PATH}} \\ \\\\ %j",
           "v\n#SBATCH --job-name=evil\n#PBS -N evil\ntouch {p}", "v > {p}", "v' \"$(touch {p})\" '"]

STUB = r"""#!/bin/bash
# stub SLURM command: record argv NUL-separated (byte exact), then act like the real one a little
name=$(basename "$0")
rec=$(mktemp "$STUB_LOG/call.$name.XXXXXX")
printf '%s\0' "$@" > "$rec"
case "$name" in
  sbatch) echo "4242;cluster" ;;
  scontrol)
    if [ "$1 $2" = "show hostnames" ]; then printf 'node0\nnode1\n'
    elif [ "$1 $2" = "show job" ]; then
      if [ -f "$STUB_LOG/job.$3" ]; then cat "$STUB_LOG/job.$3"
      else echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; fi
    fi ;;
  srun)
    env | grep -E '^(TORCH_DISABLE_SHARE_RDZV_TCP_STORE|TORCHELASTIC_SIGNALS_TO_HANDLE|SRUN_CPUS_PER_TASK)=' \
      | sort > "$rec.env"
    if [ -n "${STUB_SRUN_WAIT:-}" ]; then
      trap 'echo usr1 > "$STUB_LOG/srun.got-usr1"; exit 0' USR1
      touch "$STUB_LOG/srun.ready"
      for _ in $(seq 1 300); do sleep 0.1; done
      exit 9
    fi ;;
esac
exit 0
"""
TOOLS = ("sbatch", "srun", "scontrol", "scancel", "squeue", "torchrun")


@pytest.fixture
def stubs(tmp_path):
    """A bin directory of stub SLURM commands; `stubs.calls(name)` -> list of argv (lists of str)."""
    bindir, log = tmp_path / "stubbin", tmp_path / "stublog"
    bindir.mkdir()
    log.mkdir()
    for tool in TOOLS:
        (bindir / tool).write_text(STUB)
        (bindir / tool).chmod(0o755)

    class Stubs:
        path, logdir = bindir, log
        env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "STUB_LOG": str(log)}

        @staticmethod
        def calls(name: str) -> list[list[str]]:
            files = sorted((p for p in log.glob(f"call.{name}.*") if p.suffix != ".env"),
                           key=lambda p: p.stat().st_mtime_ns)
            return [p.read_bytes().decode().split("\0")[:-1] for p in files]

        @staticmethod
        def srun_env() -> str:
            return next(log.glob("call.srun.*.env")).read_text()

    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE",
              "TORCHELASTIC_SIGNALS_TO_HANDLE", "SLURM_JOB_ID"):
        Stubs.env.pop(k, None)
    return Stubs


def run_script(script: Path, stubs, **env) -> subprocess.Popen:
    """Run the rendered script as SLURM's batch step would, with the stubs on PATH."""
    job_env = {**stubs.env, "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", **env}
    return subprocess.Popen(["bash", str(script)], cwd=script.parent, env=job_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def render(tmp_path, overrides=(), config=CONFIG, **job) -> Path:
    run_dir = tmp_path / "run"
    text = S.render_sbatch(config, list(overrides), run_dir, S.slurm_job(**job), workdir=tmp_path)
    return S.write_script(text, run_dir)


def expected_srun(config: str, overrides: list[str], nproc: int, port: int = 29500, restarts: int = 0) -> list[str]:
    return ["--kill-on-bad-exit=1", sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
            "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"node0:{port}",
            "--rdzv-id", "4242", "--max-restarts", str(restarts), "-m", "meshtune", "train", config, *overrides]


def directives(script: Path) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.read_text().splitlines() if line.startswith("#SBATCH ")]


# ---- rendering -------------------------------------------------------------------------------------------


def test_gpu_script_directives(tmp_path):
    script = render(tmp_path, nodes=4, gpus_per_node=8, cpus_per_task=32, partition="gpu", time="1-00:00:00",
                    account="proj", qos="high", constraint="a100", mail="me@x.org", exclusive=True, job_name="big")
    d = directives(script)
    run_dir = tmp_path / "run"
    assert d == ['--job-name="big"', "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=32",
                 '--partition="gpu"', '--time="1-00:00:00"', '--account="proj"', '--qos="high"',
                 '--constraint="a100"', '--mail-user="me@x.org"', "--mail-type=END,FAIL", f'--chdir="{tmp_path}"',
                 f'--output="{run_dir}/slurm-%j.out"', f'--error="{run_dir}/slurm-%j.err"', "--open-mode=append",
                 "--signal=B:USR1@120", "--exclusive", "--requeue", "--ignore-pbs"]
    text = script.read_text()
    assert "--nproc-per-node 8" in text and 'export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"' in text
    assert script == run_dir / "submit.sbatch" and os.access(script, os.X_OK)


def test_signal_lead_time_and_torchrun_forwarding_usr1(tmp_path):
    script = render(tmp_path, signal_before_s=45)
    assert "--signal=B:USR1@45" in directives(script)
    # torch 2.13 takes torchrun's signal list from PET_SIGNALS_TO_HANDLE (TORCHELASTIC_... alone is overwritten)
    assert 'export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"' in \
        script.read_text()
    with pytest.raises(LaunchError, match="--signal-before: must be >= 1"):
        S.slurm_job(signal_before_s=0)


@pytest.mark.parametrize("job, nproc", [(dict(), 1), (dict(tasks_per_node=2), 2), (dict(gpus_per_node=4), 4)])
def test_ranks_per_node(tmp_path, job, nproc):
    script = render(tmp_path, **job)
    assert f"--nproc-per-node {nproc} " in script.read_text()
    assert any(d.startswith("--gpus-per-node") for d in directives(script)) == bool(job.get("gpus_per_node"))
    assert "SRUN_CPUS_PER_TASK" not in script.read_text()


def test_defaults_job_name_and_percent_in_run_dir(tmp_path):
    run_dir = tmp_path / "100%done"
    text = S.render_sbatch(CONFIG, [], run_dir, S.slurm_job(), workdir=tmp_path)
    assert '#SBATCH --job-name="meshtune-tiny"' in text
    assert f'#SBATCH --output="{tmp_path}/100%%done/slurm-%j.out"' in text  # `%` is SLURM's pattern escape


@pytest.mark.parametrize("job, flag", [
    (dict(nodes=0), "--nodes"), (dict(gpus_per_node=-1), "--gpus-per-node"), (dict(tasks_per_node=0),
     "--tasks-per-node"), (dict(cpus_per_task=0), "--cpus-per-task"), (dict(rdzv_port=70000), "--rdzv-port"),
    (dict(max_restarts=-1), "--max-restarts"), (dict(time="1 hour"), "--time"), (dict(time="$(id)"), "--time"),
    (dict(job_name="a\nb"), "--job-name"), (dict(partition="a\tb"), "--partition"), (dict(account=""), "--account"),
    (dict(mail="x\r@y"), "--mail"), (dict(qos="\x00"), "--qos"), (dict(constraint="a\x7f"), "--constraint"),
])
def test_invalid_job_options_name_the_flag(job, flag):
    with pytest.raises(LaunchError) as e:
        S.slurm_job(**job)
    assert str(e.value).startswith(f"{flag}: "), str(e.value)


def test_run_dir_with_a_newline_is_refused(tmp_path):
    with pytest.raises(LaunchError, match="^run_dir: "):
        S.render_sbatch(CONFIG, [], tmp_path / "a\nb", S.slurm_job(), workdir=tmp_path)


# Slurm <= 20.11 splits the job at any #SBATCH line containing these words (any case, quoted or not)
HETJOB_VALUES = ["hetjob", "HetJob", "my-hetjob-run", "PACKJOB", "a packjob b", "xPackJobx"]
SEPARATOR = "heterogeneous-job separator"


@pytest.mark.parametrize("value", HETJOB_VALUES)
@pytest.mark.parametrize("field, flag", [("job_name", "--job-name"), ("partition", "--partition"),
                                         ("account", "--account"), ("qos", "--qos"),
                                         ("constraint", "--constraint"), ("mail", "--mail")])
def test_separator_words_are_refused_in_every_job_option(field, flag, value):
    with pytest.raises(LaunchError) as e:
        S.slurm_job(**{field: value})
    message = str(e.value)
    assert message.startswith(f"{flag}: {value!r} contains ") and SEPARATOR in message, message
    assert "\n" not in message  # the CLI prints it as one line


def test_time_cannot_carry_a_separator_word():
    with pytest.raises(LaunchError, match="^--time: 'hetjob' is not a SLURM time limit"):
        S.slurm_job(time="hetjob")


@pytest.mark.parametrize("value", ["het-job", "hetjo", "pack job", "het_job", "jobhet"])
def test_words_that_only_resemble_a_separator_are_kept(tmp_path, value):
    script = render(tmp_path, job_name=value, partition=value, account=value, qos=value, constraint=value,
                    mail=value)
    assert f'--partition="{value}"' in directives(script) and f'--job-name="{value}"' in directives(script)


@pytest.mark.parametrize("value", HETJOB_VALUES)
def test_separator_words_are_refused_in_paths(tmp_path, value):
    with pytest.raises(LaunchError) as e:
        S.render_sbatch(CONFIG, [], tmp_path / value / "run", S.slurm_job(), workdir=tmp_path)
    assert str(e.value).startswith("run_dir: ") and SEPARATOR in str(e.value)
    assert str(e.value).endswith("choose a run_dir without it")
    with pytest.raises(LaunchError) as e:
        S.render_sbatch(CONFIG, [], tmp_path / "run", S.slurm_job(), workdir=tmp_path / value)
    assert str(e.value).startswith("working directory: ") and SEPARATOR in str(e.value)
    assert str(e.value).endswith("submit from a directory without it")


def test_default_job_name_from_a_separator_config_name_is_refused(tmp_path):
    config = tmp_path / "HetJob.yaml"
    config.write_text(Path(CONFIG).read_text())
    with pytest.raises(LaunchError) as e:
        S.render_sbatch(str(config), [], tmp_path / "run", S.slurm_job(), workdir=tmp_path)
    assert str(e.value).startswith("--job-name: 'meshtune-HetJob' contains 'HetJob'"), str(e.value)
    assert str(e.value).endswith("pass --job-name")
    text = S.render_sbatch(str(config), [], tmp_path / "run", S.slurm_job(job_name="ok"), workdir=tmp_path)
    assert '#SBATCH --job-name="ok"' in text  # a name given by --job-name replaces the default


def test_no_sbatch_line_of_a_rendered_script_holds_a_separator_word(tmp_path):
    script = render(tmp_path, nodes=2, gpus_per_node=8, cpus_per_task=4, partition="gpu", time="4:00:00",
                    account="proj", qos="high", constraint="a100", mail="me@x.org", exclusive=True,
                    job_name="big", requeue=False)
    assert len(directives(script)) == 20  # every directive checked, the fixed ones included
    assert not any(S._HETJOB.search(d) for d in directives(script))


# ---- executing the script with stub SLURM commands ------------------------------------------------------


def test_script_runs_srun_torchrun_with_exact_values(tmp_path, stubs):
    overrides = ["train.steps=5", "run_dir=/tmp/a b"]
    script = render(tmp_path, overrides, tasks_per_node=2, cpus_per_task=3)
    proc = run_script(script, stubs, SLURM_CPUS_PER_TASK="3")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert stubs.calls("scontrol") == [["show", "hostnames", "node[0-1]"]]
    assert stubs.calls("srun") == [expected_srun(CONFIG, overrides, 2)]
    assert stubs.srun_env().splitlines() == ["SRUN_CPUS_PER_TASK=3", "TORCHELASTIC_SIGNALS_TO_HANDLE=" +
                                             S.TORCHRUN_SIGNALS, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"]
    assert "rendezvous at node0:29500" in out


def test_script_keeps_a_user_store_setting(tmp_path, stubs):
    proc = run_script(render(tmp_path), stubs, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="0")
    assert proc.wait(60) == 0
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0" in stubs.srun_env()


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_values_arrive_byte_for_byte_and_run_nothing(tmp_path, stubs, hostile):
    sentinel = tmp_path / "pwned"
    value = hostile.format(p=sentinel)
    one_line = value.replace("\n", " ")  # #SBATCH values cannot hold a newline (refused; tested above)
    config = tmp_path / f"cfg {one_line[:40].replace('/', '_')}.yaml"
    overrides = [f"metrics.wandb_project={value}", f"data.task={value}", "train.steps=5"]
    script = render(tmp_path, overrides, config=str(config), job_name=one_line, partition=one_line,
                    account=one_line, qos=one_line, constraint=one_line, mail=one_line, tasks_per_node=2)
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    proc = run_script(script, stubs)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert stubs.calls("srun") == [expected_srun(str(config), overrides, 2)]
    assert stubs.calls("torchrun") == [] and stubs.calls("sbatch") == []  # only ever an argument of srun
    assert not sentinel.exists()
    # the #SBATCH values come back from sbatch's own parser rules: "..." with \\ and \" escaped
    d = directives(script)
    quoted = '"' + one_line.replace("\\", "\\\\").replace('"', '\\"') + '"'
    assert f"--job-name={quoted}" in d and f"--partition={quoted}" in d and f"--mail-user={quoted}" in d
    header = script.read_text().split("set -uo pipefail")[0]
    assert all(line.startswith("#") for line in header.splitlines())  # nothing but comments before the body


# wait4/waitid syscall numbers, for kernels that hide /proc/PID/wchan
WAIT_SYSCALLS = {"x86_64": {"61", "247"}, "aarch64": {"260", "95"}}


def blocked_in_wait(pid: int) -> bool:
    """Whether `pid` sleeps in the kernel's wait (Linux /proc: wchan, else the syscall it is in)."""
    try:
        if Path(f"/proc/{pid}/wchan").read_text().strip() == "do_wait":
            return True
        number = Path(f"/proc/{pid}/syscall").read_text().split()[0]
    except (OSError, IndexError):
        return False
    return number in WAIT_SYSCALLS.get(platform.machine(), set())


def wait_until_the_script_waits_for_srun(proc: subprocess.Popen, stubs) -> None:
    """Until the srun stub has set its USR1 trap and the script sleeps in `wait "$srun_pid"`: a USR1 sent now
    interrupts that wait with srun_pid set, however slowly the machine got there (no sleep to guess it)."""
    deadline = time.monotonic() + 30  # only a bound for a broken script
    # the ready file first: before srun starts, the script also waits (for its `$(scontrol ...)`)
    while not ((stubs.logdir / "srun.ready").exists() and blocked_in_wait(proc.pid)):
        assert proc.poll() is None and time.monotonic() < deadline, \
            proc.communicate()[1] if proc.poll() is not None else "the script never waited for the srun stub"
        time.sleep(0.05)


def test_usr1_is_forwarded_to_srun_and_the_job_requeued(tmp_path, stubs):
    proc = run_script(render(tmp_path), stubs, STUB_SRUN_WAIT="1")
    wait_until_the_script_waits_for_srun(proc, stubs)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == STOPPED, err  # stopped before the time limit, requeued: meshtune's code for it
    assert (stubs.logdir / "srun.got-usr1").read_text().strip() == "usr1"
    assert ["requeue", "4242"] in stubs.calls("scontrol")
    assert "SIGUSR1 before the time limit" in out and "requeueing job 4242" in out


def test_no_requeue_option(tmp_path, stubs):
    script = render(tmp_path, requeue=False)
    assert "--no-requeue" in directives(script)
    proc = run_script(script, stubs, STUB_SRUN_WAIT="1")
    wait_until_the_script_waits_for_srun(proc, stubs)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == STOPPED, err  # the signal reached srun (the stub exits 9 if it never does)
    assert "SIGUSR1 before the time limit" in out and (stubs.logdir / "srun.got-usr1").exists()
    assert all(c[0] != "requeue" for c in stubs.calls("scontrol"))


# ---- through the CLI -------------------------------------------------------------------------------------


def cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshtune", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)


def test_submit_writes_submits_and_prints_the_job_id(tmp_path, stubs):
    sentinel = tmp_path / "pwned"
    name = f"n$(touch {sentinel})`touch {sentinel}`\"';x"
    overrides = [f"run_dir={tmp_path}/r $(touch {sentinel})", f"metrics.wandb_project=a\n$(touch {sentinel})'\"",
                 "train.micro_batch_size=8"]  # 2 nodes x 2 ranks: the layout is checked before submitting
    result = cli("slurm", "submit", TINY, "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "2",
                 "--job-name", name, *overrides, env=stubs.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "4242\n"
    script = tmp_path / f"r $(touch {sentinel})" / "submit.sbatch"
    assert stubs.calls("sbatch") == [["--parsable", str(script)]]
    proc = run_script(script, stubs)
    assert proc.wait(60) == 0
    assert stubs.calls("srun") == [expected_srun(CONFIG, overrides, 2)]
    assert not sentinel.exists()


def test_submit_dry_run_writes_only(tmp_path, stubs):
    result = cli("slurm", "submit", TINY, "--gpus-per-node", "0", f"run_dir={tmp_path}/r", "--dry-run",
                 env=stubs.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{tmp_path}/r/submit.sbatch" and Path(result.stdout.strip()).is_file()
    assert stubs.calls("sbatch") == []


def test_submit_dry_run_checks_the_layout_validate_checks(tmp_path, stubs):
    """The dry run used to skip the layout check: 2 nodes x 2 ranks cannot split a global batch of 8 into
    micro-batches of 8; nothing is written."""
    result = cli("slurm", "submit", TINY, "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "2",
                 f"run_dir={tmp_path}/r", "--dry-run", "train.global_batch_size=8", "train.micro_batch_size=8",
                 env=stubs.env)
    assert_config_error(result, "train.global_batch_size")
    assert not (tmp_path / "r").exists() and stubs.calls("sbatch") == []


def test_submit_dry_run_does_not_import_torch(tmp_path):
    code = ("import sys\nfrom meshtune.cli import main\n"
            f"rc = main(['slurm', 'submit', {TINY!r}, '--gpus-per-node', '0', 'run_dir={tmp_path}/r', '--dry-run'])\n"
            "assert rc == 0 and 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args, flag", [
    (["--gpus-per-node", "0", "--job-name", "a\nb"], "--job-name"),
    (["--gpus-per-node", "0", "--nodes", "0"], "--nodes"),
    (["--gpus-per-node", "0", "--time", "soon"], "--time"),
    (["--gpus-per-node", "0", "train.steps=0"], "train.steps"),
    (["--gpus-per-node", "0", 'run_dir="/tmp/a\\nb"'], "run_dir"),  # YAML's "\n": a real line break
    (["--gpus-per-node", "0", "--partition", "HetJob"], "--partition: 'HetJob' contains 'HetJob'"),
    (["--gpus-per-node", "0", "--job-name", "my packjob"], "--job-name: 'my packjob' contains 'packjob'"),
    (["--gpus-per-node", "0", "--account", "hetjob"], "--account: "),
    (["--gpus-per-node", "0", "--qos", "hetjob"], "--qos: "),
    (["--gpus-per-node", "0", "--constraint", "hetjob"], "--constraint: "),
    (["--gpus-per-node", "0", "--mail", "hetjob@x.org"], "--mail: "),
])
def test_submit_errors_are_one_line(tmp_path, stubs, args, flag):
    assert_config_error(cli("slurm", "submit", TINY, "--dry-run", *args, env=stubs.env), flag)
    assert stubs.calls("sbatch") == []


def test_submit_refuses_a_separator_in_run_dir_before_writing(tmp_path, stubs):
    run_dir = tmp_path / "packjob" / "r"
    result = cli("slurm", "submit", TINY, "--gpus-per-node", "0", f"run_dir={run_dir}", env=stubs.env)
    assert_config_error(result, f"run_dir: '{run_dir}/slurm-%j.out' contains 'packjob'")
    assert not (tmp_path / "packjob").exists() and stubs.calls("sbatch") == []


def test_missing_slurm_is_one_clear_line(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no SLURM commands at all
    for args in (["slurm", "submit", TINY, "--gpus-per-node", "0", f"run_dir={tmp_path}/r"],
                 ["slurm", "status", "12"], ["slurm", "cancel", "12"], ["slurm", "logs", "12"]):
        line = assert_config_error(cli(*args, env=env), "SLURM is not installed")
        assert line.split(": ")[2] in ("sbatch", "scontrol"), line
    assert not (tmp_path / "r").exists()  # nothing written before the check


SHOW_JOB = """JobId=77 JobName=x JobState=RUNNING ' "$(id)
   UserId=root(0) GroupId=root(0) MCS_label=N/A
   JobState={state} Reason={reason} Dependency=(null)
   Requeue=1 Restarts={restarts} BatchFlag=1 Reboot=0 ExitCode={exit}
   RunTime=00:00:31 TimeLimit=00:10:00 TimeMin=N/A
   NodeList=node[0-1]
   Command={log_dir}/submit.sbatch
   WorkDir=/work
   StdErr={log_dir}/slurm-77.err
   StdIn=/dev/null
   StdOut={log_dir}/slurm-77.out
"""


def fake_job(stubs, log_dir: Path, state="COMPLETED", reason="None", restarts=0, exit="0:0") -> None:
    text = SHOW_JOB.format(state=state, reason=reason, restarts=restarts, exit=exit, log_dir=log_dir)
    (stubs.logdir / "job.77").write_text(text)


@pytest.mark.parametrize("state, reason, restarts, words", [
    ("COMPLETED", "None", 0, "job 77: COMPLETED, exit code 0:0\n"),
    ("RUNNING", "None", 1, "job 77: RUNNING for 00:00:31 of 00:10:00 on node[0-1], requeued 1 time(s)\n"),
    ("PENDING", "BeginTime", 2, "job 77: PENDING (BeginTime), requeued 2 time(s)\n"),
])
def test_status(tmp_path, stubs, state, reason, restarts, words):
    fake_job(stubs, tmp_path / "my run", state, reason, restarts)
    result = cli("slurm", "status", "77", env=stubs.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(words)  # the job name (holding `JobState=RUNNING`) fools nothing
    assert f"log: {tmp_path}/my run/slurm-77.out" in result.stdout


def test_logs_and_cancel(tmp_path, stubs):
    log_dir = tmp_path / "my run"
    log_dir.mkdir()
    (log_dir / "slurm-77.out").write_text("".join(f"line {i}\n" for i in range(100)))
    (log_dir / "slurm-77.err").write_text("warning\n")
    fake_job(stubs, log_dir, "RUNNING")
    result = cli("slurm", "logs", "77", "-n", "3", env=stubs.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"==> {log_dir}/slurm-77.out <==\nline 97\nline 98\nline 99\n"
                             f"==> {log_dir}/slurm-77.err <==\nwarning\n")
    result = cli("slurm", "cancel", "77", env=stubs.env)
    assert result.returncode == 0 and "job 77: cancel requested" in result.stdout
    assert stubs.calls("scancel") == [["77"]]


def test_unknown_job(tmp_path, stubs):
    for command in ("status", "cancel", "logs"):
        line = assert_config_error(cli("slurm", command, "999", env=stubs.env), "job 999: unknown to SLURM")
        assert "MinJobAge" in line
    assert stubs.calls("scancel") == []
    (tmp_path / "slurm-999.out").write_text("kept\n")  # SLURM forgot the job; its log is still in the run dir
    result = cli("slurm", "logs", "999", "--run-dir", str(tmp_path), env=stubs.env)
    assert result.returncode == 0 and result.stdout == f"==> {tmp_path}/slurm-999.out <==\nkept\n"


@pytest.mark.parametrize("job", ["abc", "1;id", "-1", "$(id)", "12 13"])
def test_bad_job_id_is_refused_before_any_slurm_call(stubs, job):
    assert_config_error(cli("slurm", "status", job, env=stubs.env), "JOB")
    assert stubs.calls("scontrol") == []
