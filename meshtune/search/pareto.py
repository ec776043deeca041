"""The Pareto front of a compression search, its target metrics and its results file. No torch import:
`meshtune report` draws a search's front from here.

    points = [Point("dense-fp32", cost=1.0, accuracy=0.91, loss=0.30), Point("dense-int8", 0.31, 0.90, 0.32)]
    front(points)                       # cheapest first, each more accurate than every cheaper one
    records = read_results(out / "results.jsonl")

A point is better when it costs less (size, latency: lower is better) and is more accurate. Accuracy ties are
broken by the evaluation loss (lower is better): exact-match accuracy is coarse on small evaluation sets, and two
programs with the same accuracy but different losses are not the same program. A point is on the front when no
other point is at least as cheap and at least as good (accuracy, then loss) with one of the two strictly better;
of points equal in both, the first listed is kept. The front, sorted by cost, is therefore strictly increasing
in cost and in quality.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from meshtune.config import ConfigError

RESULTS = "results.jsonl"  # one JSON line per finished candidate (ok or failed), appended as each ends
SETTINGS = "search.json"  # the search's run dir, fine-tune steps and target, written when it starts

# target kind -> (results key of the front's cost, axis label, unit of the target's value); lower cost is better
METRICS = {
    "size": ("pte_size", ".pte size (bytes)", "bytes"),
    "latency": ("decode_time_ratio", "decode ms/token (1 thread; dense program's median ms x paired ratio)", "ms"),
    "speedup": ("decode_time_ratio", "decode time / the dense program's (paired, 1 thread)", "x"),
}


@dataclass(frozen=True)
class Point:
    """One candidate on the plane: `cost` (lower is better), `accuracy` and `loss` (the tie-break)."""

    name: str
    cost: float
    accuracy: float
    loss: float = math.inf

    def quality(self) -> tuple[float, float]:
        return (self.accuracy, -self.loss)


def dominates(a: Point, b: Point) -> bool:
    """`a` is at least as cheap and as good as `b`, and strictly better in one of the two."""
    return a.cost <= b.cost and a.quality() >= b.quality() and (a.cost < b.cost or a.quality() > b.quality())


def front(points: list[Point]) -> list[Point]:
    """The non-dominated points, cheapest first (of exact duplicates, the first listed); NaN costs or
    accuracies (failed measurements) are left out."""
    valid = [p for p in points if not (math.isnan(p.cost) or math.isnan(p.accuracy))]
    order = sorted(range(len(valid)), key=lambda i: (valid[i].cost, tuple(-q for q in valid[i].quality()), i))
    out: list[Point] = []
    for i in order:
        p = valid[i]
        if not out or p.quality() > out[-1].quality():
            out.append(p)
    return out


def target_cost(kind: str, value: float) -> float:
    """The cost a candidate must not exceed to meet `--target-KIND value` (speedup X: time ratio <= 1/X)."""
    return 1.0 / value if kind == "speedup" else value


def dense_ms(records: list[dict]) -> float:
    """The dense program's decode ms/token: the median over every measurement of it (each candidate's is timed
    with one), so one measurement under a passing load does not move the latency axis."""
    import statistics

    ms = [1e3 / r["dense_decode_tps"] for r in records if r.get("status") == "ok" and r.get("dense_decode_tps")]
    return statistics.median(ms) if ms else float("nan")


def cost_of(record: dict, kind: str, records: list[dict]) -> float:
    """A results line's cost on the axis of target `kind` (nan when it has none, e.g. a failed candidate);
    latency is the paired time ratio times the dense program's median ms (`dense_ms` of `records`)."""
    value = record.get(METRICS[kind][0])
    if value is None:
        return float("nan")
    return float(value) * (dense_ms(records) if kind == "latency" else 1.0)


def points_of(records: list[dict], kind: str) -> list[Point]:
    """The measured (status ok) candidates of a results file as points on `kind`'s axis."""
    return [Point(r["id"], cost_of(r, kind, records), r["accuracy"], r.get("loss", math.inf))
            for r in records if r.get("status") == "ok"]


def read_results(path: Path) -> list[dict]:
    """The lines of a results file, the newest line per candidate id; a truncated last line (a search killed while
    writing) is skipped.

    Raises:
        ConfigError: naming the file and line for a damaged line other than the last.
    """
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out: dict[str, dict] = {}
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ConfigError(f"{path}: line {i + 1} is not JSON; the results file is damaged (remove that "
                                  "line to rerun its candidate)") from None
            continue
        out[record["id"]] = record
    return list(out.values())


def append_result(path: Path, record: dict) -> None:
    """Append one line and flush it to disk, so an interrupted search keeps every finished candidate."""
    import os

    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_settings(out: Path) -> dict | None:
    """The search.json of a search dir, or None when `out` holds no search."""
    path = out / SETTINGS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{path}: not JSON; the search dir is damaged (use a new --out)") from None


def format_table(records: list[dict], kind: str, target: float | None) -> str:
    """The candidates as a text table, cheapest first on `kind`'s axis: `*` = on the front, `ok` = meets the
    target; ratios against the dense program timed in the same call."""
    on_front = {p.name for p in front(points_of(records, kind))}
    limit = target_cost(kind, target) if target is not None else None
    head = (f"{'candidate':<20}{'.pte KB':>9}{'x size':>7}{'prefill ms':>11}{'decode tok/s':>13}{'x dense':>8}"
            f"{'accuracy':>9}{'loss':>8}{'front':>6}{'target':>7}")
    lines = [head, "-" * len(head)]
    ok = sorted((r for r in records if r.get("status") == "ok"), key=lambda r: (cost_of(r, kind, records), r["id"]))
    for r in ok:
        meets = "-" if limit is None else "ok" if cost_of(r, kind, records) <= limit else "no"
        lines.append(f"{r['id']:<20}{r['pte_size'] / 1024:>9.1f}{r['size_ratio']:>7.2f}{r['prefill_s'] * 1e3:>11.2f}"
                     f"{r['decode_tps']:>13.0f}{r['decode_speedup']:>7.2f}x{r['accuracy']:>9.3f}{r['loss']:>8.3f}"
                     f"{'*' if r['id'] in on_front else '':>6}{meets:>7}")
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"{r['id']:<20}failed ({r.get('stage', '?')}): {r.get('error', '?')}")
    return "\n".join(lines)
