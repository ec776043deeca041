"""No checkpoint runs code when opened (meshtune.artifacts.safe): a canary pickle through every entry point.

The payload, if it ran, would create the canary file. Every entry point must refuse it with a one-line
ConfigError naming the file, and leave the canary absent."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from meshtune.config import ConfigError
from meshtune.runtime.env import DistEnv
from meshtune.runtime.run import build_trainer
from tests.distributed.cases import tiny_config


class Payload:
    """Unpickling this calls exec: the canary file appears if any loader runs it."""

    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return (exec, (f"open({self.canary!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("safe")
    build_trainer(tiny_config(str(root / "run"), "train.steps=2", "checkpoint.save_final=true"), DistEnv()).fit()
    return root / "run"


@pytest.fixture
def poisoned(trained, tmp_path):
    """A copy of the trained run whose checkpoint's DCP .metadata is the payload; (run dir, step dir, canary)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    step = next((run / "checkpoints").iterdir())
    canary = tmp_path / "canary"
    (step / ".metadata").write_bytes(pickle.dumps(Payload(canary)))
    return run, step, canary


def refused(call, file: Path, canary: Path) -> str:
    with pytest.raises(ConfigError) as info:
        call()
    msg = str(info.value)
    assert str(file) in msg and "refused to load" in msg and "\n" not in msg, msg
    assert not canary.exists(), "the payload ran"
    return msg


def test_init_from_a_step_folder(poisoned, tmp_path):
    run, step, canary = poisoned
    refused(lambda: build_trainer(tiny_config(str(tmp_path / "new"), f"init_from={step}"), DistEnv()),
            step / ".metadata", canary)


@pytest.mark.parametrize("resume", ["auto", "path"])
def test_resume(poisoned, resume):
    run, step, canary = poisoned
    value = "auto" if resume == "auto" else str(step)
    refused(lambda: build_trainer(tiny_config(str(run), f"checkpoint.resume={value}"), DistEnv()),
            step / ".metadata", canary)


def test_export(poisoned):
    from meshtune.export import export

    run, step, canary = poisoned
    refused(lambda: export(run, "merged", quiet=True), step / ".metadata", canary)


def test_serve_and_distill_data_teacher(poisoned):
    from meshtune.distill_data import LocalTeacher
    from meshtune.serve import CompletionModel

    run, step, canary = poisoned
    refused(lambda: CompletionModel(str(run)), step / ".metadata", canary)
    refused(lambda: LocalTeacher(str(step)), step / ".metadata", canary)


def test_distillation_teacher(poisoned, tmp_path):
    run, step, canary = poisoned
    cfg = tiny_config(str(tmp_path / "student"), "recipe.name=distill", f"recipe.distill.teacher={run}")
    refused(lambda: build_trainer(cfg, DistEnv()), step / ".metadata", canary)


def test_payload_in_a_non_tensor_value(trained, tmp_path):
    """DCP stores optimizer hyperparameters as torch.save bytes and torch's own planner reads them with
    weights_only=False: a checkpoint whose `lr` is the payload."""
    import torch.distributed.checkpoint as dcp

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    step = next((run / "checkpoints").iterdir())
    trainer = build_trainer(tiny_config(str(tmp_path / "other"), "checkpoint.resume=never"), DistEnv())
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    canary = tmp_path / "canary"
    optim_sd["param_groups"][0]["lr"] = Payload(canary)
    for f in step.glob("*.distcp"):
        f.unlink()
    (step / ".metadata").unlink()
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(step))
    assert not canary.exists()
    msg = refused(lambda: build_trainer(tiny_config(str(run), "checkpoint.resume=auto"), DistEnv()),
                  Path("optim.param_groups.0.lr"), canary)
    assert "optim.param_groups.0.lr" in msg


def test_payload_in_a_torch_file(trained, tmp_path):
    """rng/rank0.pt of a checkpoint, a quantized export, a weights file: torch.load(weights_only=True)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    step = next((run / "checkpoints").iterdir())
    canary = tmp_path / "canary"
    rng = step / "rng" / "rank0.pt"
    torch.save({"cpu": Payload(canary)}, rng)
    refused(lambda: build_trainer(tiny_config(str(run), "checkpoint.resume=auto"), DistEnv()), rng, canary)
    from meshtune.serve import CompletionModel

    fake_export = tmp_path / "model_quantized.pt"
    torch.save({"meshtune": Payload(canary), "quantized": {}}, fake_export)
    refused(lambda: CompletionModel(str(fake_export)), fake_export, canary)
