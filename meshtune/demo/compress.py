"""The demo's compression stage: the trained base (the teacher) and its compressed versions in one table.

    code, runs = compression_stage(root, sort_dir, base_file, nproc)   # from meshtune.demo.stages

Each compressed model is trained from the demo's base on the base's own task (`sort`) with a bundled config,
a short 2-rank run through `meshtune launch`, and exported with `meshtune export` in the format that makes it
small: the distilled student (compress/distill, <= 1/4 of the parameters) as merged weights, 50% magnitude and
2:4 pruning (compress/prune) as sparse files, structured pruning as the shrunk dense model, quantization-aware
training (finetune/qat; int8 weights, and int4 weights in groups of 32, both with int8 dynamic activations) as
real quantized weights. Post-training quantization of the base itself, with the same schemes, is the baseline
QAT is measured against (the QAT and pruned rows also trained the short run further on the task; PTQ did not).

Every row is then measured the same way, on the exported artifact loaded back with meshtune's own loaders
(`meshtune.artifacts`, the loader export, serve and teachers use): parameters (and how many are nonzero),
size on disk, CPU latency of a batched forward (median of a few runs, the models timed in turn so machine load
hits all alike) and exact-match accuracy on the held-out split, teacher-forced like the trainer's evaluation.

Then the deployment table: every row exported again as an ExecuTorch program (`meshtune export --format
executorch`: the run's own scheme, so QAT rows are int8/int4 programs, the PTQ rows the base's programs with
theirs, pruned rows dense fp32 programs, the structured row and the student the smaller decoders they are),
measured in the ExecuTorch runtime on one thread (`meshtune.measure`): .pte size, prefill of a prompt, batch-1
decode tokens/s next to the teacher in eager PyTorch behind the same KV cache, and the accuracy of the program
itself on the same held-out examples.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from meshtune.measure import eval_split

STUDENT_STEPS, PRUNE_STEPS = 200, 80  # PRUNE_STEPS: also the QAT runs
# (row, run dir under the demo root, bundled config, overrides, export format); magnitude and structured
# pruning ramp over the first 60% / 50% of the steps and then recover, 2:4 is one shot after the first step
VARIANTS = [
    ("distilled student", "compress-distill", "compress/distill", [], "merged"),
    ("pruned 50%", "compress-prune50", "compress/prune",
     [f"recipe.prune.end_step={int(0.6 * PRUNE_STEPS)}", "recipe.prune.frequency=8"], "sparse"),
    ("pruned 2:4", "compress-prune24", "compress/prune",
     ["recipe.prune.method=semi_structured", "recipe.prune.end_step=0"], "sparse"),
    ("structured 40%", "compress-structured", "compress/prune",
     ["recipe.prune.method=structured", "recipe.prune.sparsity=0.4", f"recipe.prune.end_step={PRUNE_STEPS // 2}",
      "recipe.prune.frequency=8"], "shrunk"),
    ("QAT int8", "compress-qat8", "finetune/qat", ["recipe.qat.scheme=int8-int8"], "quantized"),
    ("QAT int4", "compress-qat4", "finetune/qat", ["recipe.qat.scheme=int8-int4"], "quantized"),
]
PTQ = [("PTQ int8", "ptq-int8", "int8-int8"), ("PTQ int4", "ptq-int4", "int8-int4")]  # (row, out dir, scheme)
EAGER = "teacher, eager fp32"  # the decode reference: the teacher in eager PyTorch behind the programs' KV cache
PROMPT_LEN, NEW_TOKENS = 16, 24  # the deployment table's prefill prompt and timed decode steps
ORDER = ["teacher (base)", "distilled student", "pruned 50%", "pruned 2:4", "structured 40%", "QAT int8",
         "PTQ int8", "QAT int4", "PTQ int4"]


@dataclass
class Row:
    """One measured artifact: the model loaded back from `path` (written by `meshtune export --format fmt`)."""

    name: str
    path: Path
    fmt: str
    params: int = 0
    nonzero: int = 0
    size: int = 0
    latency_s: float = float("nan")
    accuracy: float = float("nan")
    eval_loss: float = float("nan")
    # its ExecuTorch program (`meshtune export --format executorch`), measured by measure_programs
    program: Path | None = None
    scheme: str = "fp32"
    vocab: int = 0
    pte_size: int = 0
    prefill_s: float = float("nan")
    decode_tps: float = float("nan")
    pte_accuracy: float = float("nan")
    pte_loss: float = float("nan")


def load_artifact(path: str | Path, fmt: str = "") -> nn.Module:
    """The runnable model of an exported file (merged, shrunk, sparse or quantized), through the one loader."""
    from meshtune.artifacts import find, load_model

    return load_model(find(path, key=f"--format {fmt} export" if fmt else "artifact"))


def _counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters); quantized tensor subclasses count as nonzero."""
    total = nonzero = 0
    for p in model.parameters():
        t = p.detach()
        total += t.numel()
        nonzero += int(torch.count_nonzero(t)) if type(t) is torch.Tensor else t.numel()
    return total, nonzero


