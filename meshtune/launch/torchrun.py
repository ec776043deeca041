"""`meshtune launch`: start `meshtune train` through torchrun, on this machine or on every node of a cluster.

    meshtune launch CFG --nproc-per-node 2                                      one machine (standalone)
    meshtune launch CFG --nnodes 2 --nproc-per-node 8 --rdzv-endpoint node0:29500 --rdzv-id job7   on each node
    meshtune launch CFG --nnodes 2 --node-rank R --rdzv-endpoint node0:29500    static ranks: R = 0, 1
    meshtune launch CFG --nnodes 1:4 --rdzv-endpoint node0:29500 --max-restarts 3   elastic: 1 to 4 nodes

Three rendezvous modes, chosen by the flags given:
- standalone (no node flags): torchrun's own c10d rendezvous on loopback with a free port, so several jobs
  can share one machine.
- c10d (`--rdzv-endpoint` without `--node-rank`): the same command on every node; node ranks are assigned
  on arrival, so node counts may be a range (`--nnodes MIN:MAX`) and nodes may be replaced on restart.
- static (`--node-rank`): fixed node ranks; node 0 hosts the store at the endpoint. No elastic ranges.

Workers run `python -m meshtune train CONFIG k=v ...` with the same Python as the launcher. This module must
not import torch (`meshtune launch --dry-run` and the CLI's help stay instant).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

from meshtune.config import ConfigError
from meshtune.exit_codes import STOPPED, STOPPED_LINE

DEFAULT_RDZV_ID = "meshtune"

# torchrun stops its workers with the signal it receives (then SIGKILLs them after its grace period) for
# the signals on this list; any other signal, SIGUSR1 by default, kills torchrun and leaves the workers
# training unsupervised. torch 2.13 reads the list from --signals-to-handle (or PET_SIGNALS_TO_HANDLE) and
# overwrites TORCHELASTIC_SIGNALS_TO_HANDLE with it; older releases read only the latter: set both.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# With torch 2.13, torchrun's agent shares its rendezvous TCPStore with the workers by default; after a
# restart the new gloo workers then read the previous round's addresses (connection refused, or a node
# hangs). Measured on 2 namespace "hosts": elastic restart fails without this and passes with it.
WORKER_ENV_DEFAULTS = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PET_SIGNALS_TO_HANDLE": TORCHRUN_SIGNALS,
                       "TORCHELASTIC_SIGNALS_TO_HANDLE": TORCHRUN_SIGNALS}
# seconds torchrun waits for its workers to stop after a signal before it SIGKILLs them (default 30);
# `meshtune launch --grace-period S` sets it, and a rank (runtime/env.py) warns when a save takes longer
GRACE_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
# the signals `meshtune launch` passes on to torchrun (which runs in a session of its own, see run_torchrun)
FORWARDED = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP")


class LaunchError(ConfigError):
    """A user error in launcher flags or the cluster environment; the message names the flag and the fix."""


@dataclass(frozen=True)
class NodeSpec:
    """Where and how torchrun finds its peers. Build it with `node_spec()`, which validates the flags."""

    min_nodes: int = 1
    max_nodes: int = 1
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str = DEFAULT_RDZV_ID
    max_restarts: int = 0

    @property
    def mode(self) -> str:
        """`standalone`, `static` (fixed node ranks) or `c10d` (ranks assigned at rendezvous)."""
        if self.rdzv_endpoint is None:
            return "standalone"
        return "static" if self.node_rank is not None else "c10d"

    @property
    def nnodes(self) -> str:
        return str(self.min_nodes) if self.min_nodes == self.max_nodes else f"{self.min_nodes}:{self.max_nodes}"


def parse_nnodes(text: str) -> tuple[int, int]:
    """`N` or `MIN:MAX` -> (min, max).

    Raises:
        LaunchError: not integers, a count below 1, or MIN > MAX.
    """
    parts = str(text).split(":")
    try:
        if len(parts) > 2:
            raise ValueError
        lo, hi = int(parts[0]), int(parts[-1])
    except ValueError:
        raise LaunchError(f"--nnodes: {text!r} is not N or MIN:MAX (e.g. 2, or 2:4 for elastic)") from None
    if lo < 1:
        raise LaunchError(f"--nnodes: node count must be >= 1, got {text!r}")
    if lo > hi:
        raise LaunchError(f"--nnodes: MIN {lo} is larger than MAX {hi} in {text!r}; write MIN:MAX, e.g. {hi}:{lo}")
    return lo, hi


def parse_endpoint(text: str, flag: str = "--rdzv-endpoint") -> tuple[str, int]:
    """`host:port` (or `[v6addr]:port`) -> (host, port).

    Raises:
        LaunchError: no host, no port, or a port outside 1-65535.
    """
    text = str(text)
    if text.startswith("["):  # [v6addr]:port
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise LaunchError(f"{flag}: write an IPv6 address in brackets, e.g. [{host}]:{port}")
    if not sep or not host:
        raise LaunchError(f"{flag}: {text!r} has no {'port' if not sep else 'host'}; write host:port, e.g. "
                          "node0:29500")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise LaunchError(f"{flag}: port {port!r} in {text!r} is not a number in 1-65535")
    if any(c.isspace() for c in host):
        raise LaunchError(f"{flag}: host {host!r} contains whitespace")
    return host, int(port)


def node_spec(nnodes: str | int | None = None, node_rank: int | None = None, rdzv_endpoint: str | None = None,
              rdzv_id: str | None = None, max_restarts: int = 0) -> NodeSpec:
    """Validate the multi-node flags of `meshtune launch` and pick the rendezvous mode.

    Args:
        nnodes: `N` or `MIN:MAX`; default 1.
        node_rank: this node's rank (static rendezvous); None = assigned by the c10d rendezvous.
        rdzv_endpoint: `host:port` of the rendezvous store (on node 0); needed for more than one node.
        rdzv_id: job id shared by all nodes of one job; default `meshtune`.
        max_restarts: how often torchrun restarts the worker group after a failure.

    Raises:
        LaunchError: naming the flag, for any invalid value or combination.
    """
    lo, hi = parse_nnodes("1" if nnodes is None else str(nnodes))
    if max_restarts < 0:
        raise LaunchError(f"--max-restarts: must be >= 0, got {max_restarts}")
    if rdzv_endpoint is not None:
        parse_endpoint(rdzv_endpoint)
    if rdzv_id is not None and (not rdzv_id or any(c.isspace() for c in rdzv_id)):
        raise LaunchError(f"--rdzv-id: {rdzv_id!r} must be a non-empty word with no spaces, e.g. the job id")
    if node_rank is not None:
        if lo != hi:
            raise LaunchError(f"--node-rank: fixed node ranks need a fixed --nnodes, got {lo}:{hi}; drop "
                              "--node-rank to let the c10d rendezvous assign ranks")
        if not 0 <= node_rank < hi:
            raise LaunchError(f"--node-rank: {node_rank} is not in 0..{hi - 1} for --nnodes {hi}")
    if rdzv_endpoint is None:
        if hi > 1:
            raise LaunchError(f"--rdzv-endpoint: needed with --nnodes {lo if lo == hi else f'{lo}:{hi}'}; give "
                              "host:port of the first node, e.g. node0:29500")
        if rdzv_id is not None:
            raise LaunchError("--rdzv-id: only used with --rdzv-endpoint host:port (multi-node rendezvous)")
    return NodeSpec(lo, hi, node_rank, rdzv_endpoint, rdzv_id or DEFAULT_RDZV_ID, max_restarts)


def train_argv(config: str, overrides: list[str]) -> list[str]:
    """What each worker runs after `torchrun ...`: `-m meshtune train CONFIG k=v ...`."""
    return ["-m", "meshtune", "train", config, *overrides]


def rendezvous_args(spec: NodeSpec, nproc_per_node: int, node_rank: int | None = None) -> list[str]:
    """torchrun's flags for `spec`; `node_rank` replaces spec.node_rank (to print every node's command)."""
    args = [f"--nproc-per-node={nproc_per_node}"]
    if spec.mode == "standalone":
        return ["--standalone", *args, f"--max-restarts={spec.max_restarts}"]
    args = [f"--nnodes={spec.nnodes}", *args]
    if spec.mode == "static":
        rank = spec.node_rank if node_rank is None else node_rank
        args += ["--rdzv-backend=static", f"--node-rank={rank}"]
    else:
        args += ["--rdzv-backend=c10d"]
    return [*args, f"--rdzv-endpoint={spec.rdzv_endpoint}", f"--rdzv-id={spec.rdzv_id}",
            f"--max-restarts={spec.max_restarts}"]


def torchrun_argv(config: str, overrides: list[str], nproc_per_node: int, *, nodes: NodeSpec | None = None,
                  node_rank: int | None = None) -> list[str]:
    """The exact command `meshtune launch` runs (on node `node_rank`, for a static multi-node spec).

    `nodes` (default: standalone, no restarts) is the only source of the rendezvous flags and --max-restarts.
    """
    spec = nodes if nodes is not None else NodeSpec()
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous_args(spec, nproc_per_node, node_rank),
            *train_argv(config, overrides)]


def worker_env(environ: dict[str, str], nproc_per_node: int, grace_s: int | None = None) -> dict[str, str]:
    """The launcher's environment plus the defaults workers need; a value the user set is kept.
    `grace_s` (`--grace-period`) replaces torchrun's wait between a signal and SIGKILL."""
    env = dict(environ)
    for key, value in WORKER_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    if grace_s is not None:
        env[GRACE_ENV] = env["PET_SHUTDOWN_TIMEOUT"] = str(grace_s)
    # one intra-op thread per rank unless the user chose: N ranks x all cores each would oversubscribe
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    return env


