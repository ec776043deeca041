"""The launcher interface: torchrun (this machine, or each node of a cluster) and SLURM share it.

    launcher = TorchrunLauncher(nproc_per_node=8, nodes=node_spec(...))     # or SlurmLauncher(job, run_dir)
    plans = [preflight(cfg, n) for n in launcher.world_sizes()]             # the CLI validates each world once
    code = launcher.launch(config_path, overrides, plans, dry_run=False)

A launcher receives the plans the CLI validated and never re-plans: it only says where ranks run. No torch
import here (`--dry-run` stays instant).
"""

from __future__ import annotations

from typing import Protocol


class Launcher(Protocol):
    def world_sizes(self) -> list[int]:
        """Every world size the job can run at (one, or the ends of an elastic range)."""

    def launch(self, config: str, overrides: list[str], plans: list, dry_run: bool = False) -> int:
        """Start the job (or show what would start when `dry_run`); returns the exit code.

        Args:
            config: path of the YAML config every rank reads.
            overrides: `key=value` overrides, passed to every rank unchanged.
            plans: the `meshtune.runtime.plan.Plan` of each of `world_sizes()`, validated by the caller.
            dry_run: print or write what would run, start nothing.
        """
