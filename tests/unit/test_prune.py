"""Unit tests for the prune recipe (meshtune.recipes.prune) and its exports; one process, tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from meshtune.artifacts import find, load_model
from meshtune.artifacts.load import full_state
from meshtune.config import ConfigError
from meshtune.export import export, merged_state
from meshtune.models import build_model
from meshtune.recipes import RecipeConfig, apply_recipes, build_recipes
from meshtune.recipes.prune import PruneConfig, cubic_sparsity, is_update_step, magnitude_masks, nm_mask
from meshtune.recipes.prune.export import semi_structured, shrink_state, sparse_tensors
from meshtune.runtime.env import DistEnv
from meshtune.runtime.run import build_trainer
from tests.distributed.cases import tiny_config

V = 64


def _tiny_model(**prune):
    from meshtune.config import ModelConfig

    model = build_model(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32), V)
    recipes = build_recipes(RecipeConfig(name="prune", prune=PruneConfig(**prune)))
    return apply_recipes(model, recipes), recipes[0]


def _pruned(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "weight_mask")}


def _prune_run(tmp_path, name, *overrides):
    cfg = tiny_config(str(tmp_path / name), "recipe.name=prune", "checkpoint.save_final=true", *overrides)
    trainer = build_trainer(cfg, DistEnv())
    trainer.fit()
    return trainer


def test_cubic_schedule_and_update_steps():
    p = PruneConfig(sparsity=0.8, start_step=10, end_step=50, frequency=10)
    assert cubic_sparsity(5, p) == 0.0
    assert cubic_sparsity(10, p) == 0.0
    assert cubic_sparsity(20, p) == pytest.approx(0.8 * (1 - 0.75 ** 3))
    assert cubic_sparsity(30, p) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert cubic_sparsity(50, p) == cubic_sparsity(99, p) == 0.8
    assert [s for s in range(1, 60) if is_update_step(s, p)] == [10, 20, 30, 40, 50]
    one_shot = PruneConfig(sparsity=0.5, start_step=0, end_step=0)
    assert [s for s in range(1, 10) if is_update_step(s, one_shot)] == [1]
    assert cubic_sparsity(1, one_shot) == 0.5


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_mask_sparsity_is_exact_and_matches_torch_prune(scope):
    model, recipe = _tiny_model(sparsity=0.5, scope=scope)
    found = recipe.targets(model)
    recipe.update_masks(model, found, 0.5)
    masks = {n: m.weight_mask for n, m in found.items()}
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == total // 2
    if scope == "layer":
        assert all(int((~m).sum()) == m.numel() // 2 for m in masks.values())
    # the same masks as torch.nn.utils.prune on copies of the layers
    import torch.nn.utils.prune as tprune

    copies = {n: nn.Linear(m.in_features, m.out_features, bias=False) for n, m in found.items()}
    for n, c in copies.items():
        c.weight.data.copy_(found[n].weight)
    if scope == "global":
        tprune.global_unstructured([(c, "weight") for c in copies.values()], tprune.L1Unstructured, amount=0.5)
    else:
        for c in copies.values():
            tprune.l1_unstructured(c, "weight", amount=0.5)
    assert all(torch.equal(copies[n].weight_mask.bool(), masks[n]) for n in masks)


def test_2of4_mask_matches_weight_norm_sparsifier():
    from torch.ao.pruning import WeightNormSparsifier

    lin = nn.Sequential(nn.Linear(16, 8, bias=False))
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(lin, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    ref = lin[0].parametrizations.weight[0].mask.bool()
    assert torch.equal(nm_mask(lin[0].parametrizations.weight.original), ref)


def test_2of4_pattern_holds_after_training_steps(tmp_path):
    trainer = _prune_run(tmp_path, "nm", "recipe.prune.method=semi_structured", "train.steps=5")
    for name, m in _pruned(trainer.model).items():
        nonzero = m.weight.ne(0).view(m.weight.shape[0], -1, 4).sum(-1)
        assert int(nonzero.max()) <= 2 and float(nonzero.float().mean()) > 1.99, name
        assert torch.equal(m.weight.ne(0), m.weight_mask)


def test_gradual_schedule_in_training_keeps_pruned_weights_zero(tmp_path):
    cfg = tiny_config(str(tmp_path), "recipe.name=prune", "recipe.prune.sparsity=0.6", "recipe.prune.start_step=1",
                      "recipe.prune.end_step=5", "recipe.prune.frequency=2", "recipe.prune.scope=layer")
    trainer = build_trainer(cfg, DistEnv())
    seen = []
    for step in range(1, 7):
        trainer.train_step(trainer.next_micro_batches())
        pruned = _pruned(trainer.model)
        expect = cubic_sparsity(max(s for s in (1, 3, 5) if s <= step), cfg.recipe.prune)
        for m in pruned.values():
            assert int(m.weight.eq(0).sum()) == round(expect * m.weight.numel())
            assert not m.weight[~m.weight_mask].any()
        seen.append(sum(int(m.weight.eq(0).sum()) for m in pruned.values()))
    assert seen == sorted(seen) and seen[:2] == [0, 0] and seen[2] > 0  # s = 0 at start_step (cubic ramp)


def test_masks_and_schedule_survive_resume(tmp_path):
    common = ["recipe.prune.start_step=1", "recipe.prune.end_step=5", "recipe.prune.frequency=2",
              "checkpoint.every=3", "train.steps=6"]
    straight = build_trainer(tiny_config(str(tmp_path / "a"), "recipe.name=prune", *common), DistEnv())
    straight.fit()
    first = build_trainer(tiny_config(str(tmp_path / "b"), "recipe.name=prune", *common, "train.stop_after=3"),
                          DistEnv())
    first.fit()
    resumed = build_trainer(tiny_config(str(tmp_path / "b"), "recipe.name=prune", *common,
                                        "checkpoint.resume=auto"), DistEnv())
    assert resumed.step == 3 and int(resumed.model.prune_step) == 3
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-6


FAMILY_FEATURES = {
    "llama": [],
    "qwen2": ["model.family=qwen2", "model.attn_bias=true", "model.sliding_window=8"],  # biases lose their rows
    "qwen3": ["model.family=qwen3", "model.qk_norm=true", "model.head_dim=12"],  # per-head norms stay whole
    "gemma3": ["model.family=gemma3", "model.qk_norm=true", "model.norm_offset=true", "model.sandwich_norm=true",
               "model.mlp_act=gelu_tanh", "model.embed_scale=true", "model.tie_embeddings=true"],
    "phi3": ["model.family=phi3", "model.sliding_window=8"],  # fused in HF, separate here: shrinks the same
}


@pytest.mark.parametrize("family", list(FAMILY_FEATURES))
def test_structured_shrinks_and_equals_masked_model(tmp_path, family):
    trainer = _prune_run(tmp_path, "st", "recipe.prune.method=structured", "recipe.prune.sparsity=0.5",
                         "train.steps=4", *FAMILY_FEATURES[family])
    model = trainer.model.eval()
    state = merged_state(SimpleNamespace(state=model.state_dict(), recipes=trainer.recipes))
    small_state, small_cfg = shrink_state(state, trainer.cfg.model)
    hd = 12 if family == "qwen3" else 8
    assert (small_cfg.n_heads, small_cfg.n_kv_heads, small_cfg.head_dim) == (2, 1, hd)
    small = build_model(small_cfg, model.vocab_size)
    small.load_state_dict(small_state)  # strict: biases and norms of the right shapes
    small.eval()
    assert small.num_params() < model.num_params()
    assert small.layers["0"].attention.wq.weight.shape == (2 * hd, 32)
    if family == "qwen2":
        assert small.layers["0"].attention.wq.bias.shape == (2 * hd,)
    tokens = torch.randint(0, model.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(small(tokens), model(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("importance", ["taylor", "norm"])
def test_structured_importance_ranks_by_gradient_times_weight_or_norm(importance):
    """Group 1 of every block has the larger weights but no effect on the loss (zero gradient): Taylor prunes it,
    the weight norm keeps it; once pruned, a group stays pruned when the ramp recomputes the masks."""
    model, recipe = _tiny_model(method="structured", sparsity=0.5, importance=importance, end_step=3, frequency=1)
    lins = {n: m for n, m in _pruned(model).items() if n.startswith("layers.0.")}
    hd, hidden = 8, lins["layers.0.feed_forward.w1"].out_features
    for name, lin in _pruned(model).items():
        leaf = name.rsplit(".", 1)[-1]
        w = torch.full_like(lin.weight, 0.1)
        g = torch.ones_like(lin.weight)
        groups = (w[:, 16:], g[:, 16:]) if leaf == "wo" else (w[:, hidden // 2:], g[:, hidden // 2:]) \
            if leaf == "w2" else (w[16:], g[16:]) if leaf == "wq" else (w[hd:], g[hd:]) if leaf in ("wk", "wv") \
            else (w[hidden // 2:], g[hidden // 2:])
        groups[0].fill_(1.0)  # the second kv group / half of the channels: larger weights...
        groups[1].zero_()  # ...and zero gradient
        with torch.no_grad():
            lin.weight.copy_(w)
        lin.weight.grad = g
    for _ in range(3):
        recipe.after_optimizer_step(model)
    wk, w1 = _pruned(model)["layers.1.attention.wk"].weight, _pruned(model)["layers.1.feed_forward.w1"].weight
    kept_second = bool(wk[hd:].ne(0).any())
    assert kept_second == (importance == "norm") and bool(wk[:hd].ne(0).any()) == (importance == "taylor")
    assert int(w1.ne(0).any(1).sum()) == hidden // 2
    assert bool(w1[hidden // 2:].ne(0).any()) == (importance == "norm")


def _run_without_meshtune(program: str, tokens: torch.Tensor, out: str) -> None:
    """Load and run a .pt2 program in a Python that cannot import meshtune (no site dirs, no .pth finders)."""
    torch.save(tokens, out + ".in")
    code = ("import sys; sys.path.append(sys.argv[1]); import torch\n"
            "try:\n    import meshtune\n    raise SystemExit('meshtune importable')\nexcept ImportError:\n    pass\n"
            "m = torch.export.load(sys.argv[2]).module()\n"
            "torch.save(m(torch.load(sys.argv[3])), sys.argv[4])\n")
    site = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-I", "-S", "-c", code, site, program, out + ".in", out], check=True,
                   cwd="/", env=env, timeout=300)


def test_exports_sparse_shrunk_and_program(tmp_path):
    run = tmp_path / "mag"
    trainer = _prune_run(tmp_path, "mag", "recipe.prune.sparsity=0.75", "train.steps=3")
    (merged,) = export(run, "merged", quiet=True)
    (sparse,) = export(run, "sparse", quiet=True)
    from safetensors.torch import load_file

    dense = load_file(str(merged))
    loaded = full_state(find(sparse))
    assert loaded.keys() == dense.keys()
    assert all(torch.equal(loaded[k], dense[k]) for k in dense)
    assert sparse.stat().st_size < merged.stat().st_size
    (program,) = export(run, "program", quiet=True)
    tokens = torch.randint(0, trainer.model.vocab_size, (1, 24))
    _run_without_meshtune(str(program), tokens, str(tmp_path / "logits.pt"))
    with torch.no_grad():
        ref = trainer.model.eval()(tokens)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), ref, atol=1e-5, rtol=1e-5)

    st = _prune_run(tmp_path, "st", "recipe.prune.method=structured", "train.steps=2")
    weights, conf = export(tmp_path / "st", "shrunk", quiet=True)
    small = load_model(find(weights))
    assert small.cfg.n_kv_heads == 1 and conf.is_file()
    with torch.no_grad():
        torch.testing.assert_close(small(tokens), st.model.eval()(tokens), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="--format shrunk"):
        export(run, "shrunk", quiet=True)
    with pytest.raises(ConfigError, match="--format sparse"):
        export(tmp_path / "st", "sparse", quiet=True)


def test_2of4_sparse_layout_round_trip_and_size():
    w = torch.randn(16, 64)
    w = w * nm_mask(w)
    tensors, layouts = sparse_tensors({"w": w}, ["w"], "2:4")
    assert layouts["w"]["layout"] == "2:4"
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert nbytes == w.numel() * 2 + w.numel() // 8  # half the fp32 values + 2 bits per kept weight
    from meshtune.recipes.prune.export import dense_from_sparse

    assert torch.equal(dense_from_sparse(tensors, layouts)["w"], w)
    csr, layouts = sparse_tensors({"w": w}, ["w"], "csr")  # 50%: 6 bytes per kept weight < 4 per weight
    assert layouts["w"]["layout"] == "csr" and torch.equal(dense_from_sparse(csr, layouts)["w"], w)
    w = torch.randn(16, 64)
    w = w * magnitude_masks({"w": w}, 0.25, "layer")["w"]
    csr, layouts = sparse_tensors({"w": w}, ["w"], "csr")  # 75% dense: CSR would be larger, stored dense
    assert layouts == {} and torch.equal(csr["w"], w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="to_sparse_semi_structured has CUDA kernels only")
def test_semi_structured_cuda_conversion():
    lin = nn.Linear(128, 128, bias=False).half().cuda()
    with torch.no_grad():
        lin.weight.mul_(nm_mask(lin.weight))
    x = torch.randn(64, 128, dtype=torch.half, device="cuda")
    ref = lin(x)
    assert semi_structured(lin) == 1
    torch.testing.assert_close(lin(x), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("overrides, field", [
    (["recipe.prune.sparsity=1.0"], "recipe.prune.sparsity"),
    (["recipe.prune.sparsity=-0.1"], "recipe.prune.sparsity"),
    (["recipe.prune.method=semi_structured", "model.ffn_dim=30"], "recipe.prune.method"),
    (["recipe.prune.method=structured", "recipe.prune.sparsity=0.9"], "recipe.prune.sparsity"),
    (["recipe.prune.method=structured", "recipe.prune.sparsity=0.25", "model.n_kv_heads=4", "parallel.tp=2"],
     "recipe.prune.sparsity"),
    (["recipe.prune.frequency=0"], "recipe.prune.frequency"),
])
def test_bad_input_names_the_field(tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        tiny_config(str(tmp_path), "recipe.name=prune", *overrides)