def dry_run_text(config: str, overrides: list[str], nproc_per_node: int, spec: NodeSpec) -> str:
    """The command for each node, as shell lines. Multi-node lines carry the worker environment fixes."""
    if spec.mode == "standalone":
        return shlex.join(torchrun_argv(config, overrides, nproc_per_node, nodes=spec))
    prefix = " ".join(f"{k}={shlex.quote(os.environ.get(k, v))}" for k, v in WORKER_ENV_DEFAULTS.items())
    if spec.mode == "c10d":
        header = (f"# the same command on each of the {spec.nnodes} nodes (c10d rendezvous at {spec.rdzv_endpoint}, "
                  f"id {spec.rdzv_id}; node ranks are assigned on arrival):")
        return f"{header}\n{prefix} {shlex.join(torchrun_argv(config, overrides, nproc_per_node, nodes=spec))}"
    lines = []
    for rank in range(spec.max_nodes):
        here = " (this node)" if rank == spec.node_rank else ""
        argv = torchrun_argv(config, overrides, nproc_per_node, nodes=spec, node_rank=rank)
        lines += [f"# node {rank} of {spec.max_nodes}{here}:", f"{prefix} {shlex.join(argv)}"]
    return "\n".join(lines)


def launch(config: str, overrides: list[str], nproc_per_node: int, dry_run: bool = False, *,
           nodes: NodeSpec | None = None, grace_s: int | None = None, checks=None) -> int:
    """Run torchrun on this node (or print each node's command when `dry_run`); returns its exit code.

    Args:
        config: path of the YAML config, passed to every worker.
        overrides: `key=value` overrides, passed to every worker unchanged.
        nproc_per_node: worker processes on this node.
        dry_run: print the command(s) and run nothing.
        nodes: the spec from `node_spec()`, the one source of the rendezvous flags and of torchrun's
            restarts after a failure (`node_spec(max_restarts=N)`); None = standalone on this machine,
            no restarts.
        grace_s: seconds torchrun gives the workers to checkpoint and stop after a signal before it
            SIGKILLs them (None: torchrun's default, 30).
        checks: the launcher's start-up checks (raise for a bad input), run while torchrun starts, before
            it may start a rank (run_torchrun); None: none.
    """
    spec = nodes if nodes is not None else NodeSpec()
    if dry_run:
        if checks is not None:
            checks()
        print(dry_run_text(config, overrides, nproc_per_node, spec))
        return 0
    return run_torchrun(torchrun_argv(config, overrides, nproc_per_node, nodes=spec),
                        worker_env(dict(os.environ), nproc_per_node, grace_s), checks)


