"""The `meshtune` command line. Subcommands import torch only when they need it.

    meshtune ls                                        bundled configs
    meshtune train CONFIG [k=v ...]                    run here (alone, or as one rank under torchrun)
    meshtune launch CONFIG --nproc-per-node N [k=v]    start torchrun on this machine for you
        [--nnodes N|MIN:MAX --rdzv-endpoint HOST:PORT [--node-rank R]]    ... or on each node of a cluster
    meshtune slurm submit CONFIG --nodes N --gpus-per-node G [k=v]    an sbatch job; slurm status|logs|cancel JOB
    meshtune validate CONFIG --world-size W [k=v]      check a config and its layout without training
    meshtune export RUN_DIR --format merged|adapter|peft|hf|sparse|shrunk|program|quantized [--out DIR] [--step N]
    meshtune report RUN_DIR [RUN_DIR ...] [--out DIR]   PNG plots and a Markdown table of runs, overlaid
    meshtune demo                                      the end-to-end demo on 2 CPU ranks
    meshtune serve CHECKPOINT [--port P]               an OpenAI-compatible /v1/completions endpoint on loopback
    meshtune distill-data --prompts F --out O --url U|--teacher CKPT    a teacher's responses as training JSONL
A config error prints one line naming the key and the fix, and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from meshtune import __version__
from meshtune.config import ConfigError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML file, or a bundled config name from `meshtune ls` (e.g. pretrain/tiny)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-3")


class _ConfigHelp(argparse.Action):
    """`--help` on train/validate/launch also lists every config key with its docstring."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from meshtune.schema import help_text

        parser.print_help()
        print("\nconfig keys (set in YAML or as key=value):\n" + help_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshtune", description="Distributed training and fine-tuning on "
                                     "PyTorch: DDP/FSDP2 on one device mesh, torchrun and SLURM.")
    parser.add_argument("--version", action="version", version=f"meshtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("ls", help="list the bundled configs")
    for name, text in [("train", "train in this process (alone or as a torchrun rank)"),
                       ("launch", "start torchrun with N local processes running `meshtune train`"),
                       ("validate", "check a config and its parallel layout without training")]:
        p = sub.add_parser(name, help=text, description=text, add_help=False)
        p.add_argument("-h", "--help", action=_ConfigHelp, help="show this help and every config key")
        _config_args(p)
        if name == "launch":
            p.add_argument("--nproc-per-node", type=int, default=2, help="processes (ranks) on this machine")
            p.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a failure")
            p.add_argument("--nnodes", help="nodes: N, or MIN:MAX for an elastic job (default 1: this machine)")
            p.add_argument("--node-rank", type=int, help="this node's rank for fixed ranks (static rendezvous); "
                           "omit to let the c10d rendezvous assign ranks")
            p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="rendezvous store on the first node; "
                           "needed with more than one node")
            p.add_argument("--rdzv-id", help="job id shared by all nodes of one job (default meshtune)")
            p.add_argument("--dry-run", action="store_true", help="print the torchrun command for each node, "
                           "run nothing")
        if name == "validate":
            p.add_argument("--world-size", type=int, default=1, help="number of ranks to plan for")
    from meshtune.launch.slurm import add_cli as add_slurm_cli

    add_slurm_cli(sub, _config_args, _ConfigHelp)
    exp = sub.add_parser("export", help="write a run's checkpoint as merged safetensors, an adapter, "
                         "a PEFT or HF dir, a sparse, shrunk or quantized model, or a torch.export program")
    exp.add_argument("run_dir", help="the run_dir of a training run (it holds config.yaml and checkpoints/)")
    exp.add_argument("--format", dest="fmt", metavar="FORMAT",
                     help="merged (full weights, LoRA folded in), adapter (only the recipe's tensors), peft "
                          "(Hugging Face PEFT dir; LoRA only), hf (Hugging Face Llama dir for transformers, LoRA "
                          "folded in, tokenizer files copied), sparse / shrunk (pruned runs), program "
                          "(torch.export .pt2) or quantized (torchao int8/int4; QAT runs converted, others PTQ)")
    exp.add_argument("--out", help="output directory (default: the run dir; for peft: RUN_DIR/peft, hf: RUN_DIR/hf)")
    exp.add_argument("--step", help="export this checkpoint step (default: the newest complete one)")
    exp.add_argument("--scheme", choices=("int8-int4", "int8-int8"),
                     help="--format quantized: weight scheme (default: the run's recipe.qat.scheme)")
    rep = sub.add_parser("report", help="PNG plots (loss, eval accuracy, lr, tokens/s) and a Markdown summary of "
                         "one or more runs, overlaid")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dirs holding metrics.jsonl and config.yaml")
    rep.add_argument("--out", help="output directory (default: the first RUN_DIR's report/)")
    demo = sub.add_parser("demo", help="run the bundled end-to-end demo on 2 CPU ranks")
    demo.add_argument("--run-dir", default="runs/demo", help="where the demo's runs go")
    demo.add_argument("--nproc-per-node", type=int, default=2, help="ranks to use")
    from meshtune import distill_data, serve

    serve.add_cli(sub)
    distill_data.add_cli(sub)
    return parser


