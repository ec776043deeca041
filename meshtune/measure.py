"""Deployment measurements of exported models: accuracy, eager latency, and ExecuTorch programs' size, prefill
latency, decode speed and accuracy. One place for the demo's compression table, `meshtune compress-search` and
the benchmarks, so they measure alike.

    acc, loss = evaluate(model, eval_ds)                          # eager, teacher-forced, batched
    step = program_step("runs/x/executorch/model.pte")            # step(tokens (1, T), input_pos (T,)) -> logits
    acc, loss = evaluate_step(step, eval_ds)                      # the program itself, one example at a time
    speeds({"eager": cached_step(model, 64), "program": step}, prompt_len=40, new_tokens=24)

Accuracy is exact match of every target token, teacher-forced as in `Trainer.evaluate` (`eval_counts`). Speed is
measured on one thread (torch's and ExecuTorch's threadpools: `one_thread()`), the measured things taking turns
(order reversed every other round, one warm-up each) so that load on the machine hits all of them alike; the
figures are medians. Prefill: one forward of a (1, prompt_len) prompt from position 0, seconds. Decode: batch-1
greedy steps after that prompt, tokens/s of the decode steps alone (eager models go through the same static KV
cache module the programs are lowered from, `StaticCacheDecoder`, so the comparison is like for like).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tokens (1, T), input_pos (T,)) -> logits (1, T, V)


@contextlib.contextmanager
def one_thread():
    """Run the block on one torch thread (restored after) with ExecuTorch's threadpool, when it is imported, at one
    thread. The threadpool is left at one: resetting it while a loaded program holds it crashes the process
    (measured: a segfault in the next `execute`), so enter this before loading the programs to time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from executorch.extension.pybindings import portable_lib
    except ImportError:
        portable_lib = None
    if portable_lib is not None and portable_lib._threadpool_get_thread_count() != 1:
        portable_lib._unsafe_reset_threadpool(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median_time(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of `fn()` over `reps` calls after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class ProgramStep:
    """The method of a .pte program (a path or its bytes) loaded in the ExecuTorch runtime, called as a Step.

    It keeps the Program alive with its method: the Program holds the bytes the method reads its constants from
    (a method outliving a Program loaded from bytes segfaults)."""

    def __init__(self, pte: str | Path | bytes, method: str = "forward"):
        from meshtune.export.program_decoder import load_runtime_ops

        load_runtime_ops("measuring a program")  # the LLM and quantized-embedding kernels programs call
        from executorch.runtime import Runtime

        self.program = Runtime.get().load_program(pte if isinstance(pte, bytes) else Path(pte))
        self.method = self.program.load_method(method)

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.method.execute([tokens, pos])[0]


program_step = ProgramStep


def cached_step(model: nn.Module, max_seq_len: int) -> Step:
    """An eager model (meshtune's decoder, fp32 or torchao-quantized) behind the static KV cache the programs are
    lowered from: the eager peer of `program_step`."""
    from meshtune.export.static_cache import StaticCacheDecoder

    wrapper = StaticCacheDecoder(model, max_seq_len).eval()
    return lambda tokens, pos: wrapper(tokens, pos)


def prompt_tokens(prompt_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """A (1, prompt_len) random prompt, the same for every measured model."""
    return torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(seed))


def decode_timer(step: Step, prompt: torch.Tensor, n: int) -> Callable[[], float]:
    """A closure: prefill `prompt` (untimed), then n greedy decode steps; returns the seconds of those steps."""
    length = prompt.shape[1]

    def run() -> float:
        logits = step(prompt, torch.arange(length))
        t0 = time.perf_counter()
        for i in range(n):
            logits = step(logits[:, -1:].argmax(-1), torch.tensor([length + i]))
        return time.perf_counter() - t0

    return run


@torch.inference_mode()
def speeds(steps: dict[str, Step], prompt_len: int, new_tokens: int, vocab: int, reps: int = 5
           ) -> dict[str, tuple[float, float]]:
    """{name: (prefill seconds, decode tokens/s)} of each step on one thread, interleaved, medians of `reps`.

    Every step must hold prompt_len + new_tokens positions in its cache."""
    prompt = prompt_tokens(prompt_len, vocab)
    pos = torch.arange(prompt_len)
    prefill: dict[str, list[float]] = {n: [] for n in steps}
    decode: dict[str, list[float]] = {n: [] for n in steps}
    with one_thread():
        for s in steps.values():  # warm-up
            decode_timer(s, prompt, new_tokens)()
        for i in range(reps):
            for name in (list(steps) if i % 2 == 0 else list(steps)[::-1]):
                t0 = time.perf_counter()
                steps[name](prompt, pos)
                prefill[name].append(time.perf_counter() - t0)
                decode[name].append(decode_timer(steps[name], prompt, new_tokens)())
    return {n: (statistics.median(prefill[n]), new_tokens / statistics.median(decode[n])) for n in steps}


def eval_split(cfg):
    """The held-out dataset of a run's config (the same split the trainer evaluates on)."""
    from meshtune.data import build_datasets, build_tokenizer

    return build_datasets(cfg.data, build_tokenizer(cfg.data.tokenizer), cfg.train.seed)[1]


@torch.inference_mode()
def evaluate(model: nn.Module, eval_ds, batch: int = 32) -> tuple[float, float]:
    """(exact-match accuracy, mean token loss) of an eager `model` on `eval_ds`, teacher-forced as in
    Trainer.evaluate."""
    from meshtune.data.datasets import collate

    totals = torch.zeros(4, dtype=torch.float64)
    for start in range(0, len(eval_ds), batch):
        b = collate([eval_ds[i] for i in range(start, min(start + batch, len(eval_ds)))])
        totals += _counts(model(b["input_ids"]), b["labels"])
    return _ratios(totals)


@torch.inference_mode()
def evaluate_step(step: Step, eval_ds) -> tuple[float, float]:
    """(exact-match accuracy, mean token loss) of a Step (a program, one example at a time from position 0) on
    `eval_ds`, teacher-forced: the accuracy of the deployed program itself, not of the model it came from."""
    totals = torch.zeros(4, dtype=torch.float64)
    for i in range(len(eval_ds)):
        ex = eval_ds[i]
        ids, labels = ex["input_ids"][None], ex["labels"][None]
        totals += _counts(step(ids, torch.arange(ids.shape[1])), labels)
    return _ratios(totals)


def _counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from meshtune.runtime.grads import eval_counts

    return eval_counts(logits.float(), labels)


def _ratios(totals: torch.Tensor) -> tuple[float, float]:
    loss, ntok, correct, nseq = totals.tolist()
    return correct / max(nseq, 1), loss / max(ntok, 1)


@torch.inference_mode()
def forward_latencies(models: dict[str, nn.Module], tokens: torch.Tensor, reps: int = 5) -> dict[str, float]:
    """Median seconds of one batched forward of `tokens` per eager model, interleaved as `speeds` does (on the
    threads torch has)."""
    times: dict[str, list[float]] = {n: [] for n in models}
    for m in models.values():
        m(tokens)
    for i in range(reps):
        for n in (list(models) if i % 2 == 0 else list(models)[::-1]):
            start = time.perf_counter()
            models[n](tokens)
            times[n].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}
