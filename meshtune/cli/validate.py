"""`meshtune validate CONFIG --world-size W`: every start-up check, the layout and per-rank memory."""

from __future__ import annotations

from meshtune.cli.common import config_command, load


def add(sub):
    p = config_command(sub, "validate", "check a config and its parallel layout without training")
    p.add_argument("--world-size", type=int, default=1, help="number of ranks to plan for")
    p.add_argument("--device-memory", default="", help="per-device memory (e.g. 80GiB, 24GB): say which memory "
                   "levers make the layout fit")
    return p


def run(args) -> int:
    from meshtune.runtime.memory_plan import parse_bytes
    from meshtune.runtime.plan_report import describe_plan

    cfg, _, _ = load(args)
    device_memory = parse_bytes(args.device_memory) if args.device_memory else None
    print(describe_plan(cfg, args.world_size, device_memory))
    return 0