def _split_overrides(args: argparse.Namespace) -> list[str]:
    """argparse puts `k=v` pairs after the config into `overrides`; reject stray words clearly."""
    for item in args.overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted key=value, e.g. train.steps=20")
    return list(args.overrides)


def _stop_on_signals(trainer) -> None:
    """SIGTERM (preemption, scancel, torchrun shutting down) and SIGUSR1 (SLURM's warning before the time
    limit) make the trainer checkpoint after the current step and stop on every rank."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: trainer.request_stop(signum))


def _after_stop(trainer, cfg) -> None:
    """Report the stop; under SLURM, a time-limit stop (SIGUSR1) requeues the job, which resumes."""
    import signal
    import subprocess

    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        return
    name = signal.Signals(trainer.stop_signal).name
    print(f"meshtune: stopped at step {trainer.step} on {name}; checkpoint saved in {cfg.run_dir}/checkpoints, "
          "`checkpoint.resume: auto` continues from it", flush=True)
    job = os.environ.get("SLURM_JOB_ID")
    if job and trainer.stop_signal == signal.SIGUSR1:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        print(f"meshtune: scontrol requeue {job}: " + ("ok" if result.returncode == 0 else result.stderr.strip()),
              flush=True)


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
        return _run(args)
    except ConfigError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank sees it; say it once
            print(f"meshtune: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from meshtune import config as C
    from meshtune import schema as S

    if args.command == "ls":
        for name in C.bundled_configs():
            print(name)
        return 0
    if args.command == "demo":
        from meshtune.demo import run_demo

        return run_demo(args.run_dir, args.nproc_per_node)
    if args.command == "slurm":
        from meshtune.launch.slurm import run_cli

        return run_cli(args, _split_overrides(args) if args.slurm_command == "submit" else [])

    if args.command == "export":
        return _export(args)
    if args.command == "report":
        from meshtune.report import write_report

        write_report(args.run_dirs, args.out)
        return 0
    if args.command in ("serve", "distill-data"):
        from meshtune import distill_data, serve

        return (serve if args.command == "serve" else distill_data).run_cli(args)

    overrides = _split_overrides(args)
    cfg = S.load_config(args.config, overrides)  # errors surface here, before any process starts
    if args.command == "launch":
        from meshtune.launch.torchrun import launch, node_spec

        if args.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node: must be >= 1, got {args.nproc_per_node}")
        nodes = node_spec(args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_id, args.max_restarts)
        if not args.dry_run:  # catch layout, task and tokenizer errors once here, not on every rank
            from meshtune.runtime.plan_report import describe_plan

            for n in sorted({nodes.min_nodes, nodes.max_nodes}):
                describe_plan(cfg, n * args.nproc_per_node)
        config_path = str(C.resolve_config_path(args.config))
        return launch(config_path, overrides, args.nproc_per_node, args.dry_run, nodes=nodes)
    if args.command == "validate":
        from meshtune.runtime.plan_report import describe_plan

        print(describe_plan(cfg, args.world_size))
        return 0
    if args.command == "train":
        from meshtune.runtime.run import build_trainer
        from meshtune.runtime.watchdog import describe_failure, start_watchdog

        trainer = build_trainer(cfg)
        _stop_on_signals(trainer)
        watchdog = start_watchdog(lambda: trainer.step, cfg.parallel.timeout_s)  # a stuck rank: named, exits
        try:
            summary = trainer.fit()
        except Exception as e:  # name the rank and step: torchrun's summary names neither the cause nor them
            first = (str(e).strip().splitlines() or [""])[0][:300]
            print(f"meshtune: rank {os.environ.get('RANK', '0')} failed at step {trainer.step}{describe_failure(e)}: "
                  f"{type(e).__name__}: {first}", file=sys.stderr, flush=True)
            if watchdog is not None:
                watchdog.after_failure(e)  # a broken collective: names the silent peers and exits right away
            raise
        finally:
            if watchdog is not None:
                watchdog.stop()
        if summary["stopped"]:
            _after_stop(trainer, cfg)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        last = summary["final_eval"] or {}
        if int(os.environ.get("RANK", "0")) == 0:
            losses = [r["loss"] for r in summary["history"] if "loss" in r]
            print(f"meshtune: done at step {summary['step']}: loss {losses[-1] if losses else float('nan'):.4f}, "
                  f"eval accuracy {last.get('eval_accuracy', float('nan')):.3f}; run dir {cfg.run_dir}")
        return 0
    raise AssertionError(args.command)


def _export(args: argparse.Namespace) -> int:
    from meshtune.export import FORMATS

    if args.fmt is None:
        raise ConfigError(f"--format: missing; give one of {', '.join(FORMATS)}")
    step = None
    if args.step is not None:
        if not args.step.isdigit():
            raise ConfigError(f"--step: {args.step!r} is not a step number; give e.g. --step 100")
        step = int(args.step)
    from meshtune.export import export

    export(args.run_dir, args.fmt, args.out, step, scheme=args.scheme)
    return 0
