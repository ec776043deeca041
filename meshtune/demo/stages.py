"""`meshtune demo`: the bundled end-to-end demo on 2 CPU ranks, a few minutes from a fresh install.

Stage 1 trains the tiny decoder on the `sort` task with FSDP2 (dp_shard=2) through `meshtune launch`
and stops half-way, as a preempted job would. Stage 2 resumes that checkpoint under a different layout
(DDP: dp_replicate=2), which DCP reshards on load, and trains to the end. The table shows loss and exact-
match accuracy rising across both stages.

Stage 3 exports that model as merged safetensors (`meshtune export`, one process reading the checkpoint).
Stage 4 fine-tunes it on a task in a format it has not seen, `sort` under a new prompt word (`arrange`,
written as a JSONL file; ~0 accuracy before fine-tuning), four ways with the bundled configs: full fine-tuning,
LoRA, bottleneck adapters and prefix tuning, each a short 2-rank run followed by an export (merged weights for
full fine-tuning, the adapter file for the others). The table shows trainable parameters, exported file size,
median step time and task accuracy side by side.

Stage 5 compresses the base on its own task (meshtune.demo.compress): a distilled student of under a quarter
of its parameters, 50% magnitude, 2:4 and structured pruning, int8 and int4 QAT, each a short 2-rank run with a
bundled config and an export (merged, sparse, shrunk, quantized), plus post-training quantization of the base;
one table compares the exported artifacts: parameters, size on disk, CPU forward latency and accuracy.

It ends with `meshtune report` over all the runs: <run_dir>/report/report.md and PNG plots of loss, accuracy,
learning rate and throughput, the runs overlaid.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from meshtune.config import bundled_configs_dir
from meshtune.launch.torchrun import launch

CONFIG = "pretrain/tiny"
# (recipe, layout overrides): each fine-tune runs its bundled config (finetune/<recipe>) on the demo's ranks
FINETUNE = [("full", ["parallel.dp_shard=-1"]), ("lora", ["parallel.dp_shard=-1"]),
            ("adapters", ["parallel.dp_shard=-1"]), ("prefix", ["parallel.dp_shard=-1"])]
FT_STEPS = 200
TASK = "arrange"  # the fine-tuning task (meshtune/data/tasks.py), written as a JSONL file
NUM_TRAIN, NUM_EVAL = 8192, 128


def write_task_file(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write `n` examples of the bundled `arrange` task (`arrange: 3ab0` -> `03ab`) as prompt/response JSONL.

    The demo's fine-tuning task, read back as a user's own data file would be: the base's own skill (sort)
    under a prompt it has never seen, the setting parameter-efficient methods are made for (the base has the
    skill, the fine-tune adapts it). A new skill (descending sort, `rsort`; `reverse`; `add`) is a different
    story at this size: in 200 steps full fine-tuning reached 0.42 on `rsort`, LoRA 0.27, adapters and
    prefix tuning 0 (bench/bench_peft.py --task rsort)."""
    from meshtune.data.tasks import generate

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in generate(TASK, n, seed)))
    return path


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_demo(run_root: str = "runs/demo", nproc: int = 2) -> int:
    root = Path(run_root)
    t0 = time.time()
    code, sort_dir = pretrain_stages(root, nproc)
    if code != 0:
        return code
    code = finetune_stages(root, sort_dir, nproc)
    compressed = []
    if code == 0:
        from meshtune.demo.compress import compression_stage

        code, compressed = compression_stage(root, sort_dir, root / "base" / "model.safetensors", nproc, NUM_EVAL)
    if code == 0:
        from meshtune.report import write_report

        runs = [sort_dir, *(root / f"ft-{name}" for name, _ in FINETUNE), *compressed]
        print(f"\n$ meshtune report {' '.join(map(str, runs))} --out {root / 'report'}", flush=True)
        report = write_report(runs, root / "report")
        print(f"report: {report} (plots beside it)")
    print(f"\n{time.time() - t0:.0f} s in all")
    if code == 0:
        print("demo passed: the base learned and resumed across layouts; every recipe lowered the loss on the new task")
    return code


