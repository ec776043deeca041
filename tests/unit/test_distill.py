"""White-box distillation (meshtune.recipes.distill) and teacher loading (meshtune.inference); one process."""

from __future__ import annotations

import math

import pytest
import torch

from meshtune.artifacts import find, load_model
from meshtune.config import ConfigError
from meshtune.inference import generate
from meshtune.recipes.distill import PROJ, kd_loss
from meshtune.runtime.env import DistEnv
from meshtune.runtime.run import build_trainer
from meshtune.schema import load_config
from tests.distributed.cases import tiny_config


def hand_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))


def softmax_t(row: list[float], t: float) -> list[float]:
    e = [math.exp(x / t) for x in row]
    return [x / sum(e) for x in e]


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_loss_matches_hand_computed(kl, temperature):
    s = [[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], [[0.3, 0.3, 0.3], [2.0, 1.0, 0.0]]]
    t = [[[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]], [[0.0, 4.0, 1.0], [0.5, 0.5, 1.5]]]
    mask = [[True, False], [True, True]]
    expect = 0.0
    for b in range(2):
        for i in range(2):
            if mask[b][i]:
                ps, pt = softmax_t(s[b][i], temperature), softmax_t(t[b][i], temperature)
                expect += hand_kl(pt, ps) if kl == "forward" else hand_kl(ps, pt)
    expect *= temperature ** 2
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(mask), temperature, kl)
    assert got.item() == pytest.approx(expect, rel=1e-6)
    assert got.item() > 0
    # identical distributions: no distillation loss
    assert kd_loss(torch.tensor(s), torch.tensor(s), torch.tensor(mask), temperature, kl).abs().item() < 1e-6


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny teacher trained a few steps (dim 64, 4x the student's parameters of dim 32), plus its exports."""
    from meshtune.export import export
    from meshtune.models.hf import save_hf_checkpoint

    root = tmp_path_factory.mktemp("teacher")
    cfg = tiny_config(str(root / "run"), "model.dim=64", "train.steps=3", "checkpoint.save_final=true")
    trainer = build_trainer(cfg, DistEnv())
    trainer.fit()
    (merged,) = export(root / "run", "merged", quiet=True)
    src = find(root / "run")
    model = load_model(src, torch.device("cpu"))
    hf = save_hf_checkpoint(model.state_dict(), src.model_cfg, src.vocab_size, root / "hf")
    return {"run": root / "run", "merged": merged, "hf": hf, "model": model, "root": root}


def test_teacher_loads_the_same_from_every_form(teacher_run):
    x = torch.randint(0, 256, (2, 12))
    ref = teacher_run["model"](x)
    step_dir = next((teacher_run["run"] / "checkpoints").iterdir())
    for spec in (teacher_run["run"], step_dir, teacher_run["merged"], teacher_run["hf"]):
        src = find(spec, key="recipe.distill.teacher")
        assert src.model_cfg.dim == 64 and src.vocab_size == 264
        model = load_model(src, torch.device("cpu"))
        assert not any(p.requires_grad for p in model.parameters()) and not model.training
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)


