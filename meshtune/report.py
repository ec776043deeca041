"""`meshtune report`: PNG plots and a Markdown summary of one or more training runs, overlaid for comparison.

    meshtune report runs/ft-lora runs/ft-full --out runs/compare
    # runs/compare/loss.png, eval_accuracy.png, lr.png, tokens_per_s.png, report.md

Reads each run's metrics.jsonl (written by meshtune/runtime/metrics.py) and config.yaml; needs matplotlib but
not torch. Plots are 640 x 400 pixels (FIGSIZE at DPI), one line per run against the optimizer step. The table
holds each run's recipe, trainable parameters (counted on the unsharded model when the run started), final
training loss, final evaluation loss and accuracy, steps, training wall time (summed over resumed segments)
and median throughput. A resumed run's repeated steps count once (the newest line wins).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from meshtune.config import ConfigError, read_yaml

FIGSIZE, DPI = (6.4, 4.0), 100  # inches, dots per inch: 640 x 400 px
PLOTS = {  # file stem -> (record key, y label)
    "loss": ("loss", "training loss (evaluation dashed)"),
    "eval_accuracy": ("eval_accuracy", "evaluation exact-match accuracy"),
    "lr": ("lr", "learning rate"),
    "tokens_per_s": ("tokens_per_s", "tokens / s"),
}


@dataclass
class RunData:
    """One run's metrics, deduplicated by step.

    Attributes:
        name: the label in plots and the table (the run dir's name, or its path when names clash).
        path: the run directory.
        recipe: `recipe.name` of its config.yaml, `none` for full training, `?` without a config.
        train, evals: training and evaluation records, one per step, in step order.
        start: the newest start record (trainable_params, total_params, world_size), if the run wrote one.
        wall_s: seconds from each start to the segment's last record, summed over resumed segments.
    """

    name: str
    path: Path
    recipe: str
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    start: dict | None = None
    wall_s: float = float("nan")

    def series(self, key: str) -> tuple[list[int], list[float]]:
        rows = [r for r in (self.evals if key.startswith("eval_") else self.train) if key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]

    def last(self, key: str) -> float | None:
        _, ys = self.series(key)
        return ys[-1] if ys else None


def read_records(path: Path) -> list[dict]:
    """The JSON lines of `path`; a truncated last line (a killed job) is skipped.

    Raises:
        ConfigError: for a missing file or a malformed line other than the last.
    """
    if not path.is_file():
        raise ConfigError(f"{path.parent}: no metrics.jsonl; give the run_dir of a meshtune training run")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ConfigError(f"{path}: line {i + 1} is not JSON; the metrics file is damaged") from None
    return records


def wall_time(records: list[dict]) -> float:
    """Seconds of training: for each segment (a start record up to the next), its last time minus its start.

    A run without start records (older files) starts at the first record's time less its logging window."""
    total, start, last = 0.0, None, None
    for r in records:
        if "time" not in r:
            continue
        if r.get("event") == "start":
            if start is not None and last is not None:
                total += last - start
            start, last = r["time"], r["time"]
            continue
        if start is None:
            start = r["time"] - r.get("step_time_s", 0.0) * r.get("step", 0)
        last = r["time"]
    if start is None:
        return float("nan")
    return total + (last - start)


def read_run(run_dir: str | Path) -> RunData:
    """A run's metrics and recipe.

    Raises:
        ConfigError: naming the path when it is not a directory or holds no metrics.jsonl.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such run directory; give the run_dir of a meshtune training run")
    records = read_records(path / "metrics.jsonl")
    if not any("loss" in r for r in records):
        raise ConfigError(f"{path / 'metrics.jsonl'}: holds no training records yet; train the run first")
    recipe = "?"
    if (path / "config.yaml").is_file():
        recipe = (read_yaml(path / "config.yaml").get("recipe") or {}).get("name") or "none"
    train = {r["step"]: r for r in records if "loss" in r}
    evals = {r["step"]: r for r in records if "eval_loss" in r or "eval_accuracy" in r}
    starts = [r for r in records if r.get("event") == "start"]
    return RunData(path.name, path, recipe, [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)],
                   starts[-1] if starts else None, wall_time(records))


def plot(runs: list[RunData], stem: str, out: Path) -> Path | None:
    """One PNG of `PLOTS[stem]` with a line per run (the loss plot adds dashed evaluation loss); None without data."""
    from matplotlib.figure import Figure  # a Figure of its own: no pyplot state, no backend to select

    key, ylabel = PLOTS[stem]
    if not any(run.series(key)[0] for run in runs):
        return None
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.subplots()
    values = []
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        steps, ys = run.series(key)
        marker = "o" if len(steps) < 20 else None
        ax.plot(steps, ys, color=color, marker=marker, markersize=3, label=run.name)
        values += ys
        if stem == "loss":
            steps, ys = run.series("eval_loss")
            ax.plot(steps, ys, color=color, linestyle="--", marker="o", markersize=3)  # no legend entry: same color
            values += ys
    positive = [v for v in values if v > 0]
    if stem in ("loss", "lr") and positive and max(positive) / min(positive) > 20:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")  # ticks as 0.2, 0.5, 1 rather than 2 x 10^-1
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "25" else ""))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()  # moves the axes inside the figure; the image size stays FIGSIZE * DPI
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=DPI)
    return path


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or x != x else format(x, fmt)


def table(runs: list[RunData]) -> str:
    """The Markdown summary table, one row per run."""
    head = ["run", "recipe", "trainable params", "trainable %", "final loss", "final eval loss",
            "final eval accuracy", "steps", "wall time (s)", "tokens/s (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        s = run.start or {}
        trainable, total = s.get("trainable_params"), s.get("total_params")
        tps = [r["tokens_per_s"] for r in run.train if "tokens_per_s" in r]
        cells = [run.name, run.recipe, _num(trainable, ","),
                 _num(100 * trainable / total if trainable is not None and total else None, ".2f"),
                 _num(run.last("loss"), ".4f"), _num(run.last("eval_loss"), ".4f"),
                 _num(run.last("eval_accuracy"), ".3f"), str(run.train[-1]["step"]), _num(run.wall_s, ".1f"),
                 _num(statistics.median(tps) if tps else None, ",.0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run_dirs: list[str | Path], out: str | Path | None = None, quiet: bool = False) -> Path:
    """Plots and report.md for `run_dirs`, in `out` (default: the first run dir's `report/`).

    Returns:
        The path of report.md.

    Raises:
        ConfigError: one line naming a run dir that is missing or holds no metrics.
    """
    if not run_dirs:
        raise ConfigError("meshtune report: give at least one RUN_DIR")
    runs = [read_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:  # two runs/x dirs in different places: tell them apart by path
            run.name = str(run.path)
    out = Path(out) if out is not None else Path(run_dirs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = {stem: plot(runs, stem, out) for stem in PLOTS}
    parts = ["# meshtune report", "", table(runs), "",
             "Final values are the last logged ones; wall time is training time summed over resumed segments; "
             "trainable parameters are counted on the whole (unsharded) model.", ""]
    for stem, path in written.items():
        key, ylabel = PLOTS[stem]
        parts += [f"![{ylabel}]({path.name})" if path else f"_No run logged `{key}`._", ""]
    parts += ["Runs:", "", *[f"- {run.name}: `{run.path}`" for run in runs], ""]
    report = out / "report.md"
    report.write_text("\n".join(parts))
    if not quiet:
        print(table(runs))
        plots = ", ".join(p.name for p in written.values() if p)
        print(f"meshtune report: wrote {report} and {plots}")
    return report


def is_search(path: str | Path) -> bool:
    """Whether `path` is a `meshtune compress-search` dir (it holds search.json)."""
    from meshtune.search.pareto import SETTINGS

    return (Path(path) / SETTINGS).is_file()


def plot_front(records: list[dict], kind: str, target: float | None, out: Path) -> Path:
    """front.png: every measured candidate (cost on `kind`'s axis, accuracy), the front as a step line, the
    dense run marked and the target as a vertical line."""
    from matplotlib.figure import Figure

    from meshtune.search.pareto import METRICS, front, points_of, target_cost

    points = points_of(records, kind)
    best = front(points)
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.subplots()
    ax.scatter([p.cost for p in points], [p.accuracy for p in points], color="C7", s=18, label="candidate")
    ax.plot([p.cost for p in best], [p.accuracy for p in best], color="C0", marker="o", markersize=5,
            drawstyle="steps-post", label="Pareto front")
    for p in points:
        ax.annotate(p.name, (p.cost, p.accuracy), fontsize=6, xytext=(3, 3), textcoords="offset points")
    dense = [p for p in points if p.name == "dense-fp32"]
    if dense:
        ax.scatter([dense[0].cost], [dense[0].accuracy], color="C3", marker="*", s=90, zorder=3, label="dense run")
    if target is not None:
        ax.axvline(target_cost(kind, target), color="C2", linestyle="--", label="target")
    ax.set_xlabel(METRICS[kind][1])
    ax.set_ylabel("accuracy of the program (exact match)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = out / "front.png"
    fig.savefig(path, dpi=DPI)
    return path


def write_search_report(search_dir: str | Path, out: str | Path | None = None, quiet: bool = False) -> Path:
    """front.png and report.md of a compress-search dir, in `out` (default: SEARCH_DIR/report).

    Raises:
        ConfigError: naming the dir when it holds no measured candidate yet.
    """
    from meshtune.search.pareto import RESULTS, format_table, read_results, read_settings

    search_dir = Path(search_dir)
    settings = read_settings(search_dir) or {}
    records = read_results(search_dir / RESULTS)
    if not any(r.get("status") == "ok" for r in records):
        raise ConfigError(f"{search_dir / RESULTS}: no measured candidate yet; run meshtune compress-search first")
    kind, target = settings.get("kind", "size"), settings.get("target")
    out = Path(out) if out is not None else search_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_front(records, kind, target, out)
    text = format_table(records, kind, target)
    report = out / "report.md"
    report.write_text("\n".join([f"# compress-search of {settings.get('run_dir', '?')}", "", "```", text, "```", "",
                                 f"![Pareto front]({plot.name})", ""]))
    if not quiet:
        print(text)
        print(f"meshtune report: wrote {report} and {plot.name}")
    return report
