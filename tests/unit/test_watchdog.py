"""The watchdog names rank, operation, step and call site of a blocked call, and stays quiet otherwise."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from meshtune.runtime import watchdog
from meshtune.runtime.watchdog import Watchdog, describe_failure


class PollClock:
    """The watchdog's `time.monotonic`: every reading is `tick` s after the previous one, so how long a call
    counts as blocked depends on how many times the watchdog looked, never on how fast the machine runs.
    `on_read(n)` runs in the watchdog thread at the n-th reading, before it returns."""

    sleep = staticmethod(time.sleep)

    def __init__(self, tick: float, on_read=None):
        self.now, self.tick, self.readings, self.on_read = 0.0, tick, 0, on_read

    def monotonic(self) -> float:
        self.now += self.tick
        self.readings += 1
        if self.on_read is not None:
            self.on_read(self.readings)
        return self.now


def blocked_in_here(lock: threading.Lock) -> None:
    lock.acquire()  # a C call: this frame stays the innermost one, at one instruction, until it returns


def test_reports_a_call_blocked_longer_than_the_timeout(monkeypatch):
    monkeypatch.setattr(watchdog, "time", PollClock(0.125))  # powers of two: 4 readings are exactly 0.5 s
    lock, messages = threading.Lock(), []

    def on_stuck(message):
        messages.append(message)
        lock.release()  # let the blocked call return

    lock.acquire()
    with Watchdog(3, 0.5, step=lambda: 7, on_stuck=on_stuck):
        blocked_in_here(lock)
    assert len(messages) == 1
    expected = "meshtune: rank 3 stuck in blocked_in_here at step 7 for 0.5 s"  # reported at the timeout
    assert messages[0] == expected or messages[0].startswith(expected + " ("), messages[0]  # (site) if any


def test_quiet_while_the_thread_makes_progress(monkeypatch):
    calls, released = 8, 0
    lock, returned = threading.Lock(), threading.Semaphore(0)

    def on_read(reading):  # every third reading, the watched call returns and the next one starts
        nonlocal released
        if reading % 3 == 0 and released < calls:
            released += 1
            lock.release()
            returned.acquire(timeout=60)  # until the watched thread has left that call

    monkeypatch.setattr(watchdog, "time", PollClock(0.125, on_read))
    messages = []

    def on_stuck(message):
        messages.append(message)
        lock.release()

    lock.acquire()
    with Watchdog(0, 0.5, step=lambda: 0, on_stuck=on_stuck):
        for _ in range(calls):
            blocked_in_here(lock)  # each call blocked for at most 3 readings (0.375 s) of the 0.5 s timeout
            returned.release()
            if messages:
                break
    # 24 readings, 3 s of clock in all: without the reset on progress the watchdog would have reported
    assert messages == [] and released == calls


def test_describe_failure_names_the_collective_only_for_torch_distributed_errors():
    import torch.distributed as dist

    try:
        dist.all_reduce(__import__("torch").zeros(1))  # no process group: raises inside torch.distributed
    except Exception as e:
        assert describe_failure(e).startswith(" in all_reduce"), describe_failure(e)
    try:
        raise ValueError("plain")
    except ValueError as e:
        assert describe_failure(e) == ""


def test_stop_ends_the_thread():
    dog = Watchdog(0, 10, step=lambda: 0).start()
    dog.stop()
    assert not any(t.name == "meshtune-watchdog" and t.is_alive() for t in threading.enumerate())


def test_a_silent_peer_is_killed_as_frozen_unless_it_marked_itself_failed():
    """Rank 0 asks who is silent. A peer that stopped beating is killed as frozen; a peer that stopped
    because it failed (and reports that itself, while it exits) is named as failed and left alone."""
    import socket
    import subprocess
    import sys
    from datetime import timedelta

    import torch.distributed as dist

    from meshtune.runtime.watchdog import Heartbeats, _machine

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    master = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": "0"}
    peers = []
    try:
        for failed in (False, True):
            env["TORCHELASTIC_RESTART_COUNT"] = str(int(failed))  # a fresh set of counters for each case
            peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            peers.append(peer)
            # rank 0 waits (its store timeout) for rank 1, made next, to publish its pid
            rank0, rank1 = Heartbeats(0, 2, timeout_s=1.0, environ=env), Heartbeats(1, 2, environ=env)
            rank1.store.set("pid1", f"{_machine()} {peer.pid}")  # rank 1 "is" the sleeping child process
            rank0.beat()
            rank1.beat()
            if failed:
                rank1.mark_failed()
            line = rank0.silent(0.3)
            if failed:
                assert line == "meshtune: rank(s) 1 failed and report(s) it; no rank is frozen", line
                assert peer.poll() is None
            else:
                assert line == "meshtune: no heartbeat from rank(s) 1 for 0.3 s; killed frozen rank(s) 1 on this node"
                assert peer.wait(10) == -9
    finally:
        for peer in peers:
            peer.kill()
            peer.wait()
        del master


def test_a_frozen_store_host_ends_the_rank_naming_rank_0():
    """The store's host (rank 0 under torchrun) is SIGSTOPped: a TCPStore call to it would wait forever,
    holding the client's lock. Every heartbeat call has a deadline; once the store has been silent for
    timeout_s the watchdog ends this rank with a line naming rank 0, and kills it (it runs on this node)."""
    import signal
    import subprocess
    import sys

    from meshtune.runtime.watchdog import Heartbeats, StoreSilent, _machine

    host = subprocess.Popen([sys.executable, "-c", (
        "import socket, sys, time, torch.distributed as d\nfrom datetime import timedelta\n"
        "s = d.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))\n"
        "print(s.port, flush=True)\ntime.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        port = int(host.stdout.readline())
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        beats = Heartbeats(1, 2, environ=env)
        beats.call("set", "pid0", f"{_machine()} {host.pid}")  # rank 0 "is" the store's host process
        beats.beat(wait_s=5)
        assert beats.where[0] == (_machine(), host.pid)
        os.kill(host.pid, signal.SIGSTOP)
        # kill() returns before every thread has stopped: the store's own thread may still answer a call for a
        # moment (seen in about 1 run in 5 under pytest), so wait until all of them are
        deadline = time.monotonic() + 10
        while not all(Path(f"/proc/{host.pid}/task/{t}/stat").read_text().rsplit(") ", 1)[1][0] in "tT"
                      for t in os.listdir(f"/proc/{host.pid}/task")):
            assert time.monotonic() < deadline, "the store's host did not stop"
            time.sleep(0.01)
        try:  # a bounded call, where TCPStore.add alone would never return
            beats.beat(wait_s=0.2)
        except StoreSilent as e:
            assert e.silent_s >= 0.2
        else:
            raise AssertionError("a call to a stopped store returned")
        messages = []
        dog = Watchdog(1, 0.5, step=lambda: 9, heartbeats=beats, on_stuck=messages.append)
        with dog:
            deadline = time.monotonic() + 30  # only a bound: the watchdog reports at 0.5 s of silence
            while not messages and time.monotonic() < deadline:
                time.sleep(0.05)
        assert len(messages) == 1, messages
        assert messages[0].startswith("meshtune: rank 1 at step 9: the job's store at 127.0.0.1 has not answered "
                                      "for "), messages[0]
        assert messages[0].endswith("(rank 0) is frozen or dead; killed frozen rank(s) 0 on this node"), messages[0]
        assert host.wait(10) == -signal.SIGKILL
        beats.mark_failed()  # returns (bounded) although the store never answers again
    finally:
        host.kill()
        host.wait()


def test_a_dtensor_collective_is_named_by_the_dtensor_step_not_its_wait():
    """A DTensor reduction (grad_norm's full_tensor) blocks in functional-collective plumbing: the failure names
    the DTensor step that issued the collective, the wait, and meshtune's call site (a stack seen on a stopped
    peer in CI, torch 2.13, abridged)."""
    import os
    import traceback

    from meshtune.runtime.watchdog import _op_and_site

    venv = os.path.join(os.sep, "venv", "site-packages", "torch")

    def frame(path, line, name):
        return traceback.FrameSummary(path, line, name, line="")

    frames = [frame(os.path.join(os.sep, "src", "meshtune", "runtime", "grads.py"), 93, "grad_norm"),
              frame(os.path.join(venv, "distributed", "tensor", "_redistribute.py"), 1640, "redistribute_local_tensor"),
              frame(os.path.join(venv, "distributed", "tensor", "_ops", "_math_ops.py"), 110, "_reduce_value"),
              frame(os.path.join(venv, "distributed", "tensor", "_ops", "_math_ops.py"), 116, "_post_reduce_transform"),
              frame(os.path.join(venv, "_tensor.py"), 39, "wrapped"),
              frame(os.path.join(venv, "distributed", "_functional_collectives.py"), 1155, "__torch_dispatch__"),
              frame(os.path.join(venv, "distributed", "_functional_collectives.py"), 1115, "trigger_wait"),
              frame(os.path.join(venv, "distributed", "_functional_collectives.py"), 142, "wait_tensor"),
              frame(os.path.join(venv, "_ops.py"), 1279, "__call__")]
    op, site = _op_and_site(frames)
    assert op == "post_reduce_transform (a DTensor collective, waiting in wait_tensor)"
    assert site == f"meshtune{os.sep}runtime{os.sep}grads.py:93 in grad_norm"
    # a c10d collective on the stack still wins
    c10d = frame(os.path.join(venv, "distributed", "distributed_c10d.py"), 1, "all_reduce")
    assert _op_and_site([*frames[:2], c10d, frames[-1]])[0] == "all_reduce"
