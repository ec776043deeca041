"""`meshtune slurm`: render an sbatch script for a config, submit it, and follow the job.

    meshtune slurm submit pretrain/tiny --nodes 2 --gpus-per-node 8 --time 4:00:00 optim.lr=1e-3
    meshtune slurm submit pretrain/tiny --nodes 1 --gpus-per-node 0 --tasks-per-node 2 --dry-run
    meshtune slurm status 1234 | meshtune slurm logs 1234 | meshtune slurm cancel 1234

The script (written to RUN_DIR/submit.sbatch, resubmittable with plain `sbatch`) runs one `srun` task per
node; each runs torchrun, and the nodes meet at a c10d rendezvous on the job's first node. Logs go to
RUN_DIR/slurm-JOBID.out/.err, appended to across requeues. SLURM sends SIGUSR1 to the batch shell
`--signal-before` seconds (default SIGNAL_BEFORE_S) before the time limit; the script forwards it through
srun and torchrun to the ranks (which checkpoint at the step they reached and stop), requeues the job, which
resumes from that checkpoint, and exits 75 (exit_codes.STOPPED).

Every user value is quoted for the reader it reaches: `shlex.quote` for bash, and double quotes with
backslash escapes for sbatch's own `#SBATCH` parser (which no shell reads, but which a newline would end:
so control characters are refused there). `hetjob` and `packjob` are refused in every `#SBATCH` value too:
up to Slurm 20.11, sbatch took any `#SBATCH` line containing either word (any case, even inside quotes) for a
heterogeneous-job separator, blanked the word and split the job (Slurm's commit 6fb3e5e, first in 21.08,
made it match only a line that is the bare word). This module must not import torch.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from meshtune.exit_codes import STOPPED
from meshtune.launch.torchrun import TORCHRUN_SIGNALS, LaunchError, train_argv

SCRIPT_NAME = "submit.sbatch"
SIGNAL_BEFORE_S = 120
_TIME = re.compile(r"^(\d+|\d+:\d+|\d+:\d+:\d+|\d+-\d+|\d+-\d+:\d+|\d+-\d+:\d+:\d+|UNLIMITED|INFINITE)$")
_JOB = re.compile(r"^\d+(_\d+)?$")
_HETJOB = re.compile(r"hetjob|packjob", re.IGNORECASE | re.ASCII)  # sbatch's strcasestr: ASCII case only


@dataclass(frozen=True)
class SlurmJob:
    """What `meshtune slurm submit` asks SLURM for. Build it with `slurm_job()`, which validates it."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    mail: str | None = None
    exclusive: bool = False
    job_name: str | None = None
    rdzv_port: int = 29500
    max_restarts: int = 0
    requeue: bool = True
    signal_before_s: int = SIGNAL_BEFORE_S

    @property
    def nproc_per_node(self) -> int:
        """Ranks per node: one per GPU, or --tasks-per-node (default 1) on CPU-only nodes."""
        return self.tasks_per_node or self.gpus_per_node or 1


def slurm_job(**kwargs) -> SlurmJob:
    """A validated SlurmJob; every error names the flag (`--nodes`, `--time`, ...).

    Raises:
        LaunchError: a count out of range, a malformed time, or a control character, `hetjob` or `packjob`
            in a text value.
    """
    job = SlurmJob(**kwargs)
    for flag, value, low in [("--nodes", job.nodes, 1), ("--gpus-per-node", job.gpus_per_node, 0),
                             ("--tasks-per-node", job.tasks_per_node, 1), ("--cpus-per-task", job.cpus_per_task, 1),
                             ("--rdzv-port", job.rdzv_port, 1), ("--max-restarts", job.max_restarts, 0),
                             ("--signal-before", job.signal_before_s, 1)]:
        if value is not None and value < low:
            raise LaunchError(f"{flag}: must be >= {low}, got {value}")
    if job.rdzv_port > 65535:
        raise LaunchError(f"--rdzv-port: must be <= 65535, got {job.rdzv_port}")
    if job.signal_before_s > 65535:  # sbatch's limit for --signal's @time
        raise LaunchError(f"--signal-before: must be <= 65535 seconds, got {job.signal_before_s}")
    if job.time is not None and not _TIME.match(job.time):
        raise LaunchError(f"--time: {job.time!r} is not a SLURM time limit; write MINUTES, HH:MM:SS or D-HH:MM:SS")
    for flag in ("partition", "account", "qos", "constraint", "mail", "job_name"):
        value = getattr(job, flag)
        if value is not None:
            _directive_value(f"--{flag.replace('_', '-')}", value)
    return job


