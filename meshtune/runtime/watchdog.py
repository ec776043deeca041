"""Hang detection: a thread per rank that names the rank, the operation and the step of a stuck run.

A rank is stuck when its main thread has sat in the same call (the same Python frame at the same
instruction) for `timeout_s`: a collective waiting for a peer that died, was stopped (SIGSTOP) or is itself
stuck elsewhere, or any other call that never returns. The watchdog then prints

    meshtune: rank 1 stuck in all_reduce at step 5 for 30.2 s (meshtune/runtime/trainer.py:151 in _reduce)
    meshtune: no heartbeat from rank(s) 3 for 2.0 s: stopped, dead or unreachable

and exits the process (exit code EXIT_STUCK), so torchrun stops the job (or restarts it, with
--max-restarts) instead of hanging silently. The second line comes from heartbeats every rank's watchdog
adds to the job's TCPStore: a rank whose counter stands still is the one that stopped answering; a rank that
is alive but stuck outside a collective reports itself. A collective's own timeout (the process group's,
also `parallel.timeout_s`) may fire first: `describe_failure` names the operation of that error.

Every store call has a deadline (`BoundedStore`): a TCPStore client whose host process is stopped (SIGSTOP
of rank 0, which hosts the store) waits in recv() forever, holding the client's lock. A store that has not
answered for `timeout_s` ends the rank with a line naming rank 0 as unreachable.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from types import FrameType, TracebackType

from meshtune.exit_codes import STUCK as EXIT_STUCK

_DIST = os.sep + os.path.join("torch", "distributed") + os.sep
_C10D = os.path.join("distributed", "distributed_c10d.py")
_FUNCOL = os.path.join("distributed", "_functional_collectives.py")
_DTENSOR = os.path.join("distributed", "tensor") + os.sep


def _op_and_site(frames: list[traceback.FrameSummary]) -> tuple[str, str]:
    """(operation, meshtune call site) of a stack, outermost frame first.

    The operation is the innermost public collective of torch.distributed (all_reduce, barrier, ...), else
    the innermost torch.distributed function (e.g. FSDP's wait_for_unshard), else the innermost function."""
    public = [f for f in frames if f.filename.endswith(_C10D) and not f.name.startswith("_") and f.name != "wrapper"]
    dist = [f for f in frames if _DIST in f.filename]
    op = (public or dist or frames or [None])[-1]
    if not public and op is not None and op.filename.endswith(_FUNCOL):
        # a DTensor collective is waited for in functional-collective plumbing (wait_tensor): name the DTensor
        # step that issued it (grad_norm's Partial -> Replicate reduction: _post_reduce_transform), the wait beside it
        issuer = [f for f in dist if _DTENSOR in f.filename]
        if issuer:
            return f"{issuer[-1].name.lstrip('_')} (a DTensor collective, waiting in {op.name})", _site(frames)
    return (op.name if op is not None else "?"), _site(frames)


def _site(frames: list[traceback.FrameSummary]) -> str:
    """`meshtune/<dir>/<file>:<line> in <function>` of the innermost meshtune frame (not the watchdog's), or ''."""
    ours = [f for f in frames if f"{os.sep}meshtune{os.sep}" in f.filename and "watchdog" not in f.filename]
    if not ours:
        return ""
    f = ours[-1]
    return f"{os.sep.join(f.filename.split(os.sep)[-3:])}:{f.lineno} in {f.name}"


def describe_failure(exc: BaseException) -> str:
    """`in <op> (<meshtune site>)` for an exception raised inside a collective, else ''."""
    tb: TracebackType | None = exc.__traceback__
    frames = traceback.extract_tb(tb) if tb is not None else []
    if not any(_DIST in f.filename for f in frames):
        return ""
    op, site = _op_and_site(list(frames))
    return f" in {op}" + (f" ({site})" if site else "")


class StoreSilent(TimeoutError):
    """The job's store did not answer a call in time; `silent_s` is how long its oldest call has waited."""

    def __init__(self, silent_s: float):
        super().__init__(f"the store has not answered for {silent_s:.1f} s")
        self.silent_s = silent_s


class BoundedStore:
    """A store whose calls return within their `wait_s` or raise StoreSilent.

    Calls take turns (the client is not thread-safe) and each runs on a daemon thread. A call that does not
    return in time keeps waiting there (a TCPStore client cannot be interrupted, and holds its lock), so
    a later call waits for it at most its own `wait_s`, then raises StoreSilent with how long the store
    has been silent, without touching the client.
    """

    def __init__(self, store):
        self._store = store
        self._turn = threading.Condition()
        self._waiting_since: float | None = None  # when the call in flight began, if one is

    def call(self, method: str, *args, wait_s: float):
        deadline = time.monotonic() + wait_s
        with self._turn:
            while self._waiting_since is not None:
                if not self._turn.wait(max(0.0, deadline - time.monotonic())) and self._waiting_since is not None:
                    raise StoreSilent(time.monotonic() - self._waiting_since)
            began = self._waiting_since = time.monotonic()
        box: dict = {}

        def run() -> None:
            try:
                box["value"] = getattr(self._store, method)(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = e
            with self._turn:
                self._waiting_since = None
                self._turn.notify_all()

        thread = threading.Thread(target=run, name="meshtune-store-call", daemon=True)
        thread.start()
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            raise StoreSilent(time.monotonic() - began)
        if "error" in box:
            raise box["error"]
        return box["value"]


class Heartbeats:
    """Every rank adds 1 to its own counter in the job's TCPStore at each watchdog tick; a counter that stands
    still belongs to a rank that stopped answering (SIGSTOP, a hung interpreter, a dead host). The store is
    the process group's (MASTER_ADDR:MASTER_PORT; with torchrun's settings here, rank 0's process hosts it).
    Ranks also publish host and pid, so a failing rank can SIGKILL a frozen peer on its own node: torchrun
    would only do that 30 s after it noticed the failure, and a stopped process ignores its SIGTERM."""

    def __init__(self, rank: int, world_size: int, timeout_s: float = 2.0, environ=None):
        import torch.distributed as dist

        env = os.environ if environ is None else environ
        self.rank, self.world_size = rank, world_size
        self.host = env.get("MASTER_ADDR", "127.0.0.1")
        store = dist.TCPStore(self.host, int(env["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        # a restarted group (torchrun --max-restarts) must not read the previous round's counters
        self.store = dist.PrefixStore(f"meshtune/alive/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        self.bounded, self.timeout_s = BoundedStore(self.store), timeout_s
        self.call("set", f"pid{rank}", f"{_machine()} {os.getpid()}")
        self.where: dict[int, tuple[str, int]] = {}  # rank -> (host, pid), filled while the store answers
        try:  # every rank gets here right after building the trainer: learn where they run before training
            self.call("wait", [f"pid{r}" for r in range(world_size)], wait_s=timeout_s + 1)
            self.beat()
        except Exception:
            pass  # a slow peer: the heartbeats fill `where` later

    def call(self, method: str, *args, wait_s: float | None = None):
        """A store call that returns within `wait_s` (default: the store timeout) or raises StoreSilent."""
        return self.bounded.call(method, *args, wait_s=self.timeout_s if wait_s is None else wait_s)

    def beat(self, wait_s: float | None = None) -> None:
        """Add 1 to this rank's counter (and learn every rank's host and pid while they are missing).

        Raises:
            StoreSilent: the store did not answer within `wait_s`; its `silent_s` grows over the calls."""
        self.call("add", str(self.rank), 1, wait_s=wait_s)
        if len(self.where) < self.world_size:
            keys = [f"pid{r}" for r in range(self.world_size)]
            if self.call("check", keys, wait_s=wait_s):
                for r, value in enumerate(self.call("multi_get", keys, wait_s=wait_s)):
                    host, pid = value.decode().split()
                    self.where[r] = (host, int(pid))

    def mark_failed(self) -> None:
        """Tell the peers this rank stopped beating because it failed and reports why itself (a collective's
        error, or its own watchdog), so that no peer takes it for frozen and kills it while it exits."""
        try:
            self.call("set", f"failed{self.rank}", "1")
        except Exception:
            pass  # the store is gone or frozen: peers fall back to the heartbeat alone

    def counts(self) -> list[int]:
        return [self.call("add", str(r), 0) for r in range(self.world_size)]

    def unreachable(self, silent_s: float | None = None) -> str:
        """The line for a store that does not answer (for `silent_s`, when known); rank 0, which hosts it under
        torchrun, is killed if it is frozen on this node."""
        how = "does not answer" if silent_s is None else f"has not answered for {silent_s:.1f} s"
        return self._report([0] if self.rank != 0 else [], [],
                            f"the job's store at {self.host} {how}: the process hosting it (rank 0) is frozen or dead")

    def silent(self, wait_s: float) -> str:
        """A line naming the ranks whose heartbeat did not move in `wait_s`; those on this node are killed."""
        try:
            before = self.counts()
            time.sleep(wait_s)
            after = self.counts()
            silent = [r for r in range(self.world_size) if after[r] == before[r] and r != self.rank]
            failed = [r for r in silent if self.call("check", [f"failed{r}"])]
            quiet = [r for r in silent if r not in failed]
            what = f"no heartbeat from rank(s) {', '.join(map(str, quiet))} for {wait_s:.1f} s"
        except Exception:  # the store itself is gone: its host process (rank 0 with torchrun) is stopped or dead
            return self.unreachable()
        return self._report(quiet, failed, what)

    def _report(self, quiet: list[int], failed: list[int], what: str) -> str:
        if failed and not quiet:
            return f"meshtune: rank(s) {', '.join(map(str, failed))} failed and report(s) it; no rank is frozen"
        if not quiet:
            return "meshtune: every rank still beats: look for the rank reported stuck outside a collective"
        here = _machine()
        local = [r for r in quiet if self.where.get(r, ("", 0))[0] == here]
        exited = [r for r in local if not _running(self.where[r][1])]
        killed = [r for r in local if r not in exited and _kill(self.where[r][1])]
        return (f"meshtune: {what}" + "".join(f"; {text} rank(s) {', '.join(map(str, ranks))} on this node"
                                              for text, ranks in [("already exited:", exited),
                                                                  ("killed frozen", killed)] if ranks)
                + (f"; rank(s) {', '.join(map(str, failed))} failed and report(s) it" if failed else ""))


def _machine() -> str:
    """This machine (and pid namespace): hostname plus the kernel's boot id, so equal hostnames never match."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (Linux /proc; elsewhere: assume it runs)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class Watchdog:
    """Watches the thread that creates it; see the module docstring.

    Args:
        rank: this process's global rank (for the message).
        timeout_s: seconds one call may block before the rank counts as stuck.
        step: returns the current training step (for the message).
        heartbeats: optional Heartbeats to beat and to consult when stuck.
        on_stuck: called with the message instead of exiting (tests); default prints it and exits.
    """

    def __init__(self, rank: int, timeout_s: float, step: Callable[[], int], heartbeats: Heartbeats | None = None,
                 on_stuck: Callable[[str], None] | None = None):
        self.rank, self.timeout_s, self.step = rank, timeout_s, step
        self.heartbeats = heartbeats
        self.on_stuck = on_stuck or self._exit
        self.poll_s = min(1.0, timeout_s / 10)
        self.ident = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meshtune-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        frame: FrameType | None = None
        lasti, since = -1, time.monotonic()
        while not self._stop.wait(self.poll_s):
            if self.heartbeats is not None:
                try:
                    self.heartbeats.beat(wait_s=self.poll_s)
                except StoreSilent as e:
                    if e.silent_s >= self.timeout_s:  # rank 0 (the store's host) is frozen: end this rank
                        self.on_stuck(f"meshtune: rank {self.rank} at step {self.step()}: "
                                      + self.heartbeats.unreachable(e.silent_s).removeprefix("meshtune: "))
                        return
                except Exception:
                    pass  # the store may be gone with a dead rank 0; reported when stuck
            now = sys._current_frames().get(self.ident)
            if now is None:
                return  # the watched thread ended
            if now is not frame or now.f_lasti != lasti:
                frame, lasti, since = now, now.f_lasti, time.monotonic()
                continue
            stuck_for = time.monotonic() - since
            if stuck_for >= self.timeout_s:
                op, site = _op_and_site(traceback.extract_stack(frame))
                frame = None  # drop the reference before reporting
                lines = [f"meshtune: rank {self.rank} stuck in {op} at step {self.step()} for {stuck_for:.1f} s"
                         + (f" ({site})" if site else "")]
                if self.heartbeats is not None:
                    self.heartbeats.mark_failed()
                    lines.append(self.heartbeats.silent(max(2 * self.poll_s, 1.0)))
                self.on_stuck("\n".join(lines))
                return

    def after_failure(self, exc: BaseException) -> None:
        """After this rank's training raised: if it came from a collective, the process group is broken;
        name the silent peers (killing frozen ones on this node) and exit at once (tearing the group down
        would wait out the timeout again for every pending operation). The traceback is the caller's to
        save or print (`MESHTUNE_TRACEBACK=1`, cli/train.py)."""
        self.stop()
        if not describe_failure(exc):
            return
        if self.heartbeats is not None:
            self.heartbeats.mark_failed()
            print(self.heartbeats.silent(max(2 * self.poll_s, 1.0)), file=sys.stderr, flush=True)
        if os.environ.get("MESHTUNE_TRACEBACK"):
            traceback.print_exception(exc, file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)

    @staticmethod
    def _exit(message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        os._exit(EXIT_STUCK)


def start_watchdog(step: Callable[[], int], timeout_s: float) -> Watchdog | None:
    """A started Watchdog for this rank's main thread when it is one of several ranks, else None.

    Heartbeats need the torchrun/env:// store (MASTER_ADDR/MASTER_PORT); without it the watchdog still
    names the stuck rank and operation."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        heartbeats = Heartbeats(rank, world) if "MASTER_PORT" in os.environ else None
    except Exception:  # no reachable store: run without heartbeats
        heartbeats = None
    return Watchdog(rank, timeout_s, step, heartbeats).start()
