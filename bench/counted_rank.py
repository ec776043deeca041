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

How it counts: `meshtune.counted_memory.counting` (torch.profiler's allocator events: every allocation and free,
FSDP2's `untyped_storage().resize_(0)` included), entered before anything is built, so that every byte freed was
counted when allocated. Memory that bypasses the allocator (safetensors' mapped files, gloo's and oneDNN's own
buffers, the interpreter) is not in it; it is in the RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
from pathlib import Path


def main() -> None:
    import torch.distributed as dist
    from torch.profiler import record_function

    from meshtune.cli.common import config_args, load
    from meshtune.counted_memory import counting
    from meshtune.runtime.run import build_trainer, model_state_bytes

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    config_args(parser)
    args = parser.parse_args()
    with counting() as counted:  # before anything is built
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
    fit = counted.spans("fit")
    step_peak, step_i = counted.peak_index(counted.spans("train_step"))
    record = {"load": counted.peak([(0, fit[0][0])]), "step": step_peak, "fit": counted.peak(fit),
              "at_fit_start": counted.live_at(fit[0][0]), "model_state_bytes": state,
              "inferred_frees": counted.inferred_frees,
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "losses": [r["loss"] for r in trainer.history if "loss" in r]}
    top = int(os.environ.get("MESHTUNE_COUNTED_TOP", "0"))
    if top and step_i >= 0:
        record["peak_at"], record["top"] = counted.events[step_i][3], counted.held_at(step_i, top)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
