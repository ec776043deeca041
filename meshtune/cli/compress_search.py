"""`meshtune compress-search RUN_DIR --out DIR --budget N`: the Pareto front of compressed ExecuTorch programs."""

from __future__ import annotations

import re

from meshtune.config import ConfigError

UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3}


def parse_size(text: str) -> float:
    """'600KB', '1.5MB', '2MiB' or a number of bytes -> bytes.

    Raises:
        ConfigError: naming --target-size for anything else.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise ConfigError(f"--target-size: {text!r} is not a size; give e.g. 600KB, 1.5MB or a number of bytes")
    return float(m.group(1)) * UNITS[m.group(2).upper()]


def add(sub):
    p = sub.add_parser("compress-search", help="search structured / unstructured sparsity x weight bits x "
                       "distillation with short fine-tunes; print the Pareto front of the ExecuTorch programs")
    p.add_argument("run_dir", help="the trained run to compress (its config.yaml and a complete checkpoint)")
    p.add_argument("--out", required=True, help="the search dir: results.jsonl, fine-tunes, programs")
    p.add_argument("--budget", type=int, required=True, help="candidates to try besides the dense run (counted "
                   "over resumes: --budget 6 --resume after a --budget 4 search tries 2 more)")
    p.add_argument("--steps", type=int, default=40, help="fine-tune steps of each candidate (default 40)")
    p.add_argument("--target-size", help="the .pte size to reach, e.g. 600KB, 1.5MB (the front: size vs accuracy)")
    p.add_argument("--target-latency", type=float, metavar="MS", help="decode ms/token to reach on 1 thread (the "
                   "front: decode latency vs accuracy)")
    p.add_argument("--target-speedup", type=float, metavar="X", help="decode speed-up over the dense program to "
                   "reach (the front: relative decode time vs accuracy)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="ranks per fine-tune (torchrun when > 1)")
    p.add_argument("--workers", type=int, default=1, help="processes lowering programs (one core each)")
    p.add_argument("--reps", type=int, default=5, help="timing rounds per measurement (medians)")
    p.add_argument("--resume", action="store_true", help="continue the search in --out: finished candidates are "
                   "kept, unfinished ones start again")
    return p


def target_of(args) -> tuple[str, float | None]:
    """(kind, value) of the one target flag given (size and no value without one).

    Raises:
        ConfigError: when more than one is given.
    """
    given = [(k, v) for k, v in (("size", args.target_size), ("latency", args.target_latency),
                                 ("speedup", args.target_speedup)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"--target-{given[0][0]} and --target-{given[1][0]}: give one target (the front's axis)")
    if not given:
        return "size", None
    kind, value = given[0]
    return kind, parse_size(value) if kind == "size" else value


def run(args) -> int:
    from pathlib import Path

    from meshtune.search.pareto import METRICS, format_table, front, points_of
    from meshtune.search.run import Settings, search

    kind, target = target_of(args)
    s = Settings(args.run_dir, Path(args.out), args.budget, args.steps, kind, target, args.nproc_per_node,
                 args.resume, args.workers, args.reps)
    records = search(s)
    ok = [r for r in records if r.get("status") == "ok"]
    print(f"\ncompress-search of {args.run_dir}: {len(records) - 1} candidates besides the dense run "
          f"({len(records) - len(ok)} failed); fine-tunes of {args.steps} steps; ExecuTorch programs on 1 thread, "
          "x = vs the dense program timed in the same call; accuracy = the program's own; * = on the Pareto front "
          f"of accuracy vs {METRICS[kind][1]}")
    print(format_table(records, kind, target))
    best = [p for p in front(points_of(records, kind)) if target is None or s.meets(next(
        r for r in ok if r["id"] == p.name), records)]
    if target is not None:
        print(f"meets the target: {best[-1].name if best else 'none'}"
              + (" (the most accurate that does)" if best else ""))
    print(f"plot: meshtune report {args.out}")
    return 0
