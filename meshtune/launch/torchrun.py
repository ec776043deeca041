"""`meshtune launch`: start `meshtune train` on N local processes through torchrun.

Standalone mode runs a c10d rendezvous on loopback with a free port, so several jobs can share a machine.
The workers run `python -m meshtune train CONFIG k=v ...` with the same Python as the launcher.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys


def torchrun_argv(config: str, overrides: list[str], nproc_per_node: int, max_restarts: int = 0) -> list[str]:
    """The exact command `meshtune launch` runs."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
            f"--max-restarts={max_restarts}", "-m", "meshtune", "train", config, *overrides]


def launch(config: str, overrides: list[str], nproc_per_node: int, dry_run: bool = False,
           max_restarts: int = 0) -> int:
    """Run torchrun (or print its command when `dry_run`); returns its exit code."""
    argv = torchrun_argv(config, overrides, nproc_per_node, max_restarts)
    if dry_run:
        print(shlex.join(argv))
        return 0
    env = dict(os.environ)
    # one intra-op thread per rank unless the user chose: N ranks x all cores each would oversubscribe
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    return subprocess.call(argv, env=env)
