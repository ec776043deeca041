"""compress-search without lowering anything: the Pareto front on hand-made points, the search's order and rules,
its results file, and bad input as one line (the search end to end: tests/integration/test_compress_search.py)."""

from __future__ import annotations

import json
import math

import pytest

from meshtune.cli import main
from meshtune.search.pareto import Point, append_result, dominates, front, read_results
from meshtune.search.space import Candidate, grid, order, skipped
from tests.distributed.cases import tiny_config


def names(points):
    return [p.name for p in points]


def test_front_drops_dominated_points_and_is_monotone():
    pts = [Point("dense", 100, 0.90, 0.3), Point("int8", 30, 0.88, 0.4), Point("int4", 18, 0.70, 0.9),
           Point("bad", 50, 0.80, 0.5),  # dearer and worse than int8
           Point("mid", 60, 0.89, 0.35)]
    got = front(pts)
    assert names(got) == ["int4", "int8", "mid", "dense"]
    assert all(a.cost < b.cost and a.accuracy < b.accuracy for a, b in zip(got, got[1:], strict=False))
    assert dominates(pts[1], pts[3]) and not dominates(pts[3], pts[1]) and not dominates(pts[0], pts[1])


def test_front_ties():
    # the same cost: the more accurate wins; the same accuracy: the lower loss, else the cheaper
    assert names(front([Point("a", 10, 0.5, 1.0), Point("b", 10, 0.6, 1.0)])) == ["b"]
    assert names(front([Point("a", 10, 0.5, 1.0), Point("b", 10, 0.5, 0.9)])) == ["b"]
    assert names(front([Point("a", 10, 0.5, 1.0), Point("b", 12, 0.5, 1.0)])) == ["a"]
    # the same accuracy, a dearer point with a lower loss stays: it is better in the tie-break
    assert names(front([Point("a", 10, 0.5, 1.0), Point("b", 12, 0.5, 0.8)])) == ["a", "b"]
    # exact duplicates: the first listed
    assert names(front([Point("a", 10, 0.5, 1.0), Point("b", 10, 0.5, 1.0)])) == ["a"]
    assert not dominates(Point("a", 10, 0.5, 1.0), Point("b", 10, 0.5, 1.0))
    # failed measurements are no points
    assert names(front([Point("a", math.nan, 0.9), Point("b", 5, math.nan), Point("c", 7, 0.1)])) == ["c"]
    assert front([]) == []


def test_order_covers_the_grid_once_without_the_dense_run():
    for kind in ("size", "latency", "speedup"):
        got = order(kind)
        assert len(got) == len(set(got)) == len(grid()) - 1 and Candidate() not in got
    assert order("size")[0] == Candidate(scheme="int8-int8")
    assert order("latency")[0] == Candidate(0.5, distill=True)
    # structured and unstructured pruning are one recipe: never both in one candidate
    assert all(not (c.structured and c.unstructured) for c in grid())
    assert {c.id for c in grid()} >= {"dense-fp32", "dense-int8", "struct50-kd-int4", "2of4-fp32", "mag50-kd-int8"}


def test_candidates_share_a_fine_tune_across_ptq_schemes_but_not_across_qat():
    pruned = [Candidate(0.5, scheme=s, distill=True) for s in ("fp32", "int8-int8", "int8-int4")]
    assert {c.train_key for c in pruned} == {"struct50-kd-fp32"} and not any(c.qat for c in pruned)
    assert Candidate(scheme="int8-int8").train_key != Candidate(scheme="int8-int4").train_key


def line(c: Candidate, **figures) -> dict:
    return {"id": c.id, **c.fields(), "status": "ok", **figures}


def test_rule_2_skips_what_compresses_further_once_the_target_is_met():
    met = line(Candidate(0.25, scheme="int8-int8", distill=True), pte_size=100)
    meets = lambda r: r["pte_size"] <= 120  # noqa: E731
    assert "rule 2" in skipped(Candidate(0.5, scheme="int8-int4", distill=True), [met], meets)
    assert "rule 2" in skipped(Candidate(0.25, scheme="int8-int4", distill=True), [met], meets)
    # less compressed on one axis, or another pruning kind / distillation: still tried
    assert skipped(Candidate(0.5, scheme="fp32", distill=True), [met], meets) is None
    assert skipped(Candidate(0.5, scheme="int8-int4"), [met], meets) is None
    assert skipped(Candidate(0.5, scheme="int8-int4", distill=True), [met], lambda r: False) is None
    # the dense run meeting the target stops nothing: the search maps the front below it
    assert skipped(Candidate(scheme="int8-int8"), [line(Candidate(), pte_size=100)], meets) is None


