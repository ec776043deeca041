"""Checkpoint commit, retention and loading from outside, in one process (world size 1)."""

import os
import pickle

import pytest
import torch

from meshtune.config import ConfigError
from meshtune.export import save_safetensors
from meshtune.runtime.checkpoint import complete_checkpoints
from meshtune.runtime.env import DistEnv
from meshtune.runtime.run import build_trainer
from tests.distributed.cases import full_params, max_diff, step_losses, tiny_config


def _trainer(run_dir, *overrides):
    return build_trainer(tiny_config(str(run_dir), "parallel.dp_shard=1", *overrides), DistEnv())


def test_crash_mid_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    step_losses(trainer, 2)
    trainer.save()
    good = tmp_path / "checkpoints" / "step_000002"
    step_losses(trainer, 2)

    import meshtune.runtime.checkpoint as ckpt

    def crash(state, checkpoint_id, **kwargs):
        (ckpt.Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.dcp, "save", crash)
    with pytest.raises(ckpt.CheckpointWriteError) as failed:
        trainer.save()
    root = tmp_path / "checkpoints"
    assert str(failed.value) == (f"checkpoint: cannot write {root / 'step_000004.tmp'}: disk full; the last "
                                 "complete checkpoint step_000002 is kept")
    assert not (root / "step_000004.tmp").exists()  # the failed attempt is removed (it frees the space)...
    assert complete_checkpoints(root) == [good]  # ...and the last good one kept
    monkeypatch.undo()
    (root / "step_000006.tmp").mkdir()  # what a rank killed mid-save leaves
    resumed = _trainer(tmp_path, "checkpoint.resume=auto")
    assert resumed.step == 2 and not list(root.glob("*.tmp"))  # never picked, removed at start-up

    step_losses(resumed, 2)
    resumed.save()
    assert [p.name for p in complete_checkpoints(root)] == ["step_000002", "step_000004"]


def test_a_save_longer_than_torchrun_grace_period_warns_once(tmp_path, capsys):
    import json

    trainer = _trainer(tmp_path)
    trainer.checkpointer.grace_s = 0.0  # any save is longer than no grace at all
    step_losses(trainer, 1)
    trainer.save()
    trainer.save()
    err = capsys.readouterr().err
    assert err.count("meshtune: warning: a checkpoint save takes ") == 1, err
    assert "longer than the 0 s torchrun waits after a signal" in err and "--grace-period " in err
    meta = json.loads((tmp_path / "checkpoints" / "step_000001" / "meta.json").read_text())
    assert meta["save_s"] >= 0  # read back at a resume, which warns at start


def test_keep_last_retention(tmp_path):
    trainer = _trainer(tmp_path, "checkpoint.keep_last=2")
    for _ in range(4):
        step_losses(trainer, 1)
        trainer.save()
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_000003", "step_000004"]


def test_fit_writes_run_dir_and_resumes(tmp_path):
    run = _trainer(tmp_path, "train.steps=4", "checkpoint.every=2", "train.stop_after=3").fit()
    assert run["step"] == 3
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "metrics.jsonl").is_file()
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_000002", "step_000003"]
    rest = _trainer(tmp_path, "train.steps=4", "checkpoint.every=2", "checkpoint.resume=auto")
    assert rest.step == 3
    assert rest.fit()["step"] == 4


def test_safetensors_round_trip_and_init_from(tmp_path):
    trainer = _trainer(tmp_path / "a")
    step_losses(trainer, 2)
    path = tmp_path / "model.safetensors"
    save_safetensors(trainer.model.state_dict(), path)
    fresh = _trainer(tmp_path / "b", f"init_from={path}")
    assert max_diff(full_params(fresh.model), full_params(trainer.model)) == 0.0


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused(tmp_path):
    evil = tmp_path / "model.pt"
    with evil.open("wb") as f:
        pickle.dump({"tok_embeddings.weight": _Evil()}, f, protocol=2)
    with pytest.raises(ConfigError, match=f"^{evil}: refused to load: .*never unpickles code"):
        _trainer(tmp_path / "run", f"init_from={evil}")


def test_mismatched_weights_name_the_field(tmp_path):
    bad = tmp_path / "small.pt"
    torch.save({"tok_embeddings.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ConfigError, match=f"^init_from: {bad} has no weights for "):
        _trainer(tmp_path / "run", f"init_from={bad}")


def test_resume_into_a_different_model_is_a_clear_error(tmp_path):
    trainer = _trainer(tmp_path)
    step_losses(trainer, 1)
    trainer.save()
    with pytest.raises(ConfigError, match="checkpoint.resume: .* does not fit this model"):
        _trainer(tmp_path, "checkpoint.resume=auto", "model.dim=64")
    assert complete_checkpoints(tmp_path / "checkpoints")  # the failed resume touched nothing


def test_init_from_with_a_recipe_refuses_weights_missing_base_blocks(tmp_path):
    """With a recipe active init_from loaded non-strictly: a file without layer 1 loaded silently and left it
    random. Only the recipe's own tensors may be missing now; the LoRA run from a full file still starts."""
    one_layer = _trainer(tmp_path / "small", "model.n_layers=1")
    short = tmp_path / "one_layer.safetensors"
    save_safetensors(one_layer.model.state_dict(), short)
    with pytest.raises(ConfigError, match=rf"^init_from: {short} has no weights for layers\.1\.\S+ and \d+ more"):
        _trainer(tmp_path / "lora", "recipe.name=lora", f"init_from={short}")
    full = _trainer(tmp_path / "full")
    path = tmp_path / "full.safetensors"
    save_safetensors(full.model.state_dict(), path)
    lora = _trainer(tmp_path / "lora2", "recipe.name=lora", f"init_from={path}")
    got = {k: v for k, v in full_params(lora.model).items() if ".lora_" not in k}
    assert max_diff(got, full_params(full.model)) == 0.0
