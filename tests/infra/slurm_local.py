"""A throwaway single-node SLURM cluster for tests, from Debian's packages (root, no systemd needed).

    with LocalSlurm.start_or_skip(tmp_dir) as cluster:     # pytest.skip with the reason where it cannot run
        job = cluster.run(["sbatch", "--parsable", script]).stdout.strip()
        info = cluster.wait_job(job, timeout=300)

Everything of the cluster lives under one directory (config, state, spool, logs) and its daemons listen on
ports of their own, so it never touches /etc/slurm or a cluster already on the machine. munge is shared:
an already running munged is reused; one started here is stopped again. The daemons run in the foreground
as children of this process, so teardown stops exactly them. Every wait has a timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo", "munged", "munge"]
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
MUNGE_PIDFILE = Path("/run/munge/munged.pid")


class Unavailable(RuntimeError):
    """The cluster cannot run here (not root, no packages); the message is the reason to skip."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_packages(timeout: float = 420) -> None:
    """apt-get install the SLURM and munge packages unless their binaries are already there."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise Unavailable("SLURM is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise Unavailable("SLURM is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + timeout
    for argv in (["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, env=env,
                               timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise Unavailable(f"`{' '.join(argv)}` did not finish in time") from None
        if r.returncode != 0:
            tail = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or [""]
            raise Unavailable(f"`{' '.join(argv[:2])}` failed: {tail[0]}")
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        raise Unavailable(f"installed {' '.join(PACKAGES)} but {', '.join(missing)} is still missing")


def write_conf(path: Path, root: Path, cluster: str, ctld_host: str, nodes: str, extra: str = "") -> None:
    """A minimal slurm.conf: munge auth, no accounting, one partition over `nodes` (NodeName lines)."""
    path.write_text(f"""ClusterName={cluster}
SlurmctldHost={ctld_host}
SlurmUser=root
AuthType=auth/munge
# a requeued job may start again only once its old credential expired (default 120 s): a shorter one keeps
# requeue tests short without starting the job early (StartTime=now did: "Job credential revoked")
AuthInfo=cred_expire=10
CredType=cred/munge
{extra}StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")


class LocalSlurm:
    """One slurmctld + one slurmd on this machine, configured under `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.started_munged = False
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    @classmethod
    def start_or_skip(cls, root: Path) -> LocalSlurm:
        import pytest

        if os.geteuid() != 0:
            pytest.skip("a local SLURM cluster needs root (slurmd runs jobs as their users)")
        try:
            install_packages()
            return cls(root).start()
        except Unavailable as e:
            pytest.skip(f"no local SLURM cluster: {e}")

    # ---- lifecycle ----------------------------------------------------------------------------------

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        hw = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
        hw = re.sub(r"^NodeName=\S+\s*", "", hw)
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, slurmd_port = _free_port(), _free_port()
        write_conf(self.conf, self.root, "meshtunetest", f"{host}(127.0.0.1)",
                   f"NodeName={host} NodeAddr=127.0.0.1 {hw} State=UNKNOWN\n",
                   f"SlurmctldPort={ctld_port}\nSlurmdPort={slurmd_port}\n")

    def _start_munged(self) -> None:
        if self._munge_ok():
            return
        MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if not key.is_file() or key.stat().st_size == 0:
            subprocess.run(["mungekey", "--create", f"--keyfile={key}", "--force"], check=True, timeout=30)
            shutil.chown(key, "munge", "munge")
            key.chmod(0o600)
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, timeout=30)  # forks, writes pid
        self.started_munged = True
        self._wait(self._munge_ok, 10, "munged did not answer")

    @staticmethod
    def _munge_ok() -> bool:
        try:
            return subprocess.run("munge -n | unmunge", shell=True, capture_output=True, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def start(self, timeout: float = 60) -> LocalSlurm:
        try:
            self._write_conf()
            self._start_munged()
            for daemon in ("slurmctld", "slurmd"):
                log = open(self.root / "log" / f"{daemon}.stdout", "wb")  # noqa: SIM115 (closed with the process)
                self.procs.append(subprocess.Popen([daemon, "-D", "-f", str(self.conf)], stdout=log,
                                                   stderr=subprocess.STDOUT, env=self.env, start_new_session=True))
            self._wait(lambda: self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip() == "idle", timeout,
                       "the node did not become idle")
        except Exception as e:
            self.stop()
            if isinstance(e, (Unavailable, OSError, subprocess.SubprocessError)):
                raise Unavailable(f"{e}\n{self.logs()}") from e
            raise
        return self

    def stop(self) -> None:
        """Cancel what still runs, stop the daemons this object started (and munged if it started it)."""
        if self.procs and all(p.poll() is None for p in self.procs):
            self.run(["scancel", "--full", "--quiet", "--partition=debug"], check=False)
            try:
                self._wait(lambda: not self.run(["squeue", "-h"], check=False).stdout.strip(), 30, "")
            except TimeoutError:
                pass
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        self.procs.clear()
        if self.started_munged and MUNGE_PIDFILE.is_file():
            try:
                os.kill(int(MUNGE_PIDFILE.read_text().strip()), 15)
            except (ValueError, ProcessLookupError):
                pass
            self.started_munged = False

    def __enter__(self) -> LocalSlurm:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- using it -----------------------------------------------------------------------------------

    def run(self, argv: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(argv, capture_output=True, text=True, env={**self.env, **kw.pop("env", {})},
                           timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def job_state(self, job: str) -> dict[str, str]:
        out = self.run(["scontrol", "show", "job", job], check=False).stdout
        return dict(re.findall(r"\b(JobState|ExitCode|Restarts|JobName|Reason)=(\S+)", out))

    def wait_job(self, job: str, timeout: float) -> dict[str, str]:
        """Wait until the job leaves the queue; its final JobState/ExitCode (scontrol keeps them MinJobAge)."""
        try:
            self._wait(lambda: not self.run(["squeue", "-h", "-j", job], check=False).stdout.strip(), timeout, "")
        except TimeoutError:
            self.run(["scancel", job], check=False)
            raise AssertionError(f"job {job} still queued after {timeout} s: {self.job_state(job)}\n"
                                 f"{self.logs()}") from None
        return self.job_state(job)

    def wait_state(self, job: str, state: str, timeout: float) -> None:
        self._wait(lambda: self.job_state(job).get("JobState") == state, timeout,
                   f"job {job} did not reach {state}")

    def logs(self, lines: int = 30) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"==> {f} <==\n" + "\n".join(text))
        return "\n".join(out)

    @staticmethod
    def _wait(ready, timeout: float, what: str, every: float = 0.25) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(every)
        raise TimeoutError(f"{what} within {timeout} s")