def test_rule_3_drops_unstructured_once_one_showed_no_gain():
    flat = line(Candidate(unstructured="2:4"), size_ratio=1.0, decode_speedup=1.02)
    assert "rule 3" in skipped(Candidate(unstructured="magnitude", scheme="int8-int8"), [flat], lambda r: False)
    assert skipped(Candidate(0.5), [flat], lambda r: False) is None
    smaller = line(Candidate(unstructured="2:4"), size_ratio=0.6, decode_speedup=1.0)
    assert skipped(Candidate(unstructured="magnitude"), [smaller], lambda r: False) is None


def test_results_keep_the_newest_line_per_candidate_and_survive_a_cut_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    append_result(path, {"id": "a", "status": "failed"})
    append_result(path, {"id": "b", "status": "ok"})
    append_result(path, {"id": "a", "status": "ok"})
    with path.open("a") as f:
        f.write('{"id": "c", "sta')  # killed while writing
    assert [(r["id"], r["status"]) for r in read_results(path)] == [("a", "ok"), ("b", "ok")]
    path.write_text('{"id": "a"\n{"id": "b", "status": "ok"}\n')
    with pytest.raises(Exception, match="line 1 is not JSON"):
        read_results(path)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A run dir with its config.yaml but no checkpoint (stopped before saving)."""
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer

    run = tmp_path_factory.mktemp("untrained") / "run"
    build_trainer(tiny_config(str(run), "train.steps=1"), DistEnv()).fit()
    return run


def one_line_error(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("meshtune: error:"), err
    for w in words:
        assert w in err, err


def test_bad_input_is_one_line(untrained, tmp_path, capsys):
    cmd = ["compress-search", str(untrained), "--out", str(tmp_path / "s"), "--budget"]
    one_line_error(capsys, ["compress-search", str(tmp_path / "nope"), "--out", str(tmp_path), "--budget", "2"],
                   "no such run directory")
    one_line_error(capsys, [*cmd, "2"], "no complete checkpoint")
    one_line_error(capsys, [*cmd, "0"], "--budget")
    one_line_error(capsys, [*cmd, "2", "--steps", "0"], "--steps")
    one_line_error(capsys, [*cmd, "2", "--target-size", "1MB", "--target-latency", "3"], "give one target")
    one_line_error(capsys, [*cmd, "2", "--target-size", "big"], "--target-size", "600KB")
    one_line_error(capsys, [*cmd, "2", "--target-speedup", "-1"], "--target-speedup")
    assert not (tmp_path / "s").exists()  # nothing was written for bad input


def test_an_existing_search_needs_resume_and_the_same_settings(tmp_path, capsys, monkeypatch):
    # the run's own checks pass; the search dir is made by hand
    monkeypatch.setattr("meshtune.artifacts.find_checkpoint", lambda *a, **k: None)
    monkeypatch.setattr("meshtune.artifacts.run_config", lambda *a, **k: None)
    out = tmp_path / "s"
    out.mkdir()
    (out / "search.json").write_text(json.dumps({"run_dir": str((tmp_path / "run").resolve()), "steps": 40}))
    cmd = ["compress-search", str(tmp_path / "run"), "--out", str(out), "--budget", "2"]
    one_line_error(capsys, cmd, "--resume")
    one_line_error(capsys, [*cmd, "--resume", "--steps", "10"], "steps=40, not 10")


def test_latency_axis_is_the_paired_ratio_times_the_dense_programs_median():
    from meshtune.search.pareto import cost_of, points_of

    records = [{"id": "dense-fp32", "status": "ok", "accuracy": 0.9, "dense_decode_tps": 250.0,
                "decode_time_ratio": 1.0, "pte_size": 100},  # measured once under load: 4 ms
               {"id": "a", "status": "ok", "accuracy": 0.8, "dense_decode_tps": 1000.0, "decode_time_ratio": 0.5,
                "pte_size": 50},
               {"id": "b", "status": "ok", "accuracy": 0.7, "dense_decode_tps": 500.0, "decode_time_ratio": 0.25,
                "pte_size": 40},
               {"id": "c", "status": "failed"}]
    assert cost_of(records[1], "latency", records) == 0.5 * 2.0  # median of 4, 1 and 2 ms
    assert cost_of(records[2], "speedup", records) == 0.25 and math.isnan(cost_of(records[3], "size", records))
    assert [p.cost for p in points_of(records, "latency")] == [2.0, 1.0, 0.5]