def test_teacher_errors_name_the_key(teacher_run, tmp_path):
    with pytest.raises(ConfigError, match=r"^recipe\.distill\.teacher: .*does not exist"):
        find(tmp_path / "nope", key="recipe.distill.teacher")
    (tmp_path / "junk.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"^recipe\.distill\.teacher: .*is not a meshtune run dir"):
        find(tmp_path / "junk.bin", key="recipe.distill.teacher")


def student_cfg(run_dir, teacher, *overrides):
    return tiny_config(str(run_dir), "recipe.name=distill", f"recipe.distill.teacher={teacher}", *overrides)


def test_vocab_mismatch_is_a_config_error(teacher_run, tmp_path):
    cfg = student_cfg(tmp_path, teacher_run["run"], "model.vocab_size=512")
    with pytest.raises(ConfigError, match=r"^recipe\.distill\.teacher: .*vocabulary of 264 tokens, the student 512"):
        build_trainer(cfg, DistEnv())


@pytest.mark.parametrize("override,match", [
    ("recipe.distill.alpha=1.5", r"recipe\.distill\.alpha: must be in \[0, 1\]"),
    ("recipe.distill.temperature=0", r"recipe\.distill\.temperature: must be positive"),
    ("recipe.distill.kl=sideways", r"recipe\.distill\.kl: 'sideways' is not one of"),
    ("recipe.distill.teacher=", r"recipe\.distill\.teacher: empty"),
])
def test_bad_settings(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["data.task=sort", "recipe.name=distill", f"recipe.distill.teacher={tmp_path}", override])


def test_pipeline_is_refused_by_the_plan_before_loading(teacher_run, tmp_path):
    from meshtune.runtime.plan import make_plan

    cfg = student_cfg(tmp_path, teacher_run["run"], "parallel.pp=2", "parallel.dp_shard=1", "model.n_layers=2",
                      "train.micro_batch_size=4")
    with pytest.raises(ConfigError, match=r"^recipe\.name: distill .* parallel\.pp=1"):
        make_plan(cfg, 2)


def micro_batch_losses(trainer):
    """(task loss, distillation loss returned by the recipe chain) of the first micro-batch."""
    from meshtune.runtime.grads import summed_loss

    mb = trainer.next_micro_batches()[0]
    logits = trainer.model(mb["input_ids"])
    task = summed_loss(logits, mb["labels"])
    total = task
    for r in trainer.recipes:
        total = r.loss(total, logits, mb)
    return task, total, logits, mb


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_recipe_loss_is_alpha_task_plus_scaled_kl(teacher_run, tmp_path, kl):
    trainer = build_trainer(student_cfg(tmp_path, teacher_run["run"], "recipe.distill.alpha=0.3",
                                        "recipe.distill.temperature=3", f"recipe.distill.kl={kl}"), DistEnv())
    task, total, logits, mb = micro_batch_losses(trainer)
    with torch.no_grad():
        t_logits = teacher_run["model"](mb["input_ids"])
    mask = mb["labels"] != -100
    expect = 0.3 * task + 0.7 * kd_loss(logits, t_logits, mask, 3.0, kl)
    torch.testing.assert_close(total, expect)
    assert total.requires_grad


def test_alpha_one_is_the_task_loss(teacher_run, tmp_path):
    trainer = build_trainer(student_cfg(tmp_path, teacher_run["run"], "recipe.distill.alpha=1"), DistEnv())
    task, total, _, _ = micro_batch_losses(trainer)
    assert torch.equal(total, task)


def test_hidden_matching_trains_a_projection_that_export_drops(teacher_run, tmp_path):
    from meshtune.export import export

    run = tmp_path / "student"
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(teacher_run["merged"].read_bytes())
    cfg = student_cfg(run, teacher, "recipe.distill.hidden=0.5", "checkpoint.save_final=true", "train.steps=3")
    trainer = build_trainer(cfg, DistEnv())
    proj = getattr(trainer.model, PROJ)
    assert proj.weight.shape == (64, 32) and proj.weight.requires_grad
    assert any(p is proj.weight for g in trainer.optimizer.param_groups for p in g["params"])
    before = proj.weight.detach().clone()
    summary = trainer.fit()
    assert all(math.isfinite(r["loss"]) for r in summary["history"] if "loss" in r)
    assert not torch.equal(before, proj.weight)  # the projection learned
    teacher.unlink()  # exporting the student needs no teacher
    (merged,) = export(run, "merged", out=tmp_path / "out", quiet=True)
    from safetensors.torch import load_file

    keys = set(load_file(str(merged)))
    assert keys and not any(PROJ in k for k in keys)
    # and the exported student serves as a plain model
    src = find(merged)
    model = load_model(src, torch.device("cpu"))
    assert len(generate(model, _byte(), ["reverse: abc\n"], max_tokens=4)) == 1


def test_hidden_term_adds_the_projected_mse(teacher_run, tmp_path):
    trainer = build_trainer(student_cfg(tmp_path, teacher_run["run"], "recipe.distill.alpha=1",
                                        "recipe.distill.hidden=2"), DistEnv())
    recipe = trainer.recipes[0]
    trainer.model.train()
    task, total, _, mb = micro_batch_losses(trainer)
    captured = {}
    trainer.model.norm.register_forward_hook(lambda m, a, out: captured.setdefault("s", out))
    recipe.teacher.norm.register_forward_hook(lambda m, a, out: captured.setdefault("t", out))
    trainer.model(mb["input_ids"])
    recipe.teacher(mb["input_ids"])
    mask = mb["labels"] != -100
    proj = getattr(trainer.model, PROJ)
    mse = ((proj(captured["s"]) - captured["t"]) ** 2).mean(-1)[mask].sum()
    torch.testing.assert_close(total, task + 2 * mse)


def _byte():
    from meshtune.data import build_tokenizer

    return build_tokenizer("byte")


def test_generate_batched_equals_one_by_one(teacher_run):
    model, tok = teacher_run["model"], _byte()
    prompts = ["reverse: abcd\n", "reverse: qwertyuiop\n", "x"]
    batched = generate(model, tok, prompts, max_tokens=6)
    alone = [generate(model, tok, [p], max_tokens=6)[0] for p in prompts]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert all(c.completion_tokens <= 6 for c in batched)
    sampled = [generate(model, tok, prompts, max_tokens=6, temperature=1.0, seed=3) for _ in range(2)]
    assert [c.text for c in sampled[0]] == [c.text for c in sampled[1]]  # seeded sampling repeats


def test_stacks_with_other_recipes(teacher_run, tmp_path):
    """`lora+distill`: LoRA freezes the base, the distillation projection still trains, the loss is KD's."""
    cfg = tiny_config(str(tmp_path), "recipe.name=lora+distill", f"recipe.distill.teacher={teacher_run['run']}",
                      "recipe.distill.hidden=1", "recipe.distill.alpha=0.5")
    trainer = build_trainer(cfg, DistEnv())
    assert [r.name for r in trainer.recipes] == ["lora", "distill"]
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert f"{PROJ}.weight" in trainable and all("lora_" in n or PROJ in n for n in trainable)
    task, total, _, _ = micro_batch_losses(trainer)
    assert not torch.equal(task, total)
