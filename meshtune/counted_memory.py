"""Bytes live in torch's CPU allocator, counted: the CPU analogue of CUDA's `max_memory_allocated`, for checking
`meshtune validate`'s per-rank memory plan on CPU ranks (bench/counted_rank.py, tests).

    with counting() as counted:
        y = model(x)
        with torch.profiler.record_function("step"):
            y.sum().backward()
    counted.peak()                      # most bytes live at once since counting began
    counted.peak(counted.spans("step")) # ... inside the "step" annotations (bytes already live count)

How: torch.profiler with `profile_memory=True` records every allocation (+bytes) and free (-bytes) of the CPU
allocator, FSDP2's `untyped_storage().resize_(0)` included, each under the op that made it; sorted by time, the
running sum is the bytes live. An allocation made before counting began is not counted, nor its free (torch logs
a warning for it). A free on a thread the profiler does not follow is not recorded either; it is inferred when the
address is allocated again (a missed free can only raise the figure). Memory outside the allocator (mapped files,
gloo's and oneDNN's own buffers, the interpreter) is not in it: the process's RSS has it, and the allocator's
freed but retained pages. This module is the one place that reads the profiler's event tree
(`kineto_results.experimental_event_tree`, not a stable API).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

UNRECORDED = "(a free not recorded)"
Event = tuple[int, int, int, str]  # (start ns, signed bytes, address, the ops around it, innermost first)


@dataclass
class Counted:
    """The allocator events of a `counting()` block (filled in when it exits) and its annotations' spans."""

    events: list[Event] = field(default_factory=list)
    annotations: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    inferred_frees: int = 0  # frees not recorded, inferred from an address allocated again

    def spans(self, name: str) -> list[tuple[int, int]]:
        """(start, end) ns of each `record_function(name)` block."""
        return self.annotations.get(name, [])

    def peak(self, windows: list[tuple[int, int]] | None = None) -> int:
        """The most bytes live at once, within `windows` ((start, end) ns) or over the whole count."""
        return self.peak_index(windows)[0]

    def peak_index(self, windows: list[tuple[int, int]] | None = None) -> tuple[int, int]:
        """(peak bytes, index of the event that reached it, -1 if the peak is the bytes live as a window opened)."""
        best, best_i, live, inside = 0, -1, 0, windows is None
        bounds = sorted(windows or [])
        for i, (t, n, _, _) in enumerate(self.events):
            if bounds:
                was = inside
                inside = any(a <= t <= b for a, b in bounds)
                if inside and not was and live > best:  # a window opens with these bytes live
                    best, best_i = live, -1
            live += n
            if inside and live > best:
                best, best_i = live, i
        return best, best_i

    def live_at(self, t_ns: int) -> int:
        """Bytes live just before `t_ns`."""
        return sum(n for t, n, _, _ in self.events if t < t_ns)

    def held_at(self, index: int, top: int = 20) -> list[dict]:
        """What is live just after event `index`, summed by the ops that allocated it: the `top` largest groups
        ({"bytes", "count", "ops"})."""
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
    """`events` with a free added wherever an address is allocated again while still live: the allocator frees a
    block without a recorded event when the last reference drops on a thread the profiler does not follow (a
    gloo worker thread finishing a collective), and two live blocks never share an address."""
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


@contextlib.contextmanager
def counting(depth: int = 4) -> Iterator[Counted]:
    """Count the CPU allocator's bytes in the block; each event keeps the names of up to `depth` enclosing ops."""
    from torch.profiler import ProfilerActivity, profile

    counted = Counted()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield counted
    results = prof.profiler.kineto_results
    todo = list(results.experimental_event_tree())
    while todo:
        node = todo.pop()
        todo += node.children
        if node.name == "[memory]":
            chain, up = [], node.parent
            while up is not None and len(chain) < depth:
                chain.append(up.name)
                up = up.parent
            counted.events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr,
                                   " < ".join(chain)))
    counted.events = _with_unrecorded_frees(sorted(counted.events))
    counted.inferred_frees = sum(1 for e in counted.events if e[3] == UNRECORDED)
    for e in results.events():
        if e.is_user_annotation():
            counted.annotations.setdefault(e.name(), []).append((e.start_ns(), e.end_ns()))
