"""Fake hosts for multi-node tests: Linux network namespaces joined by a bridge (root, iproute2, util-linux).

    with NetnsHosts.start_or_skip(tmp_dir, nodes=2) as hosts:   # pytest.skip with the reason where it cannot run
        proc = hosts.popen(0, ["python", "-m", "meshtune", "launch", ...], log=tmp_dir / "node0.log")
        hosts.pids(1)                                          # every process inside node1

Node i is a network namespace with `eth0` = 10.X.Y.(i+1)/24, a veth pair plugged into a bridge that lives in a
hub namespace of its own (so nothing touches the host's network). Commands enter a node with `nsenter --net`
plus a private UTS and mount namespace, in which the hostname is `node<i>` and /etc/hosts is bind-mounted from
`root/hosts` (every node resolves every other by name; c10d rendezvous hangs when each hostname resolves to
127.0.0.1). Only the network namespace is entered, not a whole `ip netns exec`, because that remounts /sys
and slurmd then finds no cgroup file system. Names carry this process's id, so teardown removes exactly
what this object made, and it kills every process left inside the namespaces first. Every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import zlib
from pathlib import Path

TOOLS = ["ip", "nsenter", "unshare", "mount"]


class Unavailable(RuntimeError):
    """Namespaces cannot be made here (not root, tools missing, no CAP_SYS_ADMIN); the message says why."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise Unavailable(f"`ip {' '.join(args)}` failed: {r.stderr.strip() or r.returncode}")
    return r


class NetnsHosts:
    """`nodes` fake hosts named node0..node{n-1}; node0 is 10.X.Y.1."""

    def __init__(self, root: Path, nodes: int = 2):
        self.root = Path(root)
        self.nodes = nodes
        tag = os.getpid() % 10000 * 100 + zlib.crc32(str(self.root).encode()) % 100  # per process and root
        self.prefix = f"mt{tag}"
        self.subnet = f"10.{200 + tag % 50}.{tag % 250}"
        self.hub = f"{self.prefix}hub"
        self.hosts_file = self.root / "hosts"
        self.made: list[str] = []  # namespaces created, for teardown
        self.procs: list[subprocess.Popen] = []

    @classmethod
    def start_or_skip(cls, root: Path, nodes: int = 2) -> NetnsHosts:
        import pytest

        try:
            return cls(root, nodes).start()
        except Unavailable as e:
            pytest.skip(f"no network-namespace hosts: {e}")

    def name(self, i: int) -> str:
        return f"{self.prefix}n{i}"

    def addr(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    # ---- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> NetnsHosts:
        if os.geteuid() != 0:
            raise Unavailable("network namespaces need root")
        missing = [t for t in TOOLS if not shutil.which(t)]
        if missing:
            raise Unavailable(f"{', '.join(missing)} not found (Debian: apt-get install iproute2 util-linux)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.hosts_file.write_text("127.0.0.1 localhost\n" +
                                       "".join(f"{self.addr(i)} node{i}\n" for i in range(self.nodes)))
            self._add(self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for i in range(self.nodes):
                ns, port = self.name(i), f"{self.prefix}p{i}"
                self._add(ns)
                _ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("link", "set", port, "netns", self.hub)
                _ip("-n", self.hub, "link", "set", port, "master", "br0")
                _ip("-n", self.hub, "link", "set", port, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
            self._wait_reachable(timeout=20)
        except BaseException:
            self.stop()
            raise
        return self

    def _add(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.made.append(ns)

    def _wait_reachable(self, timeout: float) -> None:
        """Until node0 reaches every node over the bridge (the bridge needs a moment to forward)."""
        deadline = time.monotonic() + timeout
        for i in range(1, self.nodes):
            while True:
                r = self.run(0, ["ping", "-c", "1", "-W", "1", self.addr(i)], check=False, timeout=5) \
                    if shutil.which("ping") else self.run(0, ["true"], timeout=5)
                if r.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise Unavailable(f"node0 cannot reach node{i} ({self.addr(i)}) within {timeout} s")
                time.sleep(0.2)

    def stop(self) -> None:
        """Kill everything still running in the namespaces, then delete them. Safe to call twice."""
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for ns in reversed(self.made):
            for _ in range(50):  # processes may fork while we kill: repeat until the namespace is empty
                pids = self.pids_in(ns)
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
            _ip("netns", "del", ns, check=False)
        self.made.clear()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()

    def __enter__(self) -> NetnsHosts:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- using it -----------------------------------------------------------------------------------

    def argv(self, i: int, argv: list[str]) -> list[str]:
        """`argv` as run inside node i (its network, hostname node<i> and the shared hosts file)."""
        inner = f'mount --bind {self.hosts_file} /etc/hosts && hostname node{i} && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.name(i)}", "unshare", "--uts", "--mount",
                "sh", "-c", inner, "sh", *argv]

    def run(self, i: int, argv: list[str], check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(self.argv(i, argv), capture_output=True, text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"node{i}: {' '.join(argv)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def popen(self, i: int, argv: list[str], log: Path, **kw) -> subprocess.Popen:
        """Start `argv` in node i in the background, stdout+stderr to `log`; stop() kills it if still running."""
        with open(log, "wb") as out:
            p = subprocess.Popen(self.argv(i, argv), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                 **kw)
        self.procs.append(p)
        return p

    @staticmethod
    def pids_in(ns: str) -> list[int]:
        r = _ip("netns", "pids", ns, check=False)
        return [int(x) for x in r.stdout.split()] if r.returncode == 0 else []

    def pids(self, i: int) -> list[int]:
        """Every process inside node i."""
        return self.pids_in(self.name(i))