def _directive_value(flag: str, value: str, fix: str = "choose a value without it") -> str:
    """`value` quoted for sbatch's `#SBATCH` parser: double quotes, with `\\` and `"` escaped by a backslash.

    No shell reads these lines, but a line break would end the comment and turn the rest into a command, and
    `hetjob`/`packjob` anywhere in the line would split the job (see the module docstring): both are refused.

    Raises:
        LaunchError: naming `flag`, for an empty value, a control character, or `hetjob`/`packjob`; `fix` ends
            the message of the last.
    """
    if not value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise LaunchError(f"{flag}: {value!r} is empty or holds a control character (newline, tab...); "
                          "#SBATCH lines cannot carry it")
    if found := _HETJOB.search(value):
        raise LaunchError(f"{flag}: {value!r} contains {found.group(0)!r}, which sbatch (Slurm <= 20.11) takes "
                          f"anywhere in an #SBATCH line, even quoted, for a heterogeneous-job separator; {fix}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _log_pattern(run_dir: Path, suffix: str) -> str:
    # in SLURM filename patterns `%` starts a replacement (%j = job id); a literal % is written %%
    return str(run_dir).replace("%", "%%") + f"/slurm-%j.{suffix}"


def render_sbatch(config: str, overrides: list[str], run_dir: str | os.PathLike, job: SlurmJob,
                  python: str = sys.executable, workdir: str | os.PathLike | None = None) -> str:
    """The sbatch script for one training run.

    Args:
        config: the config file every rank reads (made absolute).
        overrides: `key=value` overrides, passed to every rank byte for byte.
        run_dir: the run directory; logs go there (made absolute).
        job: the validated resources and options.
        python: the interpreter that runs torchrun on the nodes (this one, by default: a shared venv).
        workdir: the job's working directory (default: the current one), so relative paths mean the same.

    Raises:
        LaunchError: a value or path that cannot appear in an #SBATCH line (control characters, `hetjob`,
            `packjob`), naming its flag or field.
    """
    run_dir = Path(run_dir).absolute()
    workdir = Path(workdir or Path.cwd()).absolute()
    q = shlex.quote
    d = {}  # flag -> #SBATCH value, in order
    if job.job_name is not None:
        d["--job-name"] = _directive_value("--job-name", job.job_name)
    else:
        d["--job-name"] = _directive_value("--job-name", f"meshtune-{Path(config).stem}",
                                           "it is the default name, from the config file's name: pass --job-name")
    d["--nodes"] = str(job.nodes)
    d["--ntasks-per-node"] = "1"  # one torchrun per node; torchrun starts that node's ranks
    if job.gpus_per_node:
        d["--gpus-per-node"] = str(job.gpus_per_node)
    if job.cpus_per_task:
        d["--cpus-per-task"] = str(job.cpus_per_task)
    for flag in ("partition", "time", "account", "qos", "constraint"):
        if getattr(job, flag) is not None:
            d[f"--{flag}"] = _directive_value(f"--{flag}", getattr(job, flag))
    if job.mail is not None:
        d["--mail-user"] = _directive_value("--mail", job.mail)
        d["--mail-type"] = "END,FAIL"
    d["--chdir"] = _directive_value("working directory", str(workdir), "submit from a directory without it")
    d["--output"] = _directive_value("run_dir", _log_pattern(run_dir, "out"), "choose a run_dir without it")
    d["--error"] = _directive_value("run_dir", _log_pattern(run_dir, "err"), "choose a run_dir without it")
    d["--open-mode"] = "append"  # a requeued run continues its log instead of truncating it
    d["--signal"] = f"B:USR1@{job.signal_before_s}"  # to the batch shell, which forwards it (see below)
    lines = [f"#SBATCH {flag}={value}" for flag, value in d.items()]
    if job.exclusive:
        lines.append("#SBATCH --exclusive")
    lines.append("#SBATCH --requeue" if job.requeue else "#SBATCH --no-requeue")
    # sbatch reads #PBS/#BSUB lines anywhere in the script, even inside a quoted multi-line override
    lines.append("#SBATCH --ignore-pbs")

    srun = " \\\n  ".join([
        "srun --kill-on-bad-exit=1",
        f'{q(python)} -m torch.distributed.run --nnodes "$SLURM_NNODES" --nproc-per-node {job.nproc_per_node}',
        f'--rdzv-backend c10d --rdzv-endpoint "$head:{job.rdzv_port}" --rdzv-id "$SLURM_JOB_ID" '
        f"--max-restarts {job.max_restarts}",
        shlex.join(train_argv(str(Path(config).absolute()), []))] + [q(o) for o in overrides])
    cpus = 'export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"  # srun no longer inherits it from sbatch\n' \
        if job.cpus_per_task else ""
    requeue = ('  echo "meshtune: requeueing job $SLURM_JOB_ID; it resumes from its newest checkpoint"\n'
               '  scontrol requeue "$SLURM_JOB_ID"\n') if job.requeue else "  :\n"
    return f"""#!/bin/bash
# Written by `meshtune slurm submit` into its run directory; `sbatch` it again to run it again.
{chr(10).join(lines)}
set -uo pipefail

# the first node of the allocation hosts the c10d rendezvous store
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if [ -z "$head" ]; then
  echo "meshtune: cannot resolve the first node of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2
  exit 1
fi
# restarted gloo workers read stale addresses from torchrun's shared store on torch 2.13 unless this is set
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${{TORCH_DISABLE_SHARE_RDZV_TCP_STORE-1}}"
# torchrun stops its workers with the signal it receives, SIGUSR1 included (by default SIGUSR1 kills torchrun
# and the ranks train on unsupervised): torch 2.13 reads PET_SIGNALS_TO_HANDLE, older releases the other
export PET_SIGNALS_TO_HANDLE="${{PET_SIGNALS_TO_HANDLE-{TORCHRUN_SIGNALS}}}"
export TORCHELASTIC_SIGNALS_TO_HANDLE="${{TORCHELASTIC_SIGNALS_TO_HANDLE-$PET_SIGNALS_TO_HANDLE}}"
{cpus}echo "meshtune: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST," \
  "rendezvous at $head:{job.rdzv_port}"

# SIGUSR1 arrives {job.signal_before_s} s before the time limit; bash runs the trap only between commands, so srun
# runs in the background and the script waits for it.
signalled=0
srun_pid=
forward_usr1() {{
  signalled=1
  echo "meshtune: SIGUSR1 before the time limit: the ranks checkpoint and stop"
  [ -n "$srun_pid" ] && kill -USR1 "$srun_pid" 2>/dev/null
}}
trap forward_usr1 USR1

{srun} &
srun_pid=$!
while :; do
  wait "$srun_pid"
  rc=$?
  # a trapped signal interrupts `wait` (rc > 128) while srun still runs: wait again
  if [ "$rc" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null; then continue; fi
  break
done
if [ "$signalled" = 1 ]; then
{requeue}  exit {STOPPED}  # stopped before the time limit (meshtune's exit code for a stop on a signal)
fi
exit "$rc"
"""


def write_script(text: str, run_dir: str | os.PathLike) -> Path:
    """Write the script to RUN_DIR/submit.sbatch (creating the run directory) and return its path."""
    path = Path(run_dir).absolute() / SCRIPT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def _tool(name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a SLURM client command (no shell); a missing binary is one clear error."""
    exe = shutil.which(name)
    if exe is None:
        raise LaunchError(f"{name}: command not found: SLURM is not installed or not available here; run this on "
                          "a SLURM login node (or put the SLURM client commands on PATH)")
    try:
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{name} {' '.join(args)}: no answer within {timeout:.0f} s; is slurmctld up?") from None


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
    return lines[-1] if lines else f"exit code {result.returncode}"


def submit(script: str | os.PathLike) -> str:
    """`sbatch --parsable SCRIPT`; returns the job id.

    Raises:
        LaunchError: sbatch missing, or sbatch refused the job (its message is passed on).
    """
    result = _tool("sbatch", "--parsable", str(script))
    if result.returncode != 0:
        raise LaunchError(f"sbatch refused {script}: {_last_line(result)}")
    job_id = result.stdout.strip().split(";")[0]  # "ID" or "ID;cluster"
    if not _JOB.match(job_id):
        raise LaunchError(f"sbatch printed {result.stdout.strip()!r} instead of a job id")
    return job_id


def check_job_id(job: str) -> str:
    if not _JOB.match(str(job)):
        raise LaunchError(f"JOB: {job!r} is not a SLURM job id; give the number `meshtune slurm submit` printed")
    return str(job)


def job_info(job: str) -> dict[str, str]:
    """`scontrol show job JOB` as a dict (JobState, ExitCode, StdOut, ...).

    Raises:
        LaunchError: SLURM missing, or the job unknown to slurmctld.
    """
    result = _tool("scontrol", "show", "job", check_job_id(job))
    if result.returncode != 0 or not result.stdout.strip():
        if "invalid job id" in (result.stderr + result.stdout).lower():
            raise LaunchError(f"job {job}: unknown to SLURM (a wrong id, or it ended more than MinJobAge "
                              "seconds ago; its logs stay in its run directory)")
        raise LaunchError(f"scontrol show job {job}: {_last_line(result)}")
    info = {}
    for line in result.stdout.splitlines():
        line = line.strip()
        key = line.split("=", 1)[0]
        if key in ("StdOut", "StdErr", "StdIn", "WorkDir", "Command"):  # paths may hold spaces: whole line
            info[key] = line.split("=", 1)[1]
            continue
        if key == "JobId":  # `JobId=N JobName=...`: the name is free text (it could even hold `JobState=`)
            info["JobId"], _, info["JobName"] = line[len("JobId="):].partition(" JobName=")
            continue
        for m in re.finditer(r"(\w+)=(\S*)", line):
            info.setdefault(m.group(1), m.group(2))
    return info


def status(job: str) -> str:
    """One line (two while pending): state, exit code or run time, nodes, log file."""
    i = job_info(job)
    state = i.get("JobState", "?")
    text = f"job {job}: {state}"
    if state in ("PENDING", "REQUEUED"):
        text += f" ({i.get('Reason', '?')})"
    elif state == "RUNNING":
        text += f" for {i.get('RunTime', '?')} of {i.get('TimeLimit', '?')} on {i.get('NodeList', '?')}"
    else:
        text += f", exit code {i.get('ExitCode', '?')}"
    if i.get("Restarts", "0") != "0":
        text += f", requeued {i['Restarts']} time(s)"
    if i.get("StdOut"):
        text += f"\n  log: {i['StdOut']}"
    return text


def cancel(job: str) -> str:
    job_info(job)  # a clear error for an unknown job, before scancel's terse one
    result = _tool("scancel", job)
    if result.returncode != 0:
        raise LaunchError(f"scancel {job}: {_last_line(result)}")
    return f"job {job}: cancel requested"


def log_paths(job: str, run_dir: str | None = None) -> list[Path]:
    """The job's stdout and stderr files: from scontrol, or RUN_DIR/slurm-JOB.out/.err once SLURM forgot it."""
    try:
        info = job_info(job)
        paths = [Path(info[k]) for k in ("StdOut", "StdErr") if info.get(k)]
    except LaunchError:
        if run_dir is None:
            raise
        paths = [Path(run_dir) / f"slurm-{check_job_id(job)}.{s}" for s in ("out", "err")]
    unique = list(dict.fromkeys(paths))
    if not any(p.exists() for p in unique):
        raise LaunchError(f"job {job}: no log file yet at {', '.join(map(str, unique))} (still pending?)")
    return unique


def tail(path: Path, lines: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 256 * 1024))  # enough for any sane number of lines
        return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])


