"""`meshtune launch CONFIG`: torchrun on this machine (or on each node of a cluster) running `meshtune train`.

Every check a rank would make at start-up runs here first (meshtune/runtime/preflight.py), once per world
size the job can have: a bad input is one line and exit code 2 before any rank starts (torchrun starts held
beside the checks and is let go after them: meshtune/launch/gate.py). `--dry-run` checks the layout without torch
and prints each node's command.

SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 to this process reach torchrun once, which passes them to the ranks:
they checkpoint after the current step and stop, and the launcher exits with code 75 (exit_codes.STOPPED).
"""

from __future__ import annotations

from meshtune.cli.common import config_command, load


def add(sub):
    p = config_command(sub, "launch", "start torchrun with N local processes running `meshtune train`")
    p.add_argument("--nproc-per-node", type=int, default=2, help="processes (ranks) on this machine")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a failure")
    p.add_argument("--nnodes", help="nodes: N, or MIN:MAX for an elastic job (default 1: this machine)")
    p.add_argument("--node-rank", type=int, help="this node's rank for fixed ranks (static rendezvous); "
                   "omit to let the c10d rendezvous assign ranks")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="rendezvous store on the first node; "
                   "needed with more than one node")
    p.add_argument("--rdzv-id", help="job id shared by all nodes of one job (default meshtune)")
    p.add_argument("--grace-period", type=int, metavar="S", help="seconds the ranks get to checkpoint and stop "
                   "after SIGTERM/SIGINT/SIGUSR1 before torchrun kills them (default: torchrun's, 30)")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command for each node, run nothing")
    return p


def plans_for(cfg, launcher, dry_run: bool) -> list:
    """The plan of every world size `launcher` can run at: the full start-up checks (torch, metadata reads),
    or for a dry run the layout alone (no torch)."""
    if dry_run:
        from meshtune.runtime.plan import make_plan

        return [make_plan(cfg, n) for n in launcher.world_sizes()]
    from meshtune.runtime.preflight import preflight

    return [preflight(cfg, n) for n in launcher.world_sizes()]


def run(args) -> int:
    from meshtune.launch.torchrun import TorchrunLauncher, node_spec

    cfg, overrides, config_path = load(args)
    nodes = node_spec(args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_id, args.max_restarts)
    launcher = TorchrunLauncher(args.nproc_per_node, nodes, args.grace_period)
    return launcher.launch(config_path, overrides, lambda: plans_for(cfg, launcher, args.dry_run), args.dry_run)
