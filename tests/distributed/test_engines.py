"""DeepSpeed ZeRO-1/2/3 and FairScale OSS + DDP behind the one Trainer, on 2 gloo ranks, against native DDP
(and a single process) from the same seed and data. Nothing is compiled: DeepSpeed's CPU shared-memory comm op
is skipped (meshtune.runtime.engines.deepspeed; test_no_deepspeed_op_is_compiled)."""

from pathlib import Path

import pytest
import torch

from tests.distributed.cases import layout, max_diff, reference_trainer, step_losses, tiny_config

pytest.importorskip("deepspeed")
pytest.importorskip("fairscale")

TOL = 1e-5


CLIP = 0.5  # below the tiny model's early gradient norms: clipping is active in every compared step


def engine_args(engine: str, stage: int = 2) -> list[str]:
    return [f"parallel.engine={engine}"] + ([f"parallel.zero_stage={stage}"] if engine == "deepspeed" else [])


def engine_params(trainer) -> dict:
    """Full parameters of any engine's model (ZeRO-3 partitions are gathered)."""
    from meshtune.runtime.data_parallel import unwrap

    model = unwrap(trainer.model)
    params = list(model.parameters())
    if hasattr(params[0], "ds_id"):  # ZeRO-3: every rank holds a partition
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def engine_vs_ddp(run_dir, engine, stage, micro, steps=4):
    from meshtune.runtime.run import build_trainer

    base = [*layout(2, 1, micro), f"optim.grad_clip={CLIP}"]
    ddp = build_trainer(tiny_config(f"{run_dir}/ddp", *base))
    other = build_trainer(tiny_config(f"{run_dir}/{engine}", *base, *engine_args(engine, stage)))
    out = {"losses": [], "ref": [], "norms": [], "ref_norms": []}
    for _ in range(steps):
        for t, losses, norms in ((ddp, "ref", "ref_norms"), (other, "losses", "norms")):
            loss_sum, tokens, norm = t.train_step(t.next_micro_batches())
            out[losses].append(t.mean_loss(loss_sum, tokens))
            out[norms].append(norm)
    out["param_diff"] = max_diff(engine_params(other), engine_params(ddp))
    out["accum"] = other.sampler.accum_steps
    out["lr"] = (other.scheduler.get_last_lr()[0], ddp.scheduler.get_last_lr()[0])
    return out


@pytest.mark.parametrize("engine,stage,micro", [("deepspeed", 1, 2), ("deepspeed", 2, 2), ("deepspeed", 3, 2),
                                                ("deepspeed", 2, 4), ("fairscale", 0, 2)],
                         ids=["zero1-accum2", "zero2-accum2", "zero3-accum2", "zero2-noaccum", "fairscale-accum2"])
def test_engine_matches_native_ddp(rank_pool, tmp_path, engine, stage, micro):
    for r in rank_pool(2).run(engine_vs_ddp, str(tmp_path), engine, stage, micro):
        assert r["accum"] == 8 // (2 * micro)
        assert min(r["ref_norms"]) > CLIP  # the clip is active in every step
        assert max(abs(a - b) for a, b in zip(r["losses"], r["ref"], strict=True)) < TOL, r
        assert max(abs(a - b) / b for a, b in zip(r["norms"], r["ref_norms"], strict=True)) < 1e-4, r
        assert r["param_diff"] < 1e-5, r
        assert r["lr"][0] == pytest.approx(r["lr"][1])


def deepspeed_without_compiler(run_dir):
    """A DeepSpeed engine trains with no C++ compiler on PATH and an empty TORCH_EXTENSIONS_DIR."""
    import os
    import stat
    from pathlib import Path

    import deepspeed.comm.comm as ds_comm

    from meshtune.runtime.run import build_trainer

    fake_bin, ext_dir = Path(run_dir) / "bin", Path(run_dir) / "torch_extensions"
    fake_bin.mkdir(parents=True, exist_ok=True)
    ext_dir.mkdir(exist_ok=True)
    for tool in ("g++", "c++", "gcc", "cc", "ninja"):  # a compile attempt fails loudly
        (fake_bin / tool).write_text("#!/bin/sh\necho no compiler in this test >&2; exit 1\n")
        (fake_bin / tool).chmod(stat.S_IRWXU)
    saved = {k: os.environ.get(k) for k in ("PATH", "TORCH_EXTENSIONS_DIR")}
    os.environ["PATH"] = f"{fake_bin}:{saved['PATH']}"
    os.environ["TORCH_EXTENSIONS_DIR"] = str(ext_dir)
    try:
        t = build_trainer(tiny_config(f"{run_dir}/ds", *layout(2, 1, 2), *engine_args("deepspeed", 2)))
        loss_sum, tokens, _ = t.train_step(t.next_micro_batches())
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    # the backend DeepSpeed created in this rank (by this case or an earlier one: all go through the engine)
    return {"shm_op": ds_comm.cdb.shm_comm_op, "built": sorted(p.name for p in ext_dir.iterdir()),
            "loss": t.mean_loss(loss_sum, tokens)}


