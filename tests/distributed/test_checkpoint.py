"""Distributed checkpoints: bitwise resume, resharding across layouts, atomic commit (real gloo ranks)."""

import signal

from tests.distributed.cases import full_params, layout, max_diff, step_losses, tiny_config


def interrupted_vs_uninterrupted(run_dir, save_layout, load_layout, steps, cut, params=full_params):
    """Train `steps` straight through; separately train `cut` steps, save, rebuild under `load_layout`,
    resume, and train the rest. Return both loss curves and final parameters (gathered by `params`)."""
    from meshtune.runtime.run import build_trainer

    straight = build_trainer(tiny_config(f"{run_dir}/straight", *save_layout))
    ref_losses = step_losses(straight, steps)
    first = build_trainer(tiny_config(f"{run_dir}/cut", *save_layout))
    losses = step_losses(first, cut)
    first.save()
    resumed = build_trainer(tiny_config(f"{run_dir}/cut", *load_layout, "checkpoint.resume=auto"))
    start = resumed.step
    losses += step_losses(resumed, steps - cut)
    return {"start": start, "losses": losses, "ref_losses": ref_losses,
            "param_diff": max_diff(params(resumed.model), params(straight.model)),
            "lr": resumed.scheduler.get_last_lr()[0], "ref_lr": straight.scheduler.get_last_lr()[0]}


def test_resume_is_bitwise_identical(rank_pool, tmp_path):
    fsdp = layout(1, 2, 2)
    for r in rank_pool(2).run(interrupted_vs_uninterrupted, str(tmp_path), fsdp, fsdp, 6, 3):
        assert r["start"] == 3
        assert r["losses"] == r["ref_losses"]  # same data order, same state: bitwise
        assert r["param_diff"] == 0.0
        assert r["lr"] == r["ref_lr"]


def test_reshard_fsdp_to_ddp(rank_pool, tmp_path):
    """Saved with dp_shard=2, resumed with DDP (dp_replicate=2): DCP reshards params and AdamW state."""
    for r in rank_pool(2).run(interrupted_vs_uninterrupted, str(tmp_path), layout(1, 2, 4), layout(2, 1, 4), 6, 3):
        assert r["start"] == 3
        assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"], strict=True)) < 1e-5, r
        assert r["param_diff"] < 1e-5, r


def save_fsdp_checkpoint(run_dir):
    from meshtune.runtime.run import build_trainer

    trainer = build_trainer(tiny_config(run_dir, *layout(1, 2, 4)))
    step_losses(trainer, 2)
    trainer.save()
    return full_params(trainer.model)


def test_reshard_fsdp_to_single_process(rank_pool, tmp_path):
    """Saved by 2 FSDP ranks; this test process alone (world size 1) resumes it with the same weights."""
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer

    saved = rank_pool(2).run(save_fsdp_checkpoint, str(tmp_path))[0]
    alone = build_trainer(tiny_config(str(tmp_path), *layout(1, 1, 8), "checkpoint.resume=auto"), DistEnv())
    assert alone.step == 2
    assert max_diff(full_params(alone.model), saved) == 0.0
    assert alone.sampler.state_dict()["consumed"] == 2 * 8


def stop_on_one_rank_then_resume(run_dir):
    """A signal reaches rank 1 only, during step 2: both ranks stop after step 2 with a checkpoint, and the
    resumed run ends bitwise where an uninterrupted one does."""
    import os
    import signal

    from meshtune.cli.train import _StopSignals
    from meshtune.runtime.run import build_trainer

    overrides = [*layout(1, 2, 4), "train.steps=4"]
    straight = build_trainer(tiny_config(f"{run_dir}/straight", *overrides)).fit()
    trainer = build_trainer(tiny_config(f"{run_dir}/cut", *overrides))
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    _StopSignals().attach(trainer)
    try:
        if trainer.mesh.rank == 1:
            trainer.train_step = _signal_during_step(trainer.train_step, trainer, at=2)
        first = trainer.fit()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    resumed = build_trainer(tiny_config(f"{run_dir}/cut", *overrides, "checkpoint.resume=auto"))
    start = resumed.step
    rest = resumed.fit()
    losses = [r["loss"] for r in first["history"] + rest["history"] if "loss" in r]
    return {"stopped": first["stopped"], "stop_step": first["step"], "start": start, "signal": trainer.stop_signal,
            "losses": losses, "ref": [r["loss"] for r in straight["history"] if "loss" in r],
            "pid": os.getpid()}


def _signal_during_step(step_fn, trainer, at):
    def wrapped(micro):
        out = step_fn(micro)
        if trainer.step == at:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGUSR1)  # delivered to this rank's handler only
        return out

    return wrapped


def test_signal_on_one_rank_stops_all_with_a_checkpoint(rank_pool, tmp_path):
    for r in rank_pool(2).run(stop_on_one_rank_then_resume, str(tmp_path)):
        assert r["stopped"] and r["stop_step"] == 2 and r["start"] == 2
        assert r["signal"] == signal.SIGUSR1  # rank 0 knows the signal only rank 1 received
        assert r["losses"] == r["ref"]  # the interrupted-and-resumed curve is the uninterrupted one
    assert (tmp_path / "cut" / "checkpoints" / "step_000002" / "meta.json").is_file()  # saved by the stop
