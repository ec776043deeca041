"""A structurally pruned model exported `shrunk` (fewer heads of the same width: model.head_dim != dim / n_heads)
serves, answers as a `distill-data --teacher` and teaches a distillation student, like the pruned run itself."""

from __future__ import annotations

import math

import pytest
import torch

from meshtune.runtime.env import DistEnv
from meshtune.runtime.run import build_trainer
from tests.distributed.cases import tiny_config

PROMPTS = ["reverse: abcdef\n", "reverse: zyx\n", "reverse: hello\n"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A structured-pruned tiny run (half its heads and MLP channels), its `shrunk` export and its own greedy
    completions of PROMPTS (the masked full-size model)."""
    from meshtune.data import build_tokenizer
    from meshtune.export import export
    from meshtune.inference import generate

    root = tmp_path_factory.mktemp("shrunk")
    cfg = tiny_config(str(root / "run"), "recipe.name=prune", "recipe.prune.method=structured",
                      "recipe.prune.sparsity=0.5", "train.steps=6", "checkpoint.save_final=true")
    trainer = build_trainer(cfg, DistEnv())
    trainer.fit()
    shrunk_file = export(root / "run", "shrunk", quiet=True)[0]
    model = trainer.model.eval()
    expected = generate(model, build_tokenizer(cfg.data.tokenizer), PROMPTS, MAX_TOKENS)
    assert sum(c.completion_tokens for c in expected) > 0  # something to compare, not only an EOS
    return {"file": shrunk_file, "model": model, "texts": [c.text for c in expected]}


def assert_is_shrunk_pruned_model(model, pruned_model) -> None:
    """`model` has the shrunk sizes and computes the pruned model's logits (rotary tables included)."""
    cfg = model.cfg
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (32, 2, 1, 8)  # dim // n_heads would be 16
    x = torch.randint(0, pruned_model.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), pruned_model(x), atol=1e-5, rtol=1e-5)


def test_shrunk_model_serves_what_the_pruned_run_generates(pruned):
    from meshtune.serve import CompletionModel

    app = CompletionModel(str(pruned["file"]))
    assert_is_shrunk_pruned_model(app.model, pruned["model"])
    reply = app.complete({"prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert [c["text"] for c in reply["choices"]] == pruned["texts"]


def test_shrunk_model_is_a_distill_data_teacher(pruned):
    from meshtune.distill_data import LocalTeacher

    teacher = LocalTeacher(str(pruned["file"]))
    assert_is_shrunk_pruned_model(teacher.model, pruned["model"])
    assert teacher.complete(PROMPTS, MAX_TOKENS, 0.0, []) == pruned["texts"]


def test_shrunk_model_teaches_a_distillation_student(pruned, tmp_path):
    cfg = tiny_config(str(tmp_path / "student"), "recipe.name=distill", f"recipe.distill.teacher={pruned['file']}",
                      "train.steps=2")
    trainer = build_trainer(cfg, DistEnv())
    (recipe,) = trainer.recipes
    assert_is_shrunk_pruned_model(recipe.teacher, pruned["model"])
    losses = [r["loss"] for r in trainer.fit()["history"] if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
