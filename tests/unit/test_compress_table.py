"""The demo's compression table (meshtune.compress_table) on tiny in-process runs and their real exports."""

from __future__ import annotations

import pytest
import torch

from meshtune.compress_table import Row, eval_split, format_table, latencies, load_artifact, measure
from meshtune.config import ConfigError
from meshtune.export import export
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


def test_rows_measure_the_exported_models(runs):
    rows = [Row(name, path, RUNS[name][1]) for name, (_, path) in runs.items()]
    cfg = runs["teacher"][0].cfg
    measure(rows, eval_split(cfg), cfg.data.seq_len, batch=8, reps=2)
    by = {r.name: r for r in rows}
    for name, (trainer, path) in runs.items():
        r = by[name]
        assert r.size == path.stat().st_size > 0
        assert r.latency_s > 0
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


def test_load_artifact_sparse_equals_the_merged_model(runs, tmp_path):
    trainer, sparse = runs["pruned 50%"]
    (merged,) = export(trainer.cfg.run_dir, "merged", out=tmp_path, quiet=True)
    x = torch.randint(0, 200, (2, 10))
    torch.testing.assert_close(load_artifact(sparse, "sparse")(x), load_artifact(merged, "merged")(x))
    cut = tmp_path / "cut.safetensors"  # a truncated copy: one line naming the file, no traceback
    cut.write_bytes(sparse.read_bytes()[:100])
    with pytest.raises(ConfigError, match=f"{cut} is not a readable safetensors file"):
        load_artifact(cut, "sparse")


def test_latencies_time_every_model_the_same_number_of_times():
    calls = {"a": 0, "b": 0}

    def model(name):
        def fwd(x):
            calls[name] += 1
            return x
        return fwd

    out = latencies({"a": model("a"), "b": model("b")}, torch.zeros(1), reps=3)
    assert set(out) == {"a", "b"} and calls == {"a": 4, "b": 4} and all(v >= 0 for v in out.values())


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
