"""Surviving faults: kill-and-resume, kill during a checkpoint save, hangs and signals, on 2 CPU ranks.

    python bench/bench_faults.py                          # ~20-30 min on 2 busy cores: all four, counts printed
    python bench/bench_faults.py --kills 3 --save-kills 2 --hangs 1 --signals 1     # quicker

Targets (issue "Launching at scale"):
  * kill-and-resume: 10 runs, each with one worker SIGKILLed at a random step under `meshtune launch
    --max-restarts 1`; torchrun restarts the group and `checkpoint.resume: auto` continues. Counted: runs that
    finish with a final loss identical (==) to the uninterrupted run's.
  * kill during a checkpoint save: 10 runs; rank 0 is held inside Checkpointer.save (tests/infra/faultinject:
    shards written but no meta.json, or meta.json written but not yet renamed) and SIGKILLed there; the
    restarted run must resume from the previous complete checkpoint (not the torn one) and finish with the
    uninterrupted final loss.
  * hang: rank 1 or rank 0 (the host of the job's store) frozen with SIGSTOP, or rank 1 sleeping before a
    collective (injected), with parallel.timeout_s=T. Measured: seconds from the fault to meshtune's message
    naming rank and operation, and to the job's exit, against T + 10 s.
  * signals: SIGTERM to the launcher, SIGINT to its process group (Ctrl-C), SIGUSR1 to torchrun, SIGTERM to
    rank 1. Counted: jobs that exit 75 with one checkpoint, at the step they stopped.
Every run is `meshtune launch pretrain/tiny --nproc-per-node 2` (FSDP2 over 2 ranks), logging every step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAULTS = REPO / "tests" / "infra" / "faultinject"


def launch(run_dir: Path, overrides: list[str], env: dict[str, str] | None = None,
           restarts: int = 1) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    full["PYTHONPATH"] = os.pathsep.join([str(FAULTS), str(REPO)])
    full.update(env or {})
    argv = [sys.executable, "-m", "meshtune", "launch", "pretrain/tiny", "--nproc-per-node", "2",
            "--max-restarts", str(restarts), f"run_dir={run_dir}", "train.log_every=1", "train.eval_every=0",
            "data.num_train=512", "metrics.progress=false", *overrides]
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")  # noqa: SIM115 (the child holds it)
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=full, start_new_session=True)


def output(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.log").read_text(errors="replace")


def workers(launcher: int) -> list[int]:
    def children(pid: int) -> list[int]:
        r = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
        return [int(x) for x in r.stdout.split()]

    return sorted(w for t in children(launcher) for w in children(t))


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def wait(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        ranks = workers(proc.pid)  # torchrun starts them in sessions of their own
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        return None


def until(ready, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return True
        time.sleep(0.05)
    return False


def kill_random_worker(proc: subprocess.Popen, rng: random.Random) -> int:
    ranks = workers(proc.pid)
    victim = rng.randrange(len(ranks))
    os.kill(ranks[victim], signal.SIGKILL)
    return victim


def kill_and_resume(tmp: Path, n: int, steps: int, every: int, ref: float, rng: random.Random) -> list[str]:
    rows = []
    for i in range(n):
        run_dir = tmp / f"kill{i}"
        at = rng.randint(2, steps - 2)
        proc = launch(run_dir, [f"train.steps={steps}", f"checkpoint.every={every}"])
        reached = until(lambda d=run_dir, k=at: max(losses(d), default=0) >= k, proc, 300)
        victim = kill_random_worker(proc, rng) if reached else None
        t0 = time.monotonic()
        code = wait(proc, 300)
        final = losses(run_dir).get(steps)
        m = re.search(r"resumed from \S+ at step (\d+)", output(run_dir))
        ok = code == 0 and final == ref and victim is not None
        rows.append(f"kill {i}: SIGKILL rank {victim} after step {at}; restart resumed at step "
                    f"{m.group(1) if m else 'none (from scratch)'}; exit {code} {time.monotonic() - t0:.1f} s later; "
                    f"final loss {final!r} {'==' if final == ref else '!='} reference -> {'OK' if ok else 'FAIL'}")
        print(rows[-1], flush=True)
    return rows


def kill_in_save(tmp: Path, n: int, steps: int, every: int, ref: float, rng: random.Random) -> list[str]:
    rows = []
    for i in range(n):
        run_dir = tmp / f"save{i}"
        save_step = rng.choice(range(2 * every, steps, every))
        point = rng.choice(["meta", "rename"])
        mark = tmp / f"save{i}.mark"
        proc = launch(run_dir, [f"train.steps={steps}", f"checkpoint.every={every}"],
                      {"MESHTUNE_FAULT": f"save:{point}:{save_step}", "MESHTUNE_FAULT_MARK": str(mark)})
        reached = until(mark.exists, proc, 300)
        torn = (run_dir / "checkpoints" / f"step_{save_step:06d}.tmp").is_dir()
        victim = None
        if reached:  # rank 0 is the one inside the save (it writes meta.json and renames): kill it there
            os.kill(workers(proc.pid)[0], signal.SIGKILL)
            victim = 0
        code = wait(proc, 300)
        final = losses(run_dir).get(steps)
        m = re.search(r"resumed from \S+ at step (\d+)", output(run_dir))
        resumed = int(m.group(1)) if m else None
        ok = (code == 0 and torn and victim is not None and resumed == save_step - every and final == ref)
        rows.append(f"save-kill {i}: rank 0 held in save of step {save_step} ({point}: step_{save_step:06d}.tmp "
                    f"{'present' if torn else 'MISSING'}), SIGKILL rank {victim}; resumed at step {resumed} "
                    f"(want {save_step - every}); exit {code}; final loss {'==' if final == ref else '!='} "
                    f"reference -> {'OK' if ok else 'FAIL'}")
        print(rows[-1], flush=True)
    return rows


def hang(tmp: Path, n: int, timeout_s: float) -> list[tuple[str, float | None, float | None]]:
    rows = []
    for i in range(n):
        for kind in ("sigstop", "sigstop0", "sleep"):
            run_dir = tmp / f"hang{i}{kind}"
            mark = tmp / f"hang{i}.mark"
            env = {"MESHTUNE_FAULT": "hang:1:4", "MESHTUNE_FAULT_MARK": str(mark)} if kind == "sleep" else {}
            proc = launch(run_dir, ["train.steps=100000", "checkpoint.every=0", f"parallel.timeout_s={timeout_s}"],
                          env, restarts=0)  # the job must fail, not restart
            if kind.startswith("sigstop"):  # rank 1, or rank 0 (the host of the job's store)
                until(lambda d=run_dir: max(losses(d), default=0) >= 3, proc, 300)
                ranks = workers(proc.pid)
                os.kill(ranks[0 if kind == "sigstop0" else 1], signal.SIGSTOP)
            else:
                until(mark.exists, proc, 300)
            t0 = time.monotonic()
            seen = None
            while proc.poll() is None and time.monotonic() - t0 < 120:
                if seen is None and re.search(r"^meshtune: rank \d (stuck in|failed at)", output(run_dir), re.M):
                    seen = time.monotonic() - t0
                time.sleep(0.05)
            done = time.monotonic() - t0 if proc.poll() is not None else None
            wait(proc, 1)
            if kind.startswith("sigstop"):
                for pid in ranks:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            text = output(run_dir)
            if seen is None and re.search(r"^meshtune: rank \d (stuck in|failed at)", text, re.M):
                seen = done
            lines = [ln for ln in text.splitlines() if ln.startswith("meshtune: ")]
            rows.append((kind, seen, done))
            print(f"hang {i} ({kind}): message after {seen if seen is None else round(seen, 2)} s, job exit after "
                  f"{done if done is None else round(done, 2)} s (timeout_s={timeout_s}, target <= "
                  f"{timeout_s + 10})", flush=True)
            for ln in lines:
                print("    " + ln[:200], flush=True)
    return rows


SIGNAL_TARGETS = [("launcher", "SIGTERM"), ("launcher group", "SIGINT"), ("torchrun", "SIGUSR1"),
                  ("rank 1", "SIGTERM")]


def signals(tmp: Path, n: int) -> list[str]:
    """A signal to the launcher, its process group (Ctrl-C), torchrun or one rank: OK when the job exits 75
    (exit_codes.STOPPED) with one checkpoint, at the step the metrics say it stopped."""
    rows = []
    for i in range(n):
        for target, name in SIGNAL_TARGETS:
            run_dir = tmp / f"signal{i}{target.replace(' ', '')}"
            proc = launch(run_dir, ["train.steps=100000", "checkpoint.every=0"], restarts=0)
            until(lambda d=run_dir: max(losses(d), default=0) >= 3, proc, 300)
            sig, ranks = getattr(signal, name), workers(proc.pid)
            if target == "launcher":
                os.kill(proc.pid, sig)
            elif target == "launcher group":
                os.killpg(proc.pid, sig)
            elif target == "torchrun":
                torchrun = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
                os.kill(int(torchrun.stdout.split()[0]), sig)
            else:
                os.kill(ranks[1], sig)
            t0 = time.monotonic()
            code = wait(proc, 120)
            took = time.monotonic() - t0
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            stops = [r["step"] for r in records if r.get("event") == "stopped"]
            ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
            ok = code == 75 and len(stops) == 1 and ckpts == [f"step_{stops[0]:06d}"]
            rows.append(f"signal {i}: {name} to the {target}: exit {code} after {took:.1f} s, stopped at step(s) "
                        f"{stops}, checkpoints {ckpts} -> {'OK' if ok else 'FAIL'}")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--save-kills", type=int, default=10)
    p.add_argument("--hangs", type=int, default=2, help="trials of each hang kind")
    p.add_argument("--signals", type=int, default=2, help="trials of each signal target")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--every", type=int, default=4, help="checkpoint.every")
    p.add_argument("--timeout-s", type=float, default=5.0, help="parallel.timeout_s for the hang trials")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    args = p.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="bench_faults_"))
    t_start = time.monotonic()
    try:
        summary = []
        if args.kills or args.save_kills:
            ref_dir = tmp / "reference"
            proc = launch(ref_dir, [f"train.steps={args.steps}", f"checkpoint.every={args.every}"])
            assert wait(proc, 300) == 0, output(ref_dir)[-3000:]
            ref = losses(ref_dir)[args.steps]
            print(f"uninterrupted run: final loss at step {args.steps} = {ref!r}", flush=True)
        if args.kills:
            rows = kill_and_resume(tmp, args.kills, args.steps, args.every, ref, rng)
            summary.append(f"kill-and-resume: {sum(r.endswith('OK') for r in rows)} of {len(rows)} runs finish with "
                           "the uninterrupted final loss (==)")
        if args.save_kills:
            rows = kill_in_save(tmp, args.save_kills, args.steps, args.every, ref, rng)
            summary.append(f"kill during save: {sum(r.endswith('OK') for r in rows)} of {len(rows)} resume from the "
                           "last complete checkpoint and finish with the uninterrupted final loss")
        if args.hangs:
            rows = hang(tmp, args.hangs, args.timeout_s)
            for kind in ("sigstop", "sigstop0", "sleep"):
                got = [r for r in rows if r[0] == kind]
                within = sum(d is not None and d <= args.timeout_s + 10 for _, _, d in got)
                msgs = [round(s, 2) for _, s, _ in got if s is not None]
                exits = [round(d, 2) for _, _, d in got if d is not None]
                summary.append(f"hang ({kind}, timeout_s={args.timeout_s}): message after {msgs} s, job exit after "
                               f"{exits} s; {within} of {len(got)} exit within timeout_s + 10 s")
        if args.signals:
            rows = signals(tmp, args.signals)
            summary.append(f"signals: {sum(r.endswith('OK') for r in rows)} of {len(rows)} end with exit 75 and one "
                           "checkpoint at the stop step")
        print(f"\n== summary ({time.monotonic() - t_start:.0f} s) ==")
        print("\n".join(summary))
    finally:
        if args.keep:
            print(f"run directories kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