def test_no_deepspeed_op_is_compiled(rank_pool, tmp_path):
    import math

    for rank, r in enumerate(rank_pool(2).run(deepspeed_without_compiler, str(tmp_path))):
        assert r["shm_op"] is None and r["built"] == [], (rank, r)
        assert math.isfinite(r["loss"])


def lora_zero3_export(run_dir):
    from dataclasses import replace

    import torch.distributed as dist
    from safetensors.torch import load_file

    from meshtune.export import export
    from meshtune.recipes import export_state
    from meshtune.runtime.data_parallel import unwrap
    from meshtune.runtime.run import build_trainer

    cfg = tiny_config(run_dir, *layout(2, 1, 2), *engine_args("deepspeed", 3), "recipe.name=lora", "train.steps=3",
                      "checkpoint.save_final=true")
    losses = [r["loss"] for r in build_trainer(cfg).fit()["history"] if "loss" in r]
    if dist.get_rank() != 0:
        dist.barrier()
        return None
    ref = reference_trainer(replace(cfg, parallel=replace(cfg.parallel, engine="native")))
    ref_losses = step_losses(ref, 3)
    expected = export_state(unwrap(ref.model).state_dict(), ref.recipes)
    got = load_file(str(export(run_dir, "adapter", quiet=True)[0]))
    merged = load_file(str(export(run_dir, "merged", quiet=True)[0]))
    peft = export(run_dir, "peft", quiet=True)
    # the DeepSpeed run dir as a model to serve or distil from (it had no DCP .metadata: FileNotFoundError)
    import torch

    from meshtune.artifacts import find, load_model
    from meshtune.inference import load_for_generation

    served, _, _ = load_for_generation(run_dir)
    teacher = load_model(find(run_dir, key="recipe.distill.teacher"))
    ref.model.eval()
    x = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        want = unwrap(ref.model)(x)
        serve_diff = float((served(x) - want).abs().max())
        teacher_diff = float((teacher(x) - want).abs().max())
    dist.barrier()
    return {"losses": losses, "ref_losses": ref_losses, "keys": (sorted(got), sorted(expected)),
            "shapes": all(got[k].shape == expected[k].shape for k in expected),
            "numel": min(t.numel() for t in got.values()), "diff": max_diff(got, dict(expected)),
            "merged_keys": len(merged), "peft_files": [p.name for p in peft], "serve_diff": serve_diff,
            "teacher_diff": teacher_diff}


def test_lora_under_zero3_exports_full_adapter(rank_pool, tmp_path):
    r = rank_pool(2).run(lora_zero3_export, str(tmp_path))[0]
    assert r["keys"][0] == r["keys"][1] and r["keys"][0]
    assert r["shapes"] and r["numel"] > 0  # full-size, never a ZeRO-3 partition or an empty tensor
    assert r["diff"] < 1e-4, r
    assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"], strict=True)) < TOL, r
    assert r["merged_keys"] > 0 and "adapter_model.safetensors" in r["peft_files"]
    assert r["serve_diff"] < 1e-4 and r["teacher_diff"] < 1e-4, r  # the same model as the native reference


def resume_case(run_dir, engine, stage):
    from meshtune.runtime.run import build_trainer

    args = [*layout(2, 1, 2), *engine_args(engine, stage), "train.steps=4", "checkpoint.every=2"]
    whole = build_trainer(tiny_config(f"{run_dir}/whole", *args)).fit()
    first = build_trainer(tiny_config(f"{run_dir}/parts", *args, "train.stop_after=2")).fit()
    resumed = build_trainer(tiny_config(f"{run_dir}/parts", *args, "checkpoint.resume=auto"))
    start = resumed.step
    rest = resumed.fit()

    def losses(summary):
        return [(r["step"], r["loss"]) for r in summary["history"] if "loss" in r]

    return {"whole": losses(whole), "parts": losses(first) + losses(rest), "start": start}


@pytest.mark.parametrize("engine,stage", [("deepspeed", 3), ("deepspeed", 1), ("fairscale", 0)],
                         ids=["zero3", "zero1", "fairscale"])
def test_engine_checkpoint_resume_continues_identically(rank_pool, tmp_path, engine, stage):
    for r in rank_pool(2).run(resume_case, str(tmp_path), engine, stage):
        assert r["start"] == 2
        assert [s for s, _ in r["parts"]] == [1, 2, 3, 4]
        assert r["parts"] == r["whole"], r  # bitwise: the same steps, optimizer state and data order


def wrong_engine_resume(run_dir):
    from meshtune.config import ConfigError
    from meshtune.runtime.run import build_trainer

    build_trainer(tiny_config(run_dir, *layout(2, 1, 2), "train.steps=1", "checkpoint.save_final=true")).fit()
    try:
        build_trainer(tiny_config(run_dir, *layout(2, 1, 2), *engine_args("deepspeed", 2), "checkpoint.resume=auto"))
    except ConfigError as e:
        return str(e)
    return None


def test_resume_with_another_engine_is_a_config_error(rank_pool, tmp_path):
    for msg in rank_pool(2).run(wrong_engine_resume, str(tmp_path)):
        assert msg and "parallel.engine=native" in msg and "\n" not in msg


