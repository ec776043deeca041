"""The demo's compression table (meshtune.demo.compress) on tiny in-process runs and their real exports."""

from __future__ import annotations

import pytest
import torch

from meshtune import measure as measure_mod
from meshtune.config import ConfigError
from meshtune.demo.compress import Row, format_table, load_artifact, measure
from meshtune.export import export
from meshtune.measure import eval_split
from meshtune.runtime.env import DistEnv
from meshtune.runtime.run import build_trainer
from tests.distributed.cases import tiny_config

RUNS = {  # name: (overrides, export format)
    "teacher": ([], "merged"),
    "pruned 50%": (["recipe.name=prune", "recipe.prune.sparsity=0.5"], "sparse"),
    "structured": (["recipe.name=prune", "recipe.prune.method=structured", "recipe.prune.sparsity=0.5"], "shrunk"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (trainer after fit, exported file)} of three tiny 4-step runs on sort."""
    root = tmp_path_factory.mktemp("table")
    out = {}
    for name, (overrides, fmt) in RUNS.items():
        run_dir = root / name.split()[0]
        trainer = build_trainer(tiny_config(str(run_dir), "data.task=sort", "train.steps=4", "data.num_eval=20",
                                            "checkpoint.save_final=true", *overrides), DistEnv())
        trainer.fit()
        out[name] = (trainer, export(run_dir, fmt, quiet=True)[0])
    return out


class FakeClock:
    """`perf_counter` for meshtune.measure: time moves only when a model's forward advances it, so a
    latency is exactly what the test made that forward take (powers of two: the sums stay exact)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


# seconds one forward of each model takes on the fake clock
FORWARD_S = {"teacher": 2.0 ** -7, "pruned 50%": 2.0 ** -8, "structured": 2.0 ** -9}


def test_rows_measure_the_exported_models(runs, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(measure_mod, "time", clock)

    def timed_loader(path, fmt):
        model = load_artifact(path, fmt)
        name = next(n for n, (_, p) in runs.items() if p == path)
        model.register_forward_hook(lambda *_: setattr(clock, "now", clock.now + FORWARD_S[name]))
        return model

    rows = [Row(name, path, RUNS[name][1]) for name, (_, path) in runs.items()]
    cfg = runs["teacher"][0].cfg
    measure(rows, eval_split(cfg), cfg.data.seq_len, batch=8, reps=2, loader=timed_loader)
    by = {r.name: r for r in rows}
    for name, (trainer, path) in runs.items():
        r = by[name]
        assert r.size == path.stat().st_size > 0
        assert r.latency_s == FORWARD_S[name]  # each row holds its own model's time, not another's
        ev = trainer.evaluate()  # the trainer's own evaluation of the trained (masked) model: the same numbers
        assert r.accuracy == pytest.approx(ev["eval_accuracy"])
        assert r.eval_loss == pytest.approx(ev["eval_loss"], rel=1e-4)
    teacher, half, shrunk = by["teacher"], by["pruned 50%"], by["structured"]
    assert teacher.nonzero == teacher.params and half.params == teacher.params
    targets = sum(m.weight.numel() for m in runs["pruned 50%"][0].model.modules() if hasattr(m, "weight_mask"))
    assert teacher.params - half.nonzero >= targets // 2  # exactly half of the targets, plus any exact zeros
    assert shrunk.params < teacher.params and shrunk.nonzero == shrunk.params
    assert half.size < teacher.size and shrunk.size < teacher.size
    text = format_table(rows)
    assert all(name in text for name in RUNS) and "1.00" in text.splitlines()[2]
    # ms/fwd and the speedup over the teacher (the first row), from the latencies above
    assert [line.split()[-3:-1] for line in text.splitlines()[2:]] == [["7.8", "1.00x"], ["3.9", "2.00x"],
                                                                       ["2.0", "4.00x"]]


def test_load_artifact_sparse_equals_the_merged_model(runs, tmp_path):
    trainer, sparse = runs["pruned 50%"]
    (merged,) = export(trainer.cfg.run_dir, "merged", out=tmp_path, quiet=True)
    x = torch.randint(0, 200, (2, 10))
    torch.testing.assert_close(load_artifact(sparse, "sparse")(x), load_artifact(merged, "merged")(x))
    cut = tmp_path / "cut.safetensors"  # a truncated copy: one line naming the file, no traceback
    cut.write_bytes(sparse.read_bytes()[:100])
    with pytest.raises(ConfigError, match=f"{cut} is not a readable safetensors file"):
        load_artifact(cut, "sparse")


def test_latencies_are_medians_after_a_warm_up_in_alternating_order(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(measure_mod, "time", clock)
    # seconds of each successive forward: the first is the untimed warm-up (slow on purpose)
    durations = {"a": [100.0, 1.0, 3.0, 2.0], "b": [100.0, 0.5, 0.25, 4.0]}
    order = []

    def model(name):
        def fwd(x):
            clock.now += durations[name][sum(n == name for n in order)]
            order.append(name)
            return x
        return fwd

    out = measure_mod.forward_latencies({"a": model("a"), "b": model("b")}, torch.zeros(1), reps=3)
    assert out == {"a": 2.0, "b": 0.5}  # medians of the three timed forwards; the warm-up is not counted
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-ups, then turns reversed every other round


@pytest.mark.parametrize("scheme", ["int8-int8", "int8-int4"])
def test_quantized_rows_are_real_quantized_models(runs, tmp_path, scheme):
    """PTQ of the teacher run, loaded back with `load_quantized`: smaller, the same parameter count, close
    to (but not exactly) the fp32 model's loss."""
    trainer, merged = runs["teacher"]
    (path,) = export(trainer.cfg.run_dir, "quantized", out=tmp_path, scheme=scheme, quiet=True)
    rows = [Row("fp32", merged, "merged"), Row(scheme, path, "quantized")]
    measure(rows, eval_split(trainer.cfg), trainer.cfg.data.seq_len, batch=8, reps=1)
    fp32, q = rows
    assert q.params == fp32.params and q.size < fp32.size
    assert q.eval_loss != fp32.eval_loss and q.eval_loss == pytest.approx(fp32.eval_loss, rel=0.05)
