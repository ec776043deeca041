"""`meshtune validate CONFIG --world-size W`: every start-up check, the layout and per-rank memory."""

from __future__ import annotations

from meshtune.cli.common import config_command, load


def add(sub):
    p = config_command(sub, "validate", "check a config and its parallel layout without training")
    p.add_argument("--world-size", type=int, default=1, help="number of ranks to plan for")
    return p


def run(args) -> int:
    from meshtune.runtime.plan_report import describe_plan

    cfg, _, _ = load(args)
    print(describe_plan(cfg, args.world_size))
    return 0
