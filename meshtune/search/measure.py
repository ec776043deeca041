"""A search candidate's program measured against the dense run's program, with `meshtune.measure`.

Accuracy and loss: the program's own, teacher-forced on the run's held-out split (`data.num_eval` examples).
Speed: prefill of a (1, PROMPT_LEN) prompt and batch-1 decode tokens/s on one thread, the candidate and the dense
program taking turns in the same call, so their ratio holds however loaded the machine is while a long search
runs. Both raw figures and the ratios are stored; the latency axis is the paired ratio times the dense program's
median ms over all its measurements (`pareto.dense_ms`), the raw figure beside it (`decode_ms_raw`).
"""

from __future__ import annotations

import json
from pathlib import Path

PROMPT_LEN, NEW_TOKENS = 16, 24


def _eval_split(run_dir: str):
    """The run's held-out split (its init_from need not exist any more)."""
    from meshtune.measure import eval_split
    from meshtune.schema import load_config

    return eval_split(load_config(str(Path(run_dir) / "config.yaml"), ["init_from="]))


def _shape(pte: Path) -> tuple[int, int, int]:
    """(vocabulary, prompt length, decode steps) that fit the program's KV cache."""
    meta = json.loads(pte.with_name("model.json").read_text())
    cache = meta["max_seq_len"]
    prompt = min(PROMPT_LEN, cache // 2)
    return meta["vocab_size"], prompt, min(NEW_TOKENS, cache - prompt - 1)


def _timed(s, steps: dict, pte: Path) -> dict:
    from meshtune.measure import speeds

    vocab, prompt, new = _shape(pte)
    return speeds(steps, prompt, new, vocab, s.reps)


def measure_dense(s, pte: Path) -> dict:
    """The dense program's figures (its ratios are 1)."""
    from meshtune.measure import evaluate_step, one_thread, program_step

    with one_thread():  # before loading: ExecuTorch's threadpool cannot be resized under a loaded program
        step = program_step(pte)
        accuracy, loss = evaluate_step(step, _eval_split(s.run_dir))
        prefill, tps = _timed(s, {"dense": step}, pte)["dense"]
    size = pte.stat().st_size
    return {"pte": str(pte), "pte_size": size, "accuracy": accuracy, "loss": loss, "prefill_s": prefill,
            "decode_tps": tps, "decode_ms_raw": 1e3 / tps, "dense_prefill_s": prefill,
            "dense_decode_tps": tps, "size_ratio": 1.0, "prefill_speedup": 1.0, "decode_speedup": 1.0,
            "decode_time_ratio": 1.0}


def measure_pair(s, dense_pte: Path, pte: Path, dense: dict) -> dict:
    """A candidate's figures, timed in turns with the dense program; `dense` is the dense run's results line."""
    from meshtune.measure import evaluate_step, one_thread, program_step

    with one_thread():
        steps = {"dense": program_step(dense_pte), "candidate": program_step(pte)}
        accuracy, loss = evaluate_step(steps["candidate"], _eval_split(s.run_dir))
        got = _timed(s, steps, dense_pte)
    (prefill, tps), (d_prefill, d_tps) = got["candidate"], got["dense"]
    size = pte.stat().st_size
    return {"pte": str(pte), "pte_size": size, "accuracy": accuracy, "loss": loss, "prefill_s": prefill,
            "decode_tps": tps, "decode_ms_raw": 1e3 / tps,
            "dense_prefill_s": d_prefill, "dense_decode_tps": d_tps, "size_ratio": size / dense["pte_size"],
            "prefill_speedup": d_prefill / prefill, "decode_speedup": tps / d_tps, "decode_time_ratio": d_tps / tps}
