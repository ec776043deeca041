"""The launcher interface: torchrun (this machine, or each node of a cluster) and SLURM share it.

    launcher = TorchrunLauncher(nproc_per_node=8, nodes=node_spec(...))     # or SlurmLauncher(job, run_dir)
    checks = lambda: [preflight(cfg, n) for n in launcher.world_sizes()]    # the CLI's checks, each world once
    code = launcher.launch(config_path, overrides, checks, dry_run=False)

A launcher calls the CLI's checks once, before any rank can start, and never re-plans: it only says where ranks
run. It may start slow work that starts no rank beside them (torchrun's interpreter and imports). No torch import
here (`--dry-run` stays instant).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Launcher(Protocol):
    def world_sizes(self) -> list[int]:
        """Every world size the job can run at (one, or the ends of an elastic range)."""

    def launch(self, config: str, overrides: list[str], checks: Callable[[], list], dry_run: bool = False) -> int:
        """Start the job (or show what would start when `dry_run`); returns the exit code.

        Args:
            config: path of the YAML config every rank reads.
            overrides: `key=value` overrides, passed to every rank unchanged.
            checks: the caller's start-up checks; returns the `meshtune.runtime.plan.Plan` of each of
                `world_sizes()`, raises `ConfigError` for a bad input. Called once, before any rank starts.
            dry_run: print or write what would run, start nothing.
        """