def measure(rows: list[Row], eval_ds, seq_len: int, batch: int = 32, reps: int = 7, loader=load_artifact
            ) -> list[Row]:
    """Fill in every row's counts, file size, accuracy, loss and latency (in place; returns `rows`)."""
    from meshtune.measure import evaluate, forward_latencies

    models = {r.name: loader(r.path, r.fmt) for r in rows}
    gen = torch.Generator().manual_seed(0)
    vocab = min(m.vocab_size for m in models.values())
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    for r in rows:
        r.params, r.nonzero = _counts(models[r.name])
        r.vocab = models[r.name].vocab_size
        r.size = r.path.stat().st_size
        r.accuracy, r.eval_loss = evaluate(models[r.name], eval_ds, batch)
    for name, t in forward_latencies(models, tokens, reps).items():
        next(r for r in rows if r.name == name).latency_s = t
    return rows


def export_programs(jobs: list[tuple[Path, Path, str | None]], workers: int) -> list[Path]:
    """`meshtune export RUN --format executorch [--scheme S] --out OUT` of every (run, out, scheme), `workers` at a
    time in fresh processes (a lowering is one busy core for ~10-30 s at this size)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from meshtune.export import lower_job

    args = [(str(run), str(out), scheme) for run, out, scheme in jobs]
    with ProcessPoolExecutor(max(1, min(workers, len(jobs))), mp_context=multiprocessing.get_context("spawn")) as ex:
        return [Path(p) for p, _ in ex.map(lower_job, args)]


def measure_programs(rows: list[Row], eval_ds, prompt_len: int, new_tokens: int = 24, reps: int = 5,
                     reference: nn.Module | None = None) -> tuple[float, float]:
    """Fill in every row's program figures (in place): .pte size, the program's own accuracy and loss, and its
    prefill and decode speed on one thread, the programs (and `reference`, an eager model behind the same KV
    cache, when given) taking turns. Returns the reference's (prefill seconds, decode tokens/s), nan without one."""
    from meshtune.measure import cached_step, evaluate_step, one_thread, program_step, speeds

    with one_thread():  # before loading: ExecuTorch's threadpool cannot be resized under a loaded program
        steps = {r.name: program_step(r.program) for r in rows}
        vocab = min(r.vocab for r in rows)
        for r in rows:
            r.pte_size = r.program.stat().st_size
            r.pte_accuracy, r.pte_loss = evaluate_step(steps[r.name], eval_ds)
        if reference is not None:
            steps[EAGER] = cached_step(reference, prompt_len + new_tokens + 1)
        got = speeds(steps, prompt_len, new_tokens, vocab, reps)
    for r in rows:
        r.prefill_s, r.decode_tps = got[r.name]
    return got[EAGER] if reference is not None else (float("nan"), float("nan"))


def format_table(rows: list[Row]) -> str:
    """The rows as a text table, ratios against the first row (the teacher)."""
    from meshtune.export import human_size

    ref = rows[0]
    head = (f"{'model':<20}{'params':>10}{'nonzero':>10}{'x':>6}  {'artifact':<11}{'size':>10}{'x':>6}"
            f"{'ms/fwd':>8}{'speedup':>8}{'accuracy':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.name:<20}{r.params:>10,}{r.nonzero:>10,}{r.nonzero / ref.nonzero:>6.2f}  {r.fmt:<11}"
                     f"{human_size(r.size):>10}{r.size / ref.size:>6.2f}{r.latency_s * 1e3:>8.1f}"
                     f"{ref.latency_s / r.latency_s:>7.2f}x{r.accuracy:>9.3f}")
    return "\n".join(lines)


def format_programs(rows: list[Row], eager: tuple[float, float]) -> str:
    """The deployment table: each row's ExecuTorch program; sizes against the teacher's fp32 artifact (the first
    row), speed against the teacher in eager PyTorch behind the same KV cache (`eager`: its prefill seconds and
    decode tokens/s)."""
    from meshtune.export import human_size

    ref, (pre, tps) = rows[0], eager
    head = (f"{'model':<20}{'scheme':<10}{'.pte':>10}{'smaller':>8}{'prefill ms':>11}{'x':>6}{'decode tok/s':>13}"
            f"{'x':>6}{'accuracy':>9}{'(eager)':>8}")
    lines = [head, "-" * len(head), f"{'teacher, eager fp32':<20}{'-':<10}{human_size(ref.size):>10}{1:>8.2f}"
             f"{pre * 1e3:>11.2f}{1:>6.2f}{tps:>13.0f}{1:>6.2f}{ref.accuracy:>9.3f}{ref.accuracy:>8.3f}"]
    for r in rows:
        lines.append(f"{r.name:<20}{r.scheme:<10}{human_size(r.pte_size):>10}{ref.size / r.pte_size:>8.2f}"
                     f"{r.prefill_s * 1e3:>11.2f}{pre / r.prefill_s:>6.2f}{r.decode_tps:>13.0f}"
                     f"{r.decode_tps / tps:>6.2f}{r.pte_accuracy:>9.3f}{r.accuracy:>8.3f}")
    return "\n".join(lines)


