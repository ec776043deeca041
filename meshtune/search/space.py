"""What `meshtune compress-search` explores, in which order, and the fine-tune each candidate needs. No torch.

    for cand in order("size"): ...            # every candidate, the most promising for a size target first
    skip = skipped(cand, records, "size", 2e6)   # a reason to leave it out given what was measured, or None
    overrides = train_overrides(cand, run_dir, steps, out)   # key=value list for the candidate's fine-tune

A candidate is (structured fraction, unstructured method, weight scheme, distillation). Structured and
unstructured pruning are one recipe (`recipe.prune.method`), so a candidate has one or the other. Candidates
that share a fine-tune (the same pruning and distillation, different post-training weight schemes) share its
run: `train_key`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from meshtune.config import bundled_configs_dir, read_yaml

SCHEMES = ("fp32", "int8-int8", "int8-int4")
BITS = {"fp32": "fp32", "int8-int8": "int8", "int8-int4": "int4"}
STRUCTURED = (0.5, 0.25)
UNSTRUCTURED = ("magnitude", "2:4")
# rule 3: an unstructured program counts as no gain when it is at least this fraction of the dense .pte (XNNPACK's
# kernels are dense: the zeros are stored and multiplied). Size only: on a shared machine paired decode ratios of
# identical shapes moved by +-20% (measured: a 50%-magnitude program at 1.21x the dense program's decode)
SAME_SIZE = 0.95


@dataclass(frozen=True)
class Candidate:
    """One point of the grid. `structured`: fraction of heads and MLP channels removed (0 = none);
    `unstructured`: '' | 'magnitude' (50%) | '2:4'; `scheme`: the program's weights; `distill`: KD from the run."""

    structured: float = 0.0
    unstructured: str = ""
    scheme: str = "fp32"
    distill: bool = False

    @property
    def id(self) -> str:
        shape = (f"struct{round(100 * self.structured)}" if self.structured else
                 {"magnitude": "mag50", "2:4": "2of4"}.get(self.unstructured, "dense"))
        return "-".join([shape, *(["kd"] if self.distill else []), BITS[self.scheme]])

    @property
    def is_dense(self) -> bool:
        return self == Candidate()

    @property
    def pruned(self) -> bool:
        return bool(self.structured or self.unstructured)

    @property
    def qat(self) -> bool:
        """Quantized weights of an unpruned model come from QAT; of a pruned one from PTQ of its fine-tune
        (prune + qat do not stack: QAT's module swap drops the pruning masks)."""
        return self.scheme != "fp32" and not self.pruned

    @property
    def train_key(self) -> str:
        """The fine-tune this candidate is exported from ('' for the dense run itself)."""
        if self.is_dense:
            return ""
        if self.qat:
            return self.id
        return Candidate(self.structured, self.unstructured, "fp32", self.distill).id

    def fields(self) -> dict:
        return asdict(self)


def grid() -> list[Candidate]:
    """Every candidate: structured {0, 25%, 50%} or unstructured {50% magnitude, 2:4}, x weights {fp32, int8,
    int4} x distillation {off, on}, except distilling the dense fp32 model into itself."""
    shapes = [(0.0, ""), *((s, "") for s in STRUCTURED), *((0.0, u) for u in UNSTRUCTURED)]
    out = [Candidate(s, u, scheme, kd) for s, u in shapes for scheme in SCHEMES for kd in (True, False)]
    return [c for c in out if not (c.scheme == "fp32" and not c.pruned and c.distill)]


# rule 1: the candidates the measurements say matter, most promising first (then the rest of the grid)
FIRST = {
    "size": [Candidate(scheme="int8-int8"), Candidate(0.5, distill=True), Candidate(unstructured="magnitude"),
             Candidate(scheme="int8-int4"), Candidate(0.5, scheme="int8-int8", distill=True),
             Candidate(unstructured="2:4"), Candidate(0.25, scheme="int8-int8", distill=True),
             Candidate(0.5, scheme="int8-int4", distill=True), Candidate(0.5)],
    "latency": [Candidate(0.5, distill=True), Candidate(scheme="int8-int8"), Candidate(unstructured="2:4"),
                Candidate(0.5, scheme="int8-int8", distill=True), Candidate(unstructured="magnitude"),
                Candidate(0.25, distill=True), Candidate(scheme="int8-int4"),
                Candidate(0.25, scheme="int8-int8", distill=True), Candidate(0.5)],
}