def zero_save_on_two(run_dir):
    from meshtune.runtime.run import build_trainer

    build_trainer(tiny_config(run_dir, *layout(2, 1, 2), *engine_args("deepspeed", 2), "train.steps=1",
                              "checkpoint.save_final=true")).fit()


def zero_resume_on_four(run_dir):
    from meshtune.config import ConfigError
    from meshtune.runtime.run import build_trainer

    try:
        build_trainer(tiny_config(run_dir, *layout(4, 1, 2), *engine_args("deepspeed", 2), "checkpoint.resume=auto"))
    except ConfigError as e:
        return str(e)
    return None


def test_zero_resume_on_another_world_size_is_a_config_error(rank_pool, tmp_path):
    """DeepSpeed cannot reshard ZeRO partitions: a clear error with the ways out, not a crash inside it."""
    rank_pool(2).run(zero_save_on_two, str(tmp_path))
    for msg in rank_pool(4).run(zero_resume_on_four, str(tmp_path)):
        assert msg and "of 2 ranks" in msg and "this run has 4" in msg and "--format merged" in msg, msg
        assert "\n" not in msg


def reshard_args(world: int, engine: str) -> list[str]:
    # the same global batch on 2 and 4 ranks (micro-batches of 2 and 1): the same examples in every step
    return [*layout(world, 1, 4 // world), *engine_args(engine), "train.steps=4", "checkpoint.every=2"]


def save_on_two(run_dir, engine):
    from meshtune.runtime.run import build_trainer

    build_trainer(tiny_config(run_dir, *reshard_args(2, engine), "train.stop_after=2")).fit()


def resume_on_four(run_dir, engine):
    from meshtune.runtime.run import build_trainer

    trainer = build_trainer(tiny_config(run_dir, *reshard_args(4, engine), "checkpoint.resume=auto"))
    start = trainer.step
    return {"start": start, "losses": [r["loss"] for r in trainer.fit()["history"] if "loss" in r]}


def test_fairscale_resumes_on_another_world_size_like_native(rank_pool, tmp_path):
    """FairScale's checkpoint (DCP model + the consolidated OSS optimizer state) reshards: saved on 2 ranks,
    resumed on 4, it continues as native DDP's does through the same 2 -> 4 resume (Adam's moments included:
    an optimizer restarted from zero would move the weights differently from step 3 on)."""
    out = {}
    for engine in ("native", "fairscale"):
        rank_pool(2).run(save_on_two, str(tmp_path / engine), engine)
        out[engine] = rank_pool(4).run(resume_on_four, str(tmp_path / engine), engine)[0]
    assert out["fairscale"]["start"] == out["native"]["start"] == 2
    assert len(out["fairscale"]["losses"]) == 2
    assert max(abs(a - b) for a, b in zip(out["fairscale"]["losses"], out["native"]["losses"], strict=True)) < TOL, out


def poisoned_deepspeed(run_dir, canary):
    """A ZeRO-2 checkpoint whose model_states.pt holds a payload: resume and export refuse it on every rank."""
    import torch.distributed as dist

    from meshtune.config import ConfigError
    from meshtune.export import export
    from meshtune.runtime.run import build_trainer
    from tests.unit.test_safe_loading import Payload

    args = [*layout(2, 1, 2), *engine_args("deepspeed", 2), "train.steps=1", "checkpoint.save_final=true"]
    build_trainer(tiny_config(run_dir, *args)).fit()
    import json

    (meta,) = Path(run_dir).glob("checkpoints/step_*/meta.json")
    recorded = json.loads(meta.read_text())["layout"]  # what ran: not the all-replicate mesh's "ddp"
    dist.barrier()
    if dist.get_rank() == 0:
        (states,) = Path(run_dir).glob("checkpoints/step_*/deepspeed/mp_rank_00_model_states.pt")
        torch.save({"module": Payload(canary), "param_shapes": []}, states)
    dist.barrier()
    out = {}
    try:
        build_trainer(tiny_config(run_dir, *args, "checkpoint.resume=auto"))
    except ConfigError as e:
        out["resume"] = str(e)
    dist.barrier()
    if dist.get_rank() == 0:
        try:
            export(run_dir, "merged", quiet=True)
        except ConfigError as e:
            out["export"] = str(e)
    dist.barrier()
    out["canary"] = Path(canary).exists()
    out["layout"] = recorded
    return out


def test_deepspeed_checkpoint_with_code_is_refused(rank_pool, tmp_path):
    results = rank_pool(2).run(poisoned_deepspeed, str(tmp_path / "run"), str(tmp_path / "canary"))
    for r in results:
        assert r["layout"].endswith("= 2 ranks (deepspeed ZeRO-2)"), r["layout"]
        assert not r["canary"], "the payload ran"
        assert "mp_rank_00_model_states.pt: refused to load" in r["resume"] and "\n" not in r["resume"], r
    assert "mp_rank_00_model_states.pt: refused to load" in results[0]["export"], results[0]