def _die_with_parent() -> None:
    """In torchrun's process, before exec: SIGTERM when the launcher dies (even by SIGKILL), so a session of
    its own never outlives the launcher. Linux only; elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _held(argv: list[str], fd: int) -> list[str]:
    """`argv` (`python -m torch.distributed.run ARGS`) as meshtune.launch.gate, which waits for a go on `fd`."""
    assert argv[1:3] == ["-m", "torch.distributed.run"], argv
    return [argv[0], "-m", "meshtune.launch.gate", str(fd), *argv[3:]]


def run_torchrun(argv: list[str], env: dict[str, str], checks=None) -> int:
    """Run torchrun, forwarding its output with the agent's failure banner condensed to one line.

    With `checks`, torchrun starts held (meshtune.launch.gate: its interpreter and torch import, ~1 s, overlap
    the checks) and is let go only once they return; when they raise, it ends without starting a rank and the
    exception propagates.

    torchrun runs in a session of its own, so a signal meant for the job (SIGTERM, Ctrl-C's SIGINT on the
    terminal's process group, SIGUSR1) reaches it exactly once: from this process, which passes the first
    one on and waits for the ranks to checkpoint and stop. Returns exit_codes.STOPPED when they did, the
    first failed rank's own exit code when one failed (torchrun says 1 whatever its workers did), else
    torchrun's."""
    read_fd = write_fd = None
    if checks is not None:
        read_fd, write_fd = os.pipe()
        argv = _held(argv, read_fd)
    try:
        proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=_die_with_parent, pass_fds=(read_fd,) if checks is not None else ())
    finally:
        if read_fd is not None:
            os.close(read_fd)
    if checks is not None:
        try:
            checks()
        except BaseException:
            os.close(write_fd)  # the gate reads end of file: it exits 0, no rank started
            proc.communicate()
            raise
        from meshtune.launch.gate import GO

        os.write(write_fd, GO)
        os.close(write_fd)
    summary = FailureSummary()
    received: list[int] = []

    def forward(signum, frame) -> None:
        if received:  # torchrun is stopping its workers already; a second signal would cut that short
            print(f"meshtune launch: already stopping on {signal.Signals(received[0]).name}: the ranks save a "
                  "checkpoint; torchrun kills them if they take longer than its grace period", file=sys.stderr,
                  flush=True)
            return
        received.append(signum)
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in (getattr(signal, n) for n in FORWARDED)}
    try:
        summary.forward(proc.stderr, sys.stderr)
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if summary.stopped:
        return STOPPED
    if code != 0 and summary.line():
        print(summary.line(), file=sys.stderr, flush=True)
    elif received:
        print(f"meshtune launch: torchrun ended on {signal.Signals(received[0]).name} (exit code {code}) before "
              "the ranks reported a checkpoint", file=sys.stderr, flush=True)
    code = summary.exitcode if code != 0 and summary.exitcode else code
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class TorchrunLauncher:
    """`meshtune launch`: torchrun on this machine, or on each node of a multi-node job (the Launcher
    interface, meshtune/launch/base.py)."""

    def __init__(self, nproc_per_node: int, nodes: NodeSpec | None = None, grace_s: int | None = None):
        if nproc_per_node < 1:
            raise LaunchError(f"--nproc-per-node: must be >= 1, got {nproc_per_node}")
        if grace_s is not None and grace_s < 1:
            raise LaunchError(f"--grace-period: must be >= 1 second, got {grace_s}")
        self.nproc_per_node, self.nodes = nproc_per_node, nodes if nodes is not None else NodeSpec()
        self.grace_s = grace_s

    def world_sizes(self) -> list[int]:
        return [n * self.nproc_per_node for n in sorted({self.nodes.min_nodes, self.nodes.max_nodes})]

    def launch(self, config: str, overrides: list[str], checks, dry_run: bool = False) -> int:
        return launch(config, overrides, self.nproc_per_node, dry_run, nodes=self.nodes, grace_s=self.grace_s,
                      checks=checks)


