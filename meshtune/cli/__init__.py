"""The `meshtune` command line: one module per command, each with `add(subparsers)` and `run(args)`.

    meshtune ls                                        bundled configs
    meshtune train CONFIG [k=v ...]                    run here (alone, or as one rank under torchrun)
    meshtune launch CONFIG --nproc-per-node N [k=v]    start torchrun on this machine for you
        [--nnodes N|MIN:MAX --rdzv-endpoint HOST:PORT [--node-rank R]]    ... or on each node of a cluster
    meshtune slurm submit CONFIG --nodes N --gpus-per-node G [k=v]    an sbatch job; slurm status|logs|cancel JOB
    meshtune validate CONFIG --world-size W [k=v]      check a config and its layout without training
    meshtune export RUN_DIR --format FORMAT [--out DIR] [--step N]    merged, adapter, peft, hf, sparse, ...
    meshtune report RUN_DIR [RUN_DIR ...] [--out DIR]   PNG plots and a Markdown table of runs, overlaid
    meshtune demo                                      the end-to-end demo on 2 CPU ranks
    meshtune serve CHECKPOINT [--port P]               an OpenAI-compatible /v1/completions endpoint on loopback
    meshtune generate RUN|--program PTE --prompt TEXT  greedy text, eager or through an ExecuTorch program
    meshtune distill-data --prompts F --out O --url U|--teacher CKPT    a teacher's responses as training JSONL
    meshtune compress-search RUN_DIR --out DIR --budget N [--target-size X]   Pareto front of compressed programs

A user error prints one line naming the key, flag or file and the fix, and exits with code 2. Commands
import torch only when they need it (`--help`, `ls`, `launch --dry-run` stay instant).
"""

from __future__ import annotations

import argparse
import os
import sys

from meshtune import __version__
from meshtune.cli import (
    compress_search,
    distill_data,
    export,
    generate,
    launch,
    report,
    serve,
    slurm,
    tools,
    train,
    validate,
)
from meshtune.config import ConfigError

# the registry: a command is one module here and its entry in this tuple (the order of `--help`)
COMMANDS = (tools.Ls, train, launch, validate, slurm, export, report, tools.Demo, serve, generate, distill_data,
            compress_search)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshtune", description="Distributed training and fine-tuning on "
                                     "PyTorch: DDP/FSDP2 on one device mesh, torchrun and SLURM.")
    parser.add_argument("--version", action="version", version=f"meshtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub).set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may follow options (`launch CFG --nproc-per-node 2 k=v`): collect them from the leftovers
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.run(args)
    except ConfigError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank sees it; say it once
            print(f"meshtune: error: {e}", file=sys.stderr)
        return 2
