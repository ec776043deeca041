"""One training rank, as `meshtune train` runs it, with the bytes live in torch's CPU allocator counted: the CPU
analogue of CUDA's `max_memory_allocated`, for comparing with `meshtune validate`'s per-rank plan.

    python -m torch.distributed.run --standalone --nproc-per-node 2 bench/counted_rank.py OUT_DIR CONFIG [k=v ...]

Each rank writes OUT_DIR/rank<R>.json: the counted peak while the run is built and loaded (`load`), during its
training steps (`step`: `Trainer.train_step`, the training peak), during all of `Trainer.fit` (`fit`: evaluation
too) and the bytes live when fit began (`at_fit_start`), the rank's model-state
bytes (`model_state_bytes`: parameters as stored + gradient and AdamW moments per trainable element) and its peak
RSS (`ru_maxrss`: the process, libraries and allocator retention included). With MESHTUNE_COUNTED_TOP=N it adds
`top`: the bytes live at the training peak summed by the ops that allocated them (the N largest groups), and
`peak_at`: the ops around the allocation that reached it.

How it counts: torch.profiler with `profile_memory=True`, started before anything is built (an allocation made
before profiling and freed inside it has no known size), records every allocation (+bytes) and free (-bytes) of
the CPU allocator, FSDP2's `untyped_storage().resize_(0)` included; sorted by time, the running sum's maximum is
the peak of live bytes since the start. Memory that bypasses the allocator (safetensors' mapped files, gloo's and
oneDNN's own buffers, the interpreter) is not in it; it is in the RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
from pathlib import Path


def allocations(prof) -> list[tuple[int, int, int, str]]:
    """(start_ns, signed bytes, address, the ops around it, innermost first) of every CPU allocator event."""
    out, todo = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        node = todo.pop()
        todo += node.children
        if node.name == "[memory]":
            chain, up = [], node.parent
            while up is not None and len(chain) < 4:
                chain.append(up.name)
                up = up.parent
            out.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr, " < ".join(chain)))
    return sorted(out)


def counted_peaks(events: list[tuple], windows: dict[str, list[tuple[int, int]]], top: int = 0,
                  top_of: str = "step") -> dict:
    """The peak of live bytes inside each named list of (start_ns, end_ns) windows (the bytes live as a window
    opens count), and with `top` > 0 what is live at the `top_of` peak: `top` groups of bytes summed by the ops
    that allocated them, largest first, and the ops around the allocation that reached the peak (`peak_at`)."""
    peaks = {name: 0 for name in windows}
    peak_i = -1
    live = 0
    for i, (t, n, _, _) in enumerate(events):
        live += n
        for name, spans in windows.items():
            if live > peaks[name] and any(a <= t <= b for a, b in spans):
                peaks[name] = live
                if name == top_of:
                    peak_i = i
    out: dict = dict(peaks)
    if top and peak_i >= 0:
        held: dict[int, tuple[int, str]] = {}
        for _, n, ptr, ops in events[:peak_i + 1]:
            if n > 0:
                held[ptr] = (n, ops)
            else:
                held.pop(ptr, None)
        groups: dict[str, list[int]] = {}
        for n, ops in held.values():
            g = groups.setdefault(ops, [0, 0])
            g[0], g[1] = g[0] + n, g[1] + 1
        out["peak_at"] = events[peak_i][3]
        out["top"] = [{"bytes": n, "count": c, "ops": ops}
                      for ops, (n, c) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]]
    return out


def live_at(events: list[tuple], t_ns: int) -> int:
    """Bytes live at `t_ns`."""
    return sum(n for t, n, _, _ in events if t < t_ns)


def main() -> None:
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, record_function

    from meshtune.cli.common import config_args, load
    from meshtune.runtime.run import build_trainer, model_state_bytes

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    config_args(parser)
    args = parser.parse_args()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:  # before anything is built
        cfg, _, _ = load(args)
        trainer = build_trainer(cfg)
        state = model_state_bytes(trainer.model)  # as the start event has it (after fit, the root is gathered)
        step = trainer.train_step

        def annotated_step(*a, **k):  # the training steps' windows, apart from evaluation and checkpoints
            with record_function("train_step"):
                return step(*a, **k)
        trainer.train_step = annotated_step
        with record_function("fit"):
            trainer.fit()
    spans: dict[str, list[tuple[int, int]]] = {"fit": [], "step": []}
    for e in prof.profiler.kineto_results.events():
        if e.name() in ("fit", "train_step"):
            spans["fit" if e.name() == "fit" else "step"].append((e.start_ns(), e.end_ns()))
    events = allocations(prof)
    fit_start = spans["fit"][0][0]
    top = int(os.environ.get("MESHTUNE_COUNTED_TOP", "0"))
    record = {**counted_peaks(events, {"load": [(0, fit_start)], **spans}, top),
              "at_fit_start": live_at(events, fit_start), "model_state_bytes": state,
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "losses": [r["loss"] for r in trainer.history if "loss" in r]}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