def order(kind: str) -> list[Candidate]:
    """The grid in the order to explore for a target of `kind` (size; latency and speedup alike)."""
    first = FIRST["size" if kind == "size" else "latency"]
    rest = sorted((c for c in grid() if c not in first and not c.is_dense),
                  key=lambda c: (bool(c.unstructured), not c.distill, -c.structured, SCHEMES.index(c.scheme)))
    return [*first, *rest]


def compression(c: Candidate) -> tuple[float, int]:
    """How far a candidate compresses along the axes a program feels: (structured fraction, -weight bits)."""
    return (c.structured, -{"fp32": 32, "int8-int8": 8, "int8-int4": 4}[c.scheme])


def skipped(c: Candidate, records: list[dict], meets) -> str | None:
    """Why to leave `c` out given the measured `records` (results lines), or None to explore it.

    `meets(record)` tells whether a measured candidate meets the target (always False without one).
    Rule 2: once a candidate meets the target, one that compresses at least as far on every axis (and with the
    same pruning kind and distillation) is expected to be cheaper and less accurate: it is not explored. (A dense
    run that meets the target already stops nothing: the search then maps the front below it.)
    Rule 3: once a measured unstructured program is no smaller than the dense one (>= SAME_SIZE of its size),
    the other unstructured candidates are not explored.
    """
    ok = [r for r in records if r.get("status") == "ok"]
    for r in ok:
        other = Candidate(r["structured"], r["unstructured"], r["scheme"], r["distill"])
        if (other != c and not other.is_dense and meets(r) and other.unstructured == c.unstructured
                and other.distill == c.distill
                and all(a <= b for a, b in zip(compression(other), compression(c), strict=True))):
            return f"rule 2: {other.id} already meets the target and compresses less"
    if c.unstructured:
        for r in ok:
            if r["unstructured"] and r["size_ratio"] >= SAME_SIZE:
                return (f"rule 3: {r['id']} measured {r['size_ratio']:.2f}x the dense size (decode "
                        f"{r['decode_speedup']:.2f}x): dense kernels store and multiply the zeros")
    return None


def _section(config: str, key: str) -> dict:
    return read_yaml(bundled_configs_dir() / f"{config}.yaml").get(key) or {}


def _flatten(prefix: str, section: dict) -> list[str]:
    out = []
    for k, v in section.items():
        if isinstance(v, dict):
            out += _flatten(f"{prefix}.{k}", v)
        elif isinstance(v, list):
            out.append(f"{prefix}.{k}=[{', '.join(str(x) for x in v)}]")
        else:
            out.append(f"{prefix}.{k}={v}")
    return out


def train_overrides(c: Candidate, run_dir: str, steps: int, out_dir: str) -> list[str]:
    """key=value overrides, on the run's own config.yaml, for the candidate's fine-tune: the bundled recipes'
    sections and learning rates (compress/prune, compress/prune-distill, finetune/qat), `steps` steps from the
    run's weights, one final checkpoint, any layout (data parallel over the ranks there are)."""
    if c.qat:
        source, names = "finetune/qat", ["qat"]
    else:
        source, names = ("compress/prune-distill" if c.distill else "compress/prune"), ["prune"]
    recipe = _section(source, "recipe")
    optim = _section(source, "optim")
    if c.distill:
        recipe.setdefault("distill", _section("compress/prune-distill", "recipe")["distill"])
        names.append("distill")
    recipe["name"] = "+".join(names)
    if "distill" in recipe:
        recipe["distill"]["teacher"] = run_dir
    if "prune" in recipe:
        p = recipe["prune"]
        if c.structured:  # ramp over the first half, then recover
            p.update(method="structured", sparsity=c.structured, end_step=steps // 2, frequency=max(1, steps // 10))
        elif c.unstructured == "2:4":  # one shot at the first step
            p.update(method="semi_structured", end_step=0)
        else:
            p.update(method="magnitude", sparsity=0.5, end_step=steps // 2, frequency=max(1, steps // 10))
    if c.qat:
        recipe["qat"]["scheme"] = c.scheme
        if c.scheme == "int8-int8":
            recipe["qat"]["group_size"] = 0  # XNNPACK's int8 weights are per channel
    return [f"run_dir={out_dir}", f"init_from={run_dir}", *_flatten("recipe", recipe),
            f"optim.lr={optim.get('lr', 3e-4)}", f"optim.warmup_steps={min(optim.get('warmup_steps', 0), steps // 5)}",
            f"train.steps={steps}", "train.eval_every=0", "checkpoint.every=0", "checkpoint.save_final=true",
            "checkpoint.resume=never", "metrics.progress=false", "parallel.dp_replicate=1", "parallel.dp_shard=-1",
            "parallel.tp=1", "parallel.pp=1"]