class SlurmLauncher:
    """`meshtune slurm submit`: RUN_DIR/submit.sbatch for the job, submitted with sbatch (the Launcher
    interface, meshtune/launch/base.py)."""

    def __init__(self, job: SlurmJob, run_dir: str | os.PathLike):
        self.job, self.run_dir = job, run_dir

    def world_sizes(self) -> list[int]:
        return [self.job.nodes * self.job.nproc_per_node]

    def launch(self, config: str, overrides: list[str], checks, dry_run: bool = False) -> int:
        """Write the script (and print its path when `dry_run`), else submit it and print the job id."""
        plans = checks()  # the layout now, not after hours in the queue
        text = render_sbatch(config, overrides, self.run_dir, self.job)
        if not dry_run and shutil.which("sbatch") is None:
            _tool("sbatch")  # raises the one-line "SLURM is not installed" error before anything is written
        path = write_script(text, self.run_dir)
        if dry_run:
            print(path)
            return 0
        job_id = submit(path)
        layout = plans[0].describe() if plans else f"{self.world_sizes()[0]} ranks"
        print(f"meshtune: submitted job {job_id}: {self.job.nodes} node(s) x {self.job.nproc_per_node} rank(s), "
              f"{layout}; script {path}; logs {Path(self.run_dir).absolute()}/slurm-{job_id}.out", file=sys.stderr)
        print(job_id)
        return 0
