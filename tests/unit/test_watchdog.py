"""The watchdog names rank, operation, step and call site of a blocked call, and stays quiet otherwise."""

from __future__ import annotations

import threading
import time

from meshtune.runtime.watchdog import Watchdog, describe_failure


def blocked_in_here(seconds: float) -> None:
    time.sleep(seconds)


def test_reports_a_call_blocked_longer_than_the_timeout():
    messages = []
    with Watchdog(3, 0.5, step=lambda: 7, on_stuck=messages.append):
        blocked_in_here(1.5)
    assert len(messages) == 1
    assert messages[0].startswith("meshtune: rank 3 stuck in blocked_in_here at step 7 for ")


def test_quiet_while_the_thread_makes_progress():
    messages = []
    with Watchdog(0, 0.5, step=lambda: 0, on_stuck=messages.append):
        for _ in range(8):
            blocked_in_here(0.2)  # each call shorter than the timeout: a new frame every time
    assert messages == []


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
