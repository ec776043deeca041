"""Bytes live in torch's CPU allocator, counted: the CPU analogue of CUDA's `max_memory_allocated`, for checking
`meshtune validate`'s per-rank memory plan on CPU ranks (bench/counted_rank.py, tests).

    with counting() as counted:
        y = model(x)
        with torch.profiler.record_function("step"):
            y.sum().backward()
    counted.peak()                      # most bytes live at once since counting began
    counted.peak(counted.spans("step")) # ... inside the "step" annotations (bytes already live count)

How: torch.profiler with `profile_memory=True` records every allocation (+bytes) and free (-bytes) of the CPU
allocator on the threads it follows, FSDP2's `untyped_storage().resize_(0)` included, each under the op that made
it. A block freed on another thread (the last reference dropped by a gloo worker finishing a collective) has no
event, so the running sum of events would keep it live for good. While counting, the allocator's own usage
report (c10's `caffe2_report_cpu_memory_usage` flag) is switched on, which makes it track every thread's
allocations and frees in the total each event carries: the bytes live are that total, less what it held when
counting began. Where the flag cannot be reached (another torch build), they are the running sum, with a free
inferred wherever a live address is allocated again. Either way an allocation made before counting began is not
counted, nor its free. Memory outside the allocator (mapped files, gloo's and oneDNN's own buffers, the
interpreter) is not in it: the process's RSS has it, and the allocator's freed but retained pages. This module is
the one place that reads the profiler's event tree and that flag (neither is a stable API).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

UNRECORDED = "(a free not recorded)"
Event = tuple[int, int, int, str]  # (start ns, signed bytes, address, the ops around it, innermost first)


@dataclass
class Counted:
    """The allocator events of a `counting()` block (filled in when it exits), the bytes live after each, and its
    annotations' spans."""

    events: list[Event] = field(default_factory=list)
    live: list[int] = field(default_factory=list)
    annotations: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    all_threads: bool = False  # the live bytes include frees on threads the profiler does not follow
    inferred_frees: int = 0  # without all_threads: frees inferred from a live address allocated again

    def spans(self, name: str) -> list[tuple[int, int]]:
        """(start, end) ns of each `record_function(name)` block."""
        return self.annotations.get(name, [])

    def peak(self, windows: list[tuple[int, int]] | None = None) -> int:
        """The most bytes live at once, within `windows` ((start, end) ns) or over the whole count."""
        return self.peak_index(windows)[0]

    def peak_index(self, windows: list[tuple[int, int]] | None = None) -> tuple[int, int]:
        """(peak bytes, index of the event that reached it, -1 if the peak is the bytes live as a window opened)."""
        best, best_i = 0, -1
        if windows is None:
            for i, live in enumerate(self.live):
                if live > best:
                    best, best_i = live, i
            return best, best_i
        times = [e[0] for e in self.events]
        for a, b in windows:
            first = bisect.bisect_left(times, a)
            opening = self.live[first - 1] if first else 0
            if opening > best:
                best, best_i = opening, -1
            for i in range(first, bisect.bisect_right(times, b)):
                if self.live[i] > best:
                    best, best_i = self.live[i], i
        return best, best_i

    def live_at(self, t_ns: int) -> int:
        """Bytes live just before `t_ns`."""
        i = bisect.bisect_left([e[0] for e in self.events], t_ns)
        return self.live[i - 1] if i else 0

    def held_at(self, index: int, top: int = 20) -> list[dict]:
        """What is live just after event `index` by the events of the threads followed, summed by the ops that
        allocated it: the `top` largest groups ({"bytes", "count", "ops"})."""
        held: dict[int, tuple[int, str]] = {}
        for _, n, ptr, ops in self.events[:index + 1]:
            if n > 0:
                held[ptr] = (n, ops)
            else:
                held.pop(ptr, None)
        groups: dict[str, list[int]] = {}
        for n, ops in held.values():
            g = groups.setdefault(ops, [0, 0])
            g[0], g[1] = g[0] + n, g[1] + 1
        return [{"bytes": n, "count": c, "ops": ops}
                for ops, (n, c) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]]


def _with_unrecorded_frees(events: list[Event]) -> list[Event]:
    """`events` with a free added wherever an address is allocated again while still live (two live blocks never
    share an address: the first was freed where the profiler could not see it)."""
    live: dict[int, int] = {}
    out: list[Event] = []
    for t, n, ptr, ops in events:
        if n > 0 and ptr in live:
            out.append((t, -live[ptr], ptr, UNRECORDED))
        if n > 0:
            live[ptr] = n
        else:
            live.pop(ptr, None)
        out.append((t, n, ptr, ops))
    return out


def _usage_flag() -> ctypes.c_bool | None:
    """c10's `FLAGS_caffe2_report_cpu_memory_usage` in this process's libc10, or None."""
    import torch

    try:
        return ctypes.c_bool.in_dll(ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so")),
                                    "FLAGS_caffe2_report_cpu_memory_usage")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def counting(depth: int = 4) -> Iterator[Counted]:
    """Count the CPU allocator's bytes in the block; each event keeps the names of up to `depth` enclosing ops."""
    from torch.profiler import ProfilerActivity, profile

    counted, flag = Counted(), _usage_flag()
    was = flag.value if flag is not None else False
    if flag is not None:
        flag.value = True
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield counted
    finally:
        if flag is not None:
            flag.value = was
    results = prof.profiler.kineto_results
    raw, todo = [], list(results.experimental_event_tree())
    while todo:
        node = todo.pop()
        todo += node.children
        if node.name == "[memory]":
            chain, up = [], node.parent
            while up is not None and len(chain) < depth:
                chain.append(up.name)
                up = up.parent
            f = node.extra_fields
            raw.append((node.start_time_ns, f.alloc_size, f.ptr, " < ".join(chain), f.total_allocated))
    raw.sort()
    counted.all_threads = flag is not None and not was
    if counted.all_threads and raw:
        counted.events = [e[:4] for e in raw]
        base = raw[0][4] - raw[0][1]  # what the allocator tracked before the first event
        counted.live = [e[4] - base for e in raw]
    else:
        counted.events = _with_unrecorded_frees([e[:4] for e in raw])
        counted.inferred_frees = sum(1 for e in counted.events if e[3] == UNRECORDED)
        total = 0
        for e in counted.events:
            total += e[1]
            counted.live.append(total)
    for e in results.events():
        if e.is_user_annotation():
            counted.annotations.setdefault(e.name(), []).append((e.start_ns(), e.end_ns()))