def pretrain_stages(root: Path, nproc: int) -> tuple[int, Path]:
    """Stages 1-2: the base model on `sort`, preempted under FSDP2 and resumed under DDP."""
    config = str(bundled_configs_dir() / f"{CONFIG}.yaml")
    run_dir = root / "sort"
    shutil.rmtree(run_dir, ignore_errors=True)
    steps, half = 300, 150
    common = [f"run_dir={run_dir}", f"train.steps={steps}", "train.eval_every=50", "checkpoint.every=50",
              "metrics.progress=false"]
    stages = [
        (f"1/4 FSDP2 (dp_shard={nproc}), stopped at step {half} like a preempted job",
         [*common, "parallel.dp_shard=-1", "parallel.dp_replicate=1", f"train.stop_after={half}"]),
        (f"2/4 resume the step-{half} checkpoint under DDP (dp_replicate={nproc}): resharded on load",
         [*common, "parallel.dp_shard=1", "parallel.dp_replicate=-1"]),
    ]
    for title, overrides in stages:
        print(f"\n== stage {title}\n$ meshtune launch {CONFIG} --nproc-per-node {nproc} {' '.join(overrides)}",
              flush=True)
        code = launch(config, overrides, nproc)
        if code != 0:
            print(f"meshtune demo: stage failed with exit code {code}")
            return code, run_dir
    rows = _read_metrics(run_dir)
    train = {r["step"]: r for r in rows if "loss" in r}
    evals = [r for r in rows if "eval_loss" in r]
    print(f"\n{'step':>5} {'train loss':>11} {'eval loss':>10} {'accuracy':>9} {'tokens/s':>9}  layout")
    for r in evals:
        tr = train.get(r["step"], {})
        layout = "fsdp" if r["step"] <= half else "ddp"
        print(f"{r['step']:>5} {tr.get('loss', float('nan')):>11.4f} {r['eval_loss']:>10.4f} "
              f"{r['eval_accuracy']:>9.3f} {tr.get('tokens_per_s', float('nan')):>9.0f}  {layout}")
    if not (len(evals) >= 2 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]):
        print("demo FAILED: the base model's loss did not fall")
        return 1, run_dir
    print(f"run dir: {run_dir} (config.yaml, metrics.jsonl, checkpoints/)")
    return 0, run_dir


def finetune_stages(root: Path, sort_dir: Path, nproc: int) -> int:
    """Stages 3-4: export the base, then full fine-tuning, LoRA, adapters and prefix tuning on `arrange`."""
    from meshtune.export import export  # imports torch: only now, the launcher stages above do not need it

    base_dir = root / "base"
    print(f"\n== stage 3/4 export the sort model as the base for fine-tuning (one process reads the DCP "
          f"checkpoint)\n$ meshtune export {sort_dir} --format merged --out {base_dir}", flush=True)
    (base,) = export(sort_dir, "merged", out=base_dir)
    task = write_task_file(root / f"{TASK}.jsonl", NUM_TRAIN + NUM_EVAL)
    print(f"\n== stage 4/4 fine-tune the base on a new format, sort under a new prompt word ({task}): full "
          f"fine-tuning, LoRA, adapters, prefix tuning; {FT_STEPS} steps each on {nproc} ranks", flush=True)
    results = {}
    for name, layout in FINETUNE:
        run_dir = root / f"ft-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        overrides = [f"run_dir={run_dir}", f"init_from={base}", "data.task=", f"data.train_path={task}",
                     f"data.num_eval={NUM_EVAL}", f"train.steps={FT_STEPS}", f"train.eval_every={FT_STEPS}",
                     "checkpoint.every=0", "metrics.progress=false", *layout]
        print(f"\n$ meshtune launch finetune/{name} --nproc-per-node {nproc} {' '.join(overrides)}", flush=True)
        code = launch(str(bundled_configs_dir() / "finetune" / f"{name}.yaml"), overrides, nproc)
        if code != 0:
            print(f"meshtune demo: fine-tuning {name} failed with exit code {code}")
            return code
        fmt = "merged" if name == "full" else "adapter"
        print(f"$ meshtune export {run_dir} --format {fmt}")
        (path,) = export(run_dir, fmt)
        results[name] = _finetune_row(name, run_dir, path)
    return _finetune_table(results, base)


def _finetune_row(name: str, run_dir: Path, exported: Path) -> dict:
    """Trainable parameters, exported file size, median step time, final loss and accuracy."""
    rows = _read_metrics(run_dir)
    start = next(r for r in rows if r.get("event") == "start")  # the counts training logged, tied weights once
    trainable, total = start["trainable_params"], start["total_params"]
    times = sorted(r["step_time_s"] for r in rows if "step_time_s" in r)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    return {"trainable": trainable, "total": total, "file": exported, "size": exported.stat().st_size,
            "step_s": times[len(times) // 2] if times else float("nan"), "first_loss": losses[0],
            "last_loss": losses[-1], "accuracy": evals[-1]["eval_accuracy"] if evals else float("nan")}


def _finetune_table(results: dict, base: Path) -> int:
    from meshtune.export import human_size

    full = results.get("full")
    print(f"\nfine-tuned from {base} on {TASK} ({FT_STEPS} steps each; accuracy = exact match on "
          f"{NUM_EVAL} held-out examples; step time = median of the logged windows)")
    head = (f"{'recipe':<10}{'trainable':>11}{'%':>8}  {'exported file':<22}{'size':>10}{'ms/step':>9}"
            f"{'loss':>8}{'accuracy':>10}{'x full':>8}")
    print(head + "\n" + "-" * len(head))
    for name, r in results.items():
        ratio = r["accuracy"] / full["accuracy"] if full and full["accuracy"] else float("nan")
        print(f"{name:<10}{r['trainable']:>11,}{100 * r['trainable'] / r['total']:>8.2f}  {r['file'].name:<22}"
              f"{human_size(r['size']):>10}{r['step_s'] * 1e3:>9.0f}{r['last_loss']:>8.3f}{r['accuracy']:>10.3f}"
              f"{ratio:>8.2f}")
    failed = [n for n, r in results.items() if not r["last_loss"] < r["first_loss"]]
    if failed:
        print(f"demo FAILED: the training loss did not fall for {', '.join(failed)}")
        return 1
    return 0
