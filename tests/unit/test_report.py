"""`meshtune report` on real tiny runs: valid PNGs of the expected size, the table holds the runs' numbers, several
runs overlaid, one-line errors; trainable parameter counts of a sharded run equal the unsharded model's."""

import json
import statistics
import struct
from pathlib import Path

import pytest

from meshtune.cli import main
from meshtune.config import ConfigError
from meshtune.report import DPI, FIGSIZE, PLOTS, read_run, wall_time, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train_run(run_dir, *overrides):
    """A few steps of the tiny decoder in this process (world size 1); returns the trainer."""
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer
    from tests.distributed.cases import tiny_config

    trainer = build_trainer(tiny_config(str(run_dir), "parallel.dp_shard=1", "train.steps=4", "train.eval_every=2",
                                        *overrides), DistEnv())
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real runs: full training and LoRA, with their trainers."""
    root = tmp_path_factory.mktemp("runs")
    return {"full": (root / "full", train_run(root / "full")),
            "lora": (root / "lora", train_run(root / "lora", "recipe.name=lora"))}


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def has_color(path, rgb, tol=0.02) -> bool:
    import numpy as np
    from matplotlib.image import imread

    pixels = imread(str(path))[..., :3]
    return bool((np.abs(pixels - np.array(rgb)).max(axis=-1) < tol).any())


def test_report_of_one_run(runs, tmp_path, capsys):
    from meshtune.recipes import count_parameters

    run_dir, trainer = runs["full"]
    report = write_report([run_dir], tmp_path / "out")
    assert report == tmp_path / "out" / "report.md"
    expected = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
    for stem in PLOTS:
        assert png_size(tmp_path / "out" / f"{stem}.png") == expected == (640, 400)
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith(f"| {run_dir.name} |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    recs = records(run_dir)
    train = [r for r in recs if "loss" in r]
    last_eval = [r for r in recs if "eval_loss" in r][-1]
    trainable, total = count_parameters(trainer.model)
    assert trainable == total  # full training
    assert cells[:8] == [run_dir.name, "none", f"{trainable:,}", "100.00", f"{train[-1]['loss']:.4f}",
                         f"{last_eval['eval_loss']:.4f}", f"{last_eval['eval_accuracy']:.3f}", "4"]
    (start,) = [r for r in recs if r.get("event") == "start"]  # one segment, so no sum over resumed ones
    assert all("time" in r for r in recs)
    # what the report computes from the file, not what the clock gave (a 4-step run may well print 0.0)
    assert cells[8] == f"{recs[-1]['time'] - start['time']:.1f}"
    assert len(train) == 4 and cells[9] == f"{statistics.median(r['tokens_per_s'] for r in train):,.0f}"
    for stem in PLOTS:
        assert f"]({stem}.png)" in text
    assert "report.md" in capsys.readouterr().out


def test_two_runs_overlaid(runs, tmp_path):
    (full_dir, _), (lora_dir, lora) = runs["full"], runs["lora"]
    from meshtune.recipes import count_parameters

    single = write_report([full_dir], tmp_path / "one", quiet=True).parent
    both = write_report([full_dir, lora_dir], tmp_path / "two", quiet=True)
    text = both.read_text()
    trainable, total = count_parameters(lora.model)
    assert trainable < total
    assert f"| {lora_dir.name} | lora | {trainable:,} | {100 * trainable / total:.2f} |" in text
    assert f"| {full_dir.name} | none |" in text
    orange = (1.0, 0x7F / 255, 0x0E / 255)  # matplotlib's C1: the second run's line and legend entry
    for stem in ("loss", "eval_accuracy", "lr"):
        assert has_color(both.parent / f"{stem}.png", orange) and not has_color(single / f"{stem}.png", orange)


def test_default_out_dir_and_cli(runs, capsys):
    run_dir, _ = runs["full"]
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report" / "report.md").is_file() and (run_dir / "report" / "loss.png").is_file()


def test_missing_run_dir_or_metrics_is_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope'}: no such run directory"):
        write_report([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tmp_path / 'empty'}: no metrics.jsonl" in err


def test_resumed_run_counts_steps_once_and_sums_wall_time(tmp_path):
    lines = [{"time": 100.0, "step": 0, "event": "start", "trainable_params": 10, "total_params": 40},
             {"time": 110.0, "step": 10, "loss": 2.0, "lr": 1e-3},
             {"time": 112.0, "step": 12, "loss": 1.9, "lr": 1e-3},
             {"time": 500.0, "step": 10, "event": "start", "trainable_params": 10, "total_params": 40},
             {"time": 503.0, "step": 12, "loss": 1.8, "lr": 1e-3},  # redone after resuming from step 10
             {"time": 505.0, "step": 14, "loss": 1.7, "lr": 1e-3},
             {"time": 505.5, "step": 14, "eval_loss": 1.6, "eval_accuracy": 0.25}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + '\n{"time": 506, "st')
    run = read_run(tmp_path)  # the truncated last line of a killed job is skipped
    assert [r["loss"] for r in run.train] == [2.0, 1.8, 1.7]
    assert run.wall_s == pytest.approx(12.0 + 5.5)
    assert wall_time(lines[1:3]) == pytest.approx(2.0)  # no start record: from the first record's time
    report = write_report([tmp_path], quiet=True).read_text()
    assert "| ? | 10 | 25.00 | 1.7000 | 1.6000 | 0.250 | 14 | 17.5 |" in report  # no config.yaml: recipe ?


def count_case(run_dir):
    """Rank 0: the start record of a FSDP2 run (meta init, LoRA) and the counts of the same model unsharded."""
    import torch.distributed as dist

    from meshtune.models import build_model
    from meshtune.recipes import apply_recipes, build_recipes, count_parameters
    from meshtune.runtime.run import build_trainer
    from tests.distributed.cases import tiny_config

    cfg = tiny_config(run_dir, "parallel.dp_shard=2", "train.micro_batch_size=4", "model.init_device=meta",
                      "recipe.name=lora")
    build_trainer(cfg).metrics.close()
    dist.barrier()
    if dist.get_rank() != 0:
        return None
    plain = apply_recipes(build_model(cfg.model, 264), build_recipes(cfg.recipe))
    start = next(r for r in records(Path(run_dir)) if r.get("event") == "start")
    return start, count_parameters(plain)


def test_sharded_run_records_unsharded_counts(rank_pool, tmp_path):
    start, (trainable, total) = rank_pool(2).run(count_case, str(tmp_path))[0]
    assert (start["trainable_params"], start["total_params"], start["world_size"]) == (trainable, total, 2)
    assert 0 < trainable < total


def test_report_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    lines = [{"time": 1.0, "step": 0, "event": "start"}, {"time": 2.0, "step": 1, "loss": 2.0, "lr": 1e-3}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)))
    code = (f"import sys\nfrom meshtune.cli import main\nassert main(['report', {str(tmp_path)!r}]) == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "report" / "loss.png").is_file() and not (tmp_path / "report" / "eval_accuracy.png").exists()
    assert "No run logged `eval_accuracy`" in (tmp_path / "report" / "report.md").read_text()
