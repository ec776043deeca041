"""The search loop: fine-tune, lower and measure candidates one at a time, appending each result as it ends.

    records = search(Settings("runs/tiny", Path("runs/tiny-search"), budget=4, steps=40, kind="size",
                              target=2e6))

Layout of the search dir (`--out`):
    search.json        the run dir, fine-tune steps and target (a resumed search must keep the first two)
    results.jsonl      one line per candidate, written when it ends (measured, or failed with its error)
    runs/<train key>/  each fine-tune (a normal run dir; candidates that differ only in a PTQ scheme share one)
    programs/<id>/     each candidate's ExecuTorch program (`meshtune export RUN --format executorch`)

Resuming (`resume=True`): candidates with a results line are kept; a fine-tune without its final checkpoint is
started again, a finished one is reused; programs without a results line are lowered again. A failure in one
candidate (training, lowering, measuring) is its results line; the search goes on with the next.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from meshtune.config import ConfigError
from meshtune.search.pareto import RESULTS, SETTINGS, append_result, read_results, read_settings, target_cost
from meshtune.search.space import Candidate, order, skipped, train_overrides

DENSE = Candidate()


@dataclass
class Settings:
    """A search's inputs. `budget`: candidates besides the dense run; `steps`: fine-tune steps of each; `kind`:
    size | latency | speedup (the front's axis) and `target` its value (None: no target); `workers`: processes
    lowering programs at once; `reps`: timing rounds; `nproc`: ranks per fine-tune (torchrun when > 1)."""

    run_dir: str
    out: Path
    budget: int
    steps: int = 40
    kind: str = "size"
    target: float | None = None
    nproc: int = 1
    resume: bool = False
    workers: int = 1
    reps: int = 5

    def meets(self, record: dict, records: list[dict]) -> bool:
        from meshtune.search.pareto import cost_of

        return self.target is not None and cost_of(record, self.kind, records) <= target_cost(self.kind, self.target)


def check(s: Settings) -> None:
    """Bad input, before anything runs.

    Raises:
        ConfigError: one line naming the flag or path and the fix.
    """
    from meshtune.artifacts import find_checkpoint, run_config

    if s.budget < 1:
        raise ConfigError(f"--budget: {s.budget}; give the number of candidates to try besides the dense run, >= 1")
    if s.steps < 1:
        raise ConfigError(f"--steps: {s.steps}; give the fine-tune steps of each candidate, >= 1")
    if s.target is not None and s.target <= 0:
        raise ConfigError(f"--target-{s.kind}: {s.target:g}; give a positive value")
    if s.nproc < 1 or s.workers < 1:
        raise ConfigError("--nproc-per-node / --workers: must be >= 1")
    run_config(s.run_dir)  # a run dir with a config.yaml
    find_checkpoint(s.run_dir)  # ... and a complete checkpoint
    before = read_settings(s.out)
    if before is None:
        return
    if not s.resume:
        raise ConfigError(f"--out {s.out}: holds a search already; pass --resume to continue it, or a new --out")
    for key, now in (("run_dir", str(Path(s.run_dir).resolve())), ("steps", s.steps)):
        if before.get(key) != now:
            raise ConfigError(f"--resume: {s.out} searched {key}={before.get(key)}, not {now}; give the same "
                              "run and --steps, or a new --out")


class Lowering:
    """A pool of spawned worker processes lowering programs; rebuilt when a worker dies (e.g. a segfault)."""

    def __init__(self, workers: int):
        self.workers, self.pool = workers, None

    def submit(self, run_dir: Path, out: Path, scheme: str):
        import multiprocessing

        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        from meshtune.export import lower_job

        return self.pool.submit(lower_job, (str(run_dir), str(out), scheme))

    def result(self, future) -> tuple[Path, float]:
        try:
            path, seconds = future.result()
        except BrokenProcessPool:
            self.close()
            raise
        return Path(path), seconds

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


def fine_tune(s: Settings, c: Candidate) -> tuple[Path, float]:
    """The candidate's fine-tune run dir, trained now unless a finished one is there; (dir, seconds trained)."""
    from meshtune.artifacts import find_checkpoint

    run = s.out / "runs" / c.train_key
    try:
        find_checkpoint(run, s.steps)
        return run, 0.0
    except ConfigError:
        shutil.rmtree(run, ignore_errors=True)  # unfinished (interrupted): start it again
    overrides = train_overrides(c, str(Path(s.run_dir).resolve()), s.steps, str(run))
    config = str(Path(s.run_dir) / "config.yaml")
    t0 = time.time()
    if s.nproc > 1:
        from meshtune.launch.torchrun import launch

        code = launch(config, overrides, s.nproc)
        if code != 0:
            raise RuntimeError(f"the fine-tune failed with exit code {code} (its log: {run / 'logs'})")
    else:
        from meshtune.runtime.env import DistEnv
        from meshtune.runtime.run import build_trainer
        from meshtune.schema import load_config

        build_trainer(load_config(config, overrides), DistEnv()).fit()
    return run, time.time() - t0


def failed(c: Candidate, stage: str, error: BaseException, **extra) -> dict:
    text = "".join(traceback.format_exception_only(type(error), error)).strip().splitlines()[-1]
    return {"id": c.id, **c.fields(), "status": "failed", "stage": stage, "error": text, **extra}


def say(message: str) -> None:
    print(message, flush=True)


def search(s: Settings, log=say) -> list[dict]:
    """Run (or resume) the search; returns every results line (the dense run's first).

    Raises:
        ConfigError: for bad input (see `check`), before anything runs.
    """
    from meshtune.search.measure import measure_dense, measure_pair

    check(s)
    s.out.mkdir(parents=True, exist_ok=True)
    if read_settings(s.out) is None:
        (s.out / SETTINGS).write_text(json.dumps({"run_dir": str(Path(s.run_dir).resolve()), "steps": s.steps,
                                                  "kind": s.kind, "target": s.target}, indent=1))
    results = s.out / RESULTS
    records = read_results(results)
    pool = Lowering(s.workers)
    try:
        dense = next((r for r in records if r["id"] == DENSE.id and r["status"] == "ok"), None)
        dense_pte = s.out / "programs" / DENSE.id / "model.pte"
        if dense is None or not dense_pte.is_file():  # the reference every candidate is timed against
            log(f"compress-search: lowering the dense run {s.run_dir} (fp32)")
            dense_pte, lower_s = pool.result(pool.submit(Path(s.run_dir), dense_pte.parent, "fp32"))
            if dense is None:
                dense = {"id": DENSE.id, **DENSE.fields(), "status": "ok", "train_run": str(s.run_dir),
                         "train_s": 0.0, "lower_s": lower_s, **measure_dense(s, dense_pte)}
                append_result(results, dense)
                records = read_results(results)
        tried = [r for r in records if r["id"] != DENSE.id]
        for c in order(s.kind):
            if len(tried) >= s.budget:
                break
            if any(r["id"] == c.id for r in records):
                continue
            why = skipped(c, records, lambda r, now=records: s.meets(r, now))
            if why:
                log(f"compress-search: skip {c.id}: {why}")
                continue
            record = run_candidate(s, c, pool, dense_pte, dense, measure_pair, log)
            append_result(results, record)
            records = read_results(results)
            tried.append(record)
    finally:
        pool.close()
    return records


def run_candidate(s: Settings, c: Candidate, pool: Lowering, dense_pte: Path, dense: dict, measure_pair, log
                  ) -> dict:
    """Fine-tune, lower and measure one candidate: its results line (status failed, with the stage, on an error)."""
    n = f"{c.id} ({'QAT' if c.qat else 'PTQ' if c.scheme != 'fp32' else 'fp32'}; fine-tune {c.train_key})"
    log(f"compress-search: {n}")
    try:
        run, train_s = fine_tune(s, c)
    except Exception as e:  # noqa: BLE001 (one candidate's failure is its results line, not the search's end)
        return failed(c, "fine-tune", e)
    try:
        pte, lower_s = pool.result(pool.submit(run, s.out / "programs" / c.id, c.scheme))
    except Exception as e:  # noqa: BLE001
        return failed(c, "lowering", e, train_run=str(run), train_s=train_s)
    try:
        figures = measure_pair(s, dense_pte, pte, dense)
    except Exception as e:  # noqa: BLE001
        return failed(c, "measuring", e, train_run=str(run), train_s=train_s, lower_s=lower_s)
    return {"id": c.id, **c.fields(), "status": "ok", "train_run": str(run), "train_s": train_s, "lower_s": lower_s,
            **figures}

