"""meshtune.measure's timing: medians after a warm-up, the measured things taking turns, decode timed apart from
the prefill, all on a fake clock that moves only when a step runs."""

from __future__ import annotations

import torch

from meshtune import measure


class Clock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_speeds_time_prefill_and_decode_apart_in_turns(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(measure, "time", clock)
    calls = []
    # seconds per call: a prefill (T > 1) and a decode step (T == 1) cost differently per step
    cost = {"a": (2.0 ** -4, 2.0 ** -8), "b": (2.0 ** -5, 2.0 ** -7)}
    vocab = 11

    def step(name):
        def run(tokens, pos):
            assert pos.shape == (tokens.shape[1],) and tokens.shape[0] == 1
            prefill = tokens.shape[1] > 1
            assert prefill == (int(pos[0]) == 0)  # decode continues after the prompt
            clock.now += cost[name][0 if prefill else 1]
            calls.append((name, "p" if prefill else "d"))
            return torch.zeros(1, tokens.shape[1], vocab)
        return run

    got = measure.speeds({"a": step("a"), "b": step("b")}, prompt_len=6, new_tokens=4, vocab=vocab, reps=3)
    assert got == {"a": (2.0 ** -4, 4 / (4 * 2.0 ** -8)), "b": (2.0 ** -5, 4 / (4 * 2.0 ** -7))}
    # warm-ups (a prefill + 4 decodes each), then rounds: timed prefill, then a decode run (prefill + 4 steps)
    turns = [name for name, kind in calls if kind == "p"]
    assert turns == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert len(calls) == 2 * 5 + 3 * 2 * (1 + 5)


def test_one_thread_restores_torch_threads():
    before = torch.get_num_threads()
    with measure.one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
