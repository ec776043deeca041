"""`meshtune report RUN_DIR [RUN_DIR ...]`: PNG plots and a Markdown table of runs, overlaid; or the Pareto front
of one `meshtune compress-search` dir."""

from __future__ import annotations

from meshtune.config import ConfigError


def add(sub):
    p = sub.add_parser("report", help="PNG plots (loss, eval accuracy, lr, tokens/s) and a Markdown summary of "
                       "one or more runs, overlaid; or the Pareto front of a compress-search dir")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dirs holding metrics.jsonl and config.yaml, "
                   "or one compress-search dir (front.png)")
    p.add_argument("--out", help="output directory (default: the first RUN_DIR's report/)")
    return p


def run(args) -> int:
    from meshtune.report import is_search, write_report, write_search_report

    searches = [d for d in args.run_dirs if is_search(d)]
    if searches and len(args.run_dirs) > 1:
        raise ConfigError(f"{searches[0]}: a compress-search dir is reported alone; give it as the only RUN_DIR")
    if searches:
        write_search_report(searches[0], args.out)
    else:
        write_report(args.run_dirs, args.out)
    return 0