def compression_stage(root: Path, sort_dir: Path, base: Path, nproc: int, num_eval: int = 128
                      ) -> tuple[int, list[Path]]:
    """Train, export and measure every variant from the demo's base; (exit code, run dirs for the report)."""
    from meshtune.config import bundled_configs_dir
    from meshtune.export import export
    from meshtune.launch.torchrun import launch
    from meshtune.schema import load_config

    print(f"\n== stage 5 compress the base ({base}) on its own task, sort: a distilled student "
          f"({STUDENT_STEPS} steps), 50% / 2:4 / structured pruning and int8 / int4 QAT ({PRUNE_STEPS} steps "
          f"each) on {nproc} ranks, post-training quantization of the base", flush=True)
    t0 = time.time()
    rows, runs = [Row("teacher (base)", base, "merged")], []
    for name, sub, config, extra, fmt in VARIANTS:
        run_dir = root / sub
        shutil.rmtree(run_dir, ignore_errors=True)
        steps = STUDENT_STEPS if config == "compress/distill" else PRUNE_STEPS
        source = [f"recipe.distill.teacher={base}"] if config == "compress/distill" else [f"init_from={base}"]
        overrides = [f"run_dir={run_dir}", *source, f"data.num_eval={num_eval}", f"train.steps={steps}",
                     f"train.eval_every={steps}", "checkpoint.every=0", "metrics.progress=false",
                     "parallel.dp_shard=-1", *extra]
        print(f"\n$ meshtune launch {config} --nproc-per-node {nproc} {' '.join(overrides)}", flush=True)
        code = launch(str(bundled_configs_dir() / f"{config}.yaml"), overrides, nproc)
        if code != 0:
            print(f"meshtune demo: compression run {name} failed with exit code {code}")
            return code, runs
        print(f"$ meshtune export {run_dir} --format {fmt}")
        (path, *_) = export(run_dir, fmt)
        rows.append(Row(name, path, fmt))
        runs.append(run_dir)
    for name, sub, scheme in PTQ:
        print(f"$ meshtune export {sort_dir} --format quantized --scheme {scheme} --out {root / sub}")
        (path,) = export(sort_dir, "quantized", out=root / sub, scheme=scheme)
        rows.append(Row(name, path, "quantized"))
    rows.sort(key=lambda r: ORDER.index(r.name))
    cfg = load_config(sort_dir / "config.yaml", [f"data.num_eval={num_eval}"])
    eval_ds = eval_split(cfg)
    measure(rows, eval_ds, cfg.data.seq_len)
    print(f"\ncompressed from {base}; accuracy = exact match on {num_eval} held-out sort examples; ms/fwd = median "
          f"CPU forward of a (32, {cfg.data.seq_len}) batch of the exported model loaded back; x = vs the teacher")
    print(format_table(rows))

    # deployment: every row as an ExecuTorch program (the run's own scheme; PTQ rows the base with theirs)
    sources = {"teacher (base)": (sort_dir, root / "base-executorch", None),
               **{name: (root / sub, root / sub / "executorch", None) for name, sub, *_ in VARIANTS},
               **{name: (sort_dir, root / f"{sub}-executorch", scheme) for name, sub, scheme in PTQ}}
    t1 = time.time()
    print(f"\n$ meshtune export RUN --format executorch [--scheme S] for each of the {len(rows)} rows "
          f"({nproc} at a time)", flush=True)
    for r, pte in zip(rows, export_programs([sources[r.name] for r in rows], nproc), strict=True):
        r.program, r.scheme = pte, json.loads(pte.with_suffix(".json").read_text())["scheme"]
    print(f"lowered in {time.time() - t1:.0f} s", flush=True)
    eager = measure_programs(rows, eval_ds, PROMPT_LEN, NEW_TOKENS, reference=load_artifact(base, "merged"))
    print(f"\ndeployment: each row's ExecuTorch program (XNNPACK) in the ExecuTorch runtime, 1 thread; prefill = a "
          f"(1, {PROMPT_LEN}) prompt, decode = {NEW_TOKENS} greedy tokens after it (batch 1); accuracy = the program's "
          "own, teacher-forced on the same examples (eager artifact's beside it); x = vs the teacher's fp32 "
          "artifact (size) and vs the teacher in eager PyTorch behind the same KV cache (speed)")
    print(format_programs(rows, eager))
    print(f"stage 5: {time.time() - t0:.0f} s")
    return 0, runs
