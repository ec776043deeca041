"""A throwaway multi-node SLURM cluster made of network-namespace hosts (tests/infra/netns.py).

    with NetnsSlurm.start_or_skip(tmp_dir, nodes=2) as cluster:     # pytest.skip with the reason otherwise
        job = cluster.run(["sbatch", "--parsable", script]).stdout.strip()   # clients run inside node0
        info = cluster.wait_job(job, timeout=300)

slurmctld and a slurmd run in node0, a slurmd in each other node, all in the foreground as children of this
process, configured under one directory (nothing in /etc/slurm is read or written). Jobs run inside the
nodes, so `srun torchrun --rdzv-endpoint $head:PORT` really crosses the namespaces' network. munge is
shared with the machine, as in tests/infra/slurm_local.py (started here only if not running, and then
stopped again). Teardown stops the daemons and removes the namespaces even after a failure.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.infra.netns import NetnsHosts
from tests.infra.netns import Unavailable as NoNamespaces
from tests.infra.slurm_local import LocalSlurm, Unavailable, install_packages, write_conf


class NetnsSlurm(LocalSlurm):
    """SLURM on `nodes` namespace hosts; `run` executes client commands inside node0."""

    def __init__(self, root: Path, nodes: int = 2):
        super().__init__(root)
        self.hosts = NetnsHosts(self.root / "netns", nodes)

    @classmethod
    def start_or_skip(cls, root: Path, nodes: int = 2) -> NetnsSlurm:
        import os

        import pytest

        if os.geteuid() != 0:
            pytest.skip("a SLURM cluster of network namespaces needs root")
        try:
            install_packages()
            return cls(root, nodes).start()
        except (Unavailable, NoNamespaces) as e:
            pytest.skip(f"no namespace SLURM cluster: {e}")

    def _write_conf(self) -> None:
        hw = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
        cpu = re.search(r"CPUs=.* ThreadsPerCore=\d+", hw).group(0)
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        nodes = "".join(f"NodeName=node{i} NodeAddr={self.hosts.addr(i)} {cpu} RealMemory=2000\n"
                        for i in range(self.hosts.nodes))
        write_conf(self.conf, self.root, "meshtunens", f"node0({self.hosts.addr(0)})", nodes)

    def start(self, timeout: float = 60) -> NetnsSlurm:
        try:
            self.hosts.start()
            self._write_conf()
            self._start_munged()
            daemons = [(0, "slurmctld")] + [(i, "slurmd") for i in range(self.hosts.nodes)]
            for i, daemon in daemons:
                self.procs.append(self.hosts.popen(i, [daemon, "-D", "-f", str(self.conf)],
                                                   log=self.root / "log" / f"{daemon}-node{i}.stdout", env=self.env))
            want = f"idle {self.hosts.nodes}"
            self._wait(lambda: self.run(["sinfo", "-h", "-o", "%T %D"], check=False).stdout.strip() == want,
                       timeout, f"{self.hosts.nodes} idle nodes")
        except BaseException as e:
            self.stop()
            if isinstance(e, (TimeoutError, OSError, subprocess.SubprocessError)):
                raise Unavailable(f"{e}\n{self.logs()}") from e
            raise
        return self

    def stop(self) -> None:
        """Cancel jobs, stop the daemons (LocalSlurm.stop), then remove the namespaces and all left in them."""
        try:
            super().stop()
        finally:
            self.hosts.stop()

    def run(self, argv: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """`argv` inside node0 with this cluster's SLURM_CONF."""
        env = {**self.env, **kw.pop("env", {})}
        r = subprocess.run(self.hosts.argv(0, argv), capture_output=True, text=True, env=env, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r
