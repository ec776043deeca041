"""`meshtune report RUN_DIR [RUN_DIR ...]`: PNG plots and a Markdown table of runs, overlaid."""

from __future__ import annotations


def add(sub):
    p = sub.add_parser("report", help="PNG plots (loss, eval accuracy, lr, tokens/s) and a Markdown summary of "
                       "one or more runs, overlaid")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dirs holding metrics.jsonl and config.yaml")
    p.add_argument("--out", help="output directory (default: the first RUN_DIR's report/)")
    return p


def run(args) -> int:
    from meshtune.report import write_report

    write_report(args.run_dirs, args.out)
    return 0