# torchrun's elastic agent logs (glog-style `E1202 08:00:00.123 1234 torch/distributed/...`) and its
# ChildFailedError traceback + summary banner: tens of lines that name no cause (the failed worker printed
# its own one line before). `FailureSummary` drops them and keeps the rank and exit code for one line.
_AGENT_LOG = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S*torch/distributed/")
_FIELD = re.compile(r"^\s*(rank|exitcode)\s*:\s*(-?\d+)")


class FailureSummary:
    """Forwards a torchrun stderr stream line by line, minus the agent's failure noise, which it condenses."""

    def __init__(self):
        self.rank: int | None = None
        self.exitcode: int | None = None
        self.failed = 0
        self.stopped = False  # a rank said the job stopped on a signal with a checkpoint (cli/train.py)
        self._held: list[str] = []  # a traceback being read: the agent's is dropped, a worker's printed
        self._banner = self._root = False

    def line(self) -> str:
        if self.rank is None:
            return ""
        others = f" ({self.failed} ranks failed)" if self.failed > 1 else ""
        if self.exitcode is not None and self.exitcode < 0:  # killed (by a peer that found it frozen, or the OS)
            return (f"meshtune launch: torchrun: rank {self.rank} was killed by {_signal_name(-self.exitcode)} "
                    f"(the first to end){others}; the lines above say why")
        return (f"meshtune launch: torchrun: rank {self.rank} exited with code {self.exitcode} (the first to fail)"
                f"{others}; its error is the line above")

    def keep(self, line: str) -> list[str]:
        """The lines to print for one input line (none, it, or a held traceback)."""
        text = line.rstrip("\n")
        if self._banner:
            if text.startswith("Root Cause"):
                self._root = True
            elif text.startswith("[") and text.endswith("]:") and not self._root:
                self.failed += 1
            elif self._root and (m := _FIELD.match(text)):
                if m.group(1) == "rank" and self.rank is None:
                    self.rank = int(m.group(2))
                elif m.group(1) == "exitcode" and self.exitcode is None:
                    self.exitcode = int(m.group(2))
            elif self._root and text.startswith("====="):
                self._banner = self._root = False
            return []
        if self._held:
            self._held.append(line)
            if text.startswith((" ", "\t")) or not text:
                return []
            held, self._held = self._held, []
            if "torch.distributed.elastic" in text:  # the agent's ChildFailedError: its banner follows
                self._banner = True
                return []
            return held
        if text.startswith("Traceback (most recent call last):"):
            self._held = [line]
            return []
        if text.startswith(STOPPED_LINE):
            self.stopped = True
        if _AGENT_LOG.match(text):
            return []
        return [line]

    def forward(self, stream, out) -> None:
        """Copy `stream` (bytes) to `out` (text) as it arrives; partial lines (progress bars) pass at once."""
        buf = b""
        while chunk := os.read(stream.fileno(), 65536):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                for kept in self.keep(raw.decode(errors="replace") + "\n"):
                    out.write(kept)
            cut = buf.rfind(b"\r") + 1  # a progress bar's \r updates pass at once, before any newline
            if cut and not self._held and not self._banner:
                out.write(buf[:cut].decode(errors="replace"))
                buf = buf[cut:]
            out.flush()
        for kept in self._held + ([buf.decode(errors="replace")] if buf else []):
            out.write(kept)
        out.flush()
