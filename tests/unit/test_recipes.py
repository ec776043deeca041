"""Unit tests for the PEFT recipes (meshtune.recipes): LoRA, adapters, prefix tuning; one process, tiny model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from meshtune.config import ConfigError, ModelConfig
from meshtune.models import build_model
from meshtune.models.decoder import apply_rope, window_mask
from meshtune.models.rope import rope_tables
from meshtune.recipes import (
    RecipeConfig,
    apply_recipes,
    build_recipes,
    count_parameters,
    export_state,
    registered_recipes,
)
from meshtune.recipes.adapters import Adapter, AdapterConfig
from meshtune.recipes.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_config,
    lora_modules,
    merge_lora_state,
    peft_state_dict,
    permute_rope_rows,
    unpermute_rope_rows,
)
from meshtune.recipes.prefix_tuning import PrefixAttention, PrefixConfig

V = 64
MCFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
FFN = 96  # 8/3 * 32 rounded up to a multiple of 32
HEAD_DIM, KV_DIM = 8, 16


def base_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(MCFG, vocab_size=V)


def recipe_cfg(name: str, **sections) -> RecipeConfig:
    return RecipeConfig(name=name, **sections)


def adapted(name: str, seed: int = 0, **sections):
    """(base model, a copy of it with the recipes applied, the recipes)."""
    base = base_model(seed)
    recipes = build_recipes(recipe_cfg(name, **sections))
    torch.manual_seed(seed + 1)
    return base, apply_recipes(copy.deepcopy(base), recipes), recipes


def tokens(B: int = 3, T: int = 12, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def train_steps(model, n: int = 3, lr: float = 1e-2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    x = tokens()
    for _ in range(n):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def changed_params(before: dict, model) -> set[str]:
    return {n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())}


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- registry and config --------------------------------------------------------------------------------


def test_recipe_section_is_assembled_from_the_registry():
    """One place announces a recipe: its spec gives the `recipe.<name>` section and the `recipe.name` choice."""
    import dataclasses

    from meshtune.recipes import SPECS

    fields = [f.name for f in dataclasses.fields(RecipeConfig)]
    assert fields == ["name", *registered_recipes()] and registered_recipes() == tuple(s.name for s in SPECS)
    for spec in SPECS:
        assert isinstance(getattr(RecipeConfig(), spec.name), spec.config)


def test_build_recipes_stacks_in_order_and_empty_is_none():
    assert build_recipes(RecipeConfig()) == []
    recipes = build_recipes(recipe_cfg("lora+adapters"))
    assert [r.name for r in recipes] == ["lora", "adapters"]


@pytest.mark.parametrize("name", ["nope", "lora+nope", "lora+lora"])
def test_build_recipes_bad_name(name):
    with pytest.raises(ConfigError, match="recipe.name") as e:
        build_recipes(recipe_cfg(name))
    if "nope" in name:
        assert "lora" in str(e.value) and "adapters" in str(e.value) and "prefix" in str(e.value)


@pytest.mark.parametrize("overrides, key", [
    (["recipe.name=nope"], "recipe.name"),
    (["recipe.name=lora+nope"], "recipe.name"),
    (["recipe.lora.rank=0"], "recipe.lora.rank"),
    (["recipe.lora.alpha=0"], "recipe.lora.alpha"),
    (["recipe.lora.dropout=1.0"], "recipe.lora.dropout"),
    (["recipe.lora.targets=[]"], "recipe.lora.targets"),
    (["recipe.adapters.bottleneck=0"], "recipe.adapters.bottleneck"),
    (["recipe.adapters.where=everywhere"], "recipe.adapters.where"),
    (["recipe.prefix.length=-1"], "recipe.prefix.length"),
    (["recipe.prefix.length=100000"], "recipe.prefix.length"),
    (["recipe.prefix.reparam_hidden=-1"], "recipe.prefix.reparam_hidden"),
])
def test_config_rejects_bad_recipe_values(overrides, key):
    from meshtune.schema import load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.task=sort", *overrides])
    assert key in str(e.value)


def test_config_accepts_recipe_sections():
    from meshtune.schema import load_config

    cfg = load_config(None, ["data.task=sort", "recipe.name=lora+prefix", "recipe.lora.rank=4",
                             "recipe.lora.targets=[wq, wv]", "recipe.prefix.reparam_hidden=16"])
    assert cfg.recipe.lora == LoRAConfig(rank=4, targets=["wq", "wv"])
    assert cfg.recipe.prefix.reparam_hidden == 16


# ---- LoRA ------------------------------------------------------------------------------------------------


def test_lora_keeps_base_names_and_adds_a_b():
    base, model, _ = adapted("lora")
    names = set(model.state_dict())
    assert set(base.state_dict()) <= names
    for i in ("0", "1"):
        for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                  "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
            assert isinstance(model.get_submodule(f"layers.{i}.{m}"), LoRALinear)
            assert {f"layers.{i}.{m}.lora_a.weight", f"layers.{i}.{m}.lora_b.weight"} <= names
    assert not isinstance(model.output, LoRALinear)


def test_lora_zero_b_equals_base_exactly():
    base, model, _ = adapted("lora")
    x = tokens()
    assert torch.equal(model(x), base(x))
    assert all(m.lora_a.weight.abs().sum() > 0 for m in model.modules() if isinstance(m, LoRALinear))


def test_lora_trains_only_adapter_and_base_is_bitwise_unchanged():
    _, model, recipes = adapted("lora")
    before = snapshot(model)
    train_steps(model)
    changed = changed_params(before, model)
    lora_names = {n for n in before if ".lora_" in n}
    assert changed == lora_names  # every A and B moved (B from zero, A once B is non-zero) and nothing else
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


def test_lora_parameter_count():
    cfg = LoRAConfig(rank=4)
    _, model, _ = adapted("lora", lora=cfg)
    r, L, dim = 4, MCFG.n_layers, MCFG.dim
    per_layer = (r * (dim + dim)          # wq: A r x dim, B dim x r
                 + 2 * r * (dim + KV_DIM)  # wk, wv
                 + r * (dim + dim)         # wo
                 + 2 * r * (dim + FFN)     # w1, w3
                 + r * (FFN + dim))        # w2
    trainable, total = count_parameters(model)
    base_total = count_parameters(base_model())[1]
    assert trainable == L * per_layer and total == base_total + trainable
    assert 0 < 100 * trainable / total < 20  # tiny model: the share is large; the demo reports it at scale


def test_lora_target_patterns():
    _, model, _ = adapted("lora", lora=LoRAConfig(targets=["attention.wq", "layers.1.*.w2"]))
    lora = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert lora == {"layers.0.attention.wq", "layers.1.attention.wq", "layers.1.feed_forward.w2"}


def test_lora_unknown_target_names_key():
    with pytest.raises(ConfigError, match=r"recipe\.lora\.targets.*'wz'"):
        adapted("lora", lora=LoRAConfig(targets=["wq", "wz"]))


def test_lora_rank_zero_names_key():
    with pytest.raises(ConfigError, match=r"recipe\.lora\.rank"):
        adapted("lora", lora=LoRAConfig(rank=0))


def test_lora_merge_unmerge():
    _, model, _ = adapted("lora", lora=LoRAConfig(rank=4, alpha=8.0))
    train_steps(model)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    x = tokens()
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        for _, m in lora_modules(model):
            m.merge()
            m.merge()  # idempotent: no double add
        merged = model(x)
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        # the merged weights hold the update and the forward no longer adds it
        wq = model.layers["0"].attention.wq
        assert wq.merged and not torch.equal(wq.weight, base_weights["layers.0.attention.wq.weight"])
        for _, m in lora_modules(model):
            m.unmerge()
        for n, p in model.named_parameters():
            if n in base_weights:
                torch.testing.assert_close(p, base_weights[n], atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_lora_merge_state_matches_merged_model():
    _, model, (recipe,) = adapted("lora", lora=LoRAConfig(rank=4, alpha=8.0, targets=["wq", "w2"]))
    train_steps(model)
    folded = recipe.merge_state(model.state_dict())
    plain = base_model()
    plain.load_state_dict(folded)  # base names only, strict
    x = tokens()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-5)
    assert merge_lora_state(model.state_dict(), 8.0).keys() == plain.state_dict().keys()


def test_lora_dropout_only_on_lora_path():
    lin = LoRALinear.from_linear(torch.nn.Linear(8, 6, bias=False), rank=2, alpha=4.0, dropout=0.5)
    torch.nn.init.normal_(lin.lora_b.weight)
    x = torch.randn(4, 8)
    lin.eval()
    ref = lin(x)
    lin.train()
    assert not torch.equal(lin(x), ref)  # dropout active in training
    lin.lora_b.weight.data.zero_()
    assert torch.equal(lin(x), F.linear(x, lin.weight))  # the frozen path never sees dropout


def test_lora_fused_path_matches_children_path():
    """The plain-tensor autograd Function gives the same output and gradients as W x + s B(A(x))."""
    torch.manual_seed(0)
    lin = LoRALinear.from_linear(torch.nn.Linear(8, 6, bias=False), rank=2, alpha=4.0)
    torch.nn.init.normal_(lin.lora_b.weight)
    lin.weight.requires_grad_(False)  # frozen, as the recipe leaves it
    x = torch.randn(3, 5, 8, requires_grad=True)
    g = torch.randn(3, 5, 6)
    lin(x).backward(g)
    fused = [t.grad.clone() for t in (x, lin.lora_a.weight, lin.lora_b.weight)]
    assert lin.weight.grad is None  # the frozen base gets no gradient
    for t in (x, lin.lora_a.weight, lin.lora_b.weight):
        t.grad = None
    ref = F.linear(x, lin.weight) + lin.lora_b(lin.lora_a(x)) * lin.scaling
    torch.testing.assert_close(lin(x), ref, atol=1e-6, rtol=1e-6)
    ref.backward(g)
    for a, t in zip(fused, (x, lin.lora_a.weight, lin.lora_b.weight), strict=True):
        torch.testing.assert_close(a, t.grad, atol=1e-6, rtol=1e-6)


def test_lora_export_state():
    _, model, recipes = adapted("lora", lora=LoRAConfig(rank=4))
    out = export_state(model.state_dict(), recipes)
    assert out.keys() == {n for n in model.state_dict() if ".lora_" in n}
    assert out["layers.0.attention.wk.lora_a.weight"].shape == (4, MCFG.dim)
    assert out["layers.0.attention.wk.lora_b.weight"].shape == (KV_DIM, 4)
    assert out["layers.1.feed_forward.w2.lora_a.weight"].shape == (4, FFN)


def test_lora_on_meta_then_init_weights():
    model = build_model(MCFG, V, device="meta")
    (recipe,) = build_recipes(recipe_cfg("lora"))
    apply_recipes(model, [recipe])
    assert model.layers["0"].attention.wq.lora_a.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    recipe.init_weights(model)
    wq = model.layers["0"].attention.wq
    assert torch.equal(wq.lora_b.weight, torch.zeros_like(wq.lora_b.weight))
    assert torch.isfinite(model(tokens())).all()


# ---- PEFT export and the rotary permutation ---------------------------------------------------------------


def test_permute_rope_rows_is_a_bijection():
    w = torch.arange(KV_DIM * 3).reshape(KV_DIM, 3)
    p = permute_rope_rows(w, n_heads=2)
    assert sorted(p[:, 0].tolist()) == w[:, 0].tolist()  # a permutation of rows
    assert torch.equal(unpermute_rope_rows(p, 2), w)
    # head 0 of D=8: rows (pair i, half c) at 2i+c go to c*4+i
    assert p[:8, 0].tolist() == [0, 6, 12, 18, 3, 9, 15, 21]


def _rope_hf(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF Llama's rotate-half rotary embedding on (B, T, H, D)."""
    cos, sin = torch.cat([cos, cos], -1)[None, :, None], torch.cat([sin, sin], -1)[None, :, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def test_permute_rope_rows_matches_hf_rotary():
    torch.manual_seed(0)
    H, T = 4, 5
    w = torch.randn(H * HEAD_DIM, MCFG.dim)
    x = torch.randn(1, T, MCFG.dim)
    cos, sin = rope_tables(HEAD_DIM, T, 10000.0)
    ours = apply_rope((x @ w.T).view(1, T, H, HEAD_DIM), cos, sin).reshape(1, T, -1)
    hf = _rope_hf((x @ permute_rope_rows(w, H).T).view(1, T, H, HEAD_DIM), cos, sin).reshape(1, T, -1)
    # the same rotated features, in HF's row order
    torch.testing.assert_close(hf[0].T, permute_rope_rows(ours[0].T, H), atol=1e-5, rtol=1e-5)


def test_peft_names_and_lora_b_permutation():
    _, model, (recipe,) = adapted("lora", lora=LoRAConfig(rank=4))
    train_steps(model)
    state = recipe.export_state(model.state_dict())
    peft = peft_state_dict(state, MCFG)
    hf = {"q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv", "o_proj": "attention.wo",
          "gate_proj": "feed_forward.w1", "up_proj": "feed_forward.w3", "down_proj": "feed_forward.w2"}
    expected = {f"base_model.model.model.layers.{i}.{'self_attn' if m.endswith('proj') and m[0] in 'qkvo' else 'mlp'}"
                f".{m}.lora_{ab}.weight" for i in (0, 1) for m in hf for ab in "AB"}
    assert peft.keys() == expected
    pre = "base_model.model.model.layers.1"
    assert torch.equal(peft[f"{pre}.self_attn.q_proj.lora_A.weight"], state["layers.1.attention.wq.lora_a.weight"])
    assert torch.equal(peft[f"{pre}.self_attn.q_proj.lora_B.weight"],
                       permute_rope_rows(state["layers.1.attention.wq.lora_b.weight"], MCFG.n_heads))
    assert torch.equal(peft[f"{pre}.self_attn.k_proj.lora_B.weight"],
                       permute_rope_rows(state["layers.1.attention.wk.lora_b.weight"], MCFG.n_kv_heads))
    assert torch.equal(peft[f"{pre}.mlp.down_proj.lora_B.weight"], state["layers.1.feed_forward.w2.lora_b.weight"])
    conf = adapter_config(LoRAConfig(rank=4), peft)
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 16.0
    assert conf["target_modules"] == sorted(hf) and conf["bias"] == "none" and conf["task_type"] == "CAUSAL_LM"


def test_peft_config_for_some_layers_is_a_regex():
    _, model, (recipe,) = adapted("lora", lora=LoRAConfig(targets=["layers.0.attention.wq", "wv"]))
    import re

    peft = peft_state_dict(recipe.export_state(model.state_dict()), MCFG)
    pattern = adapter_config(LoRAConfig(), peft)["target_modules"]
    assert isinstance(pattern, str)
    assert re.fullmatch(pattern, "model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(pattern, "model.layers.1.self_attn.q_proj")


def test_peft_export_rejects_unmappable():
    _, model, (recipe,) = adapted("lora", lora=LoRAConfig(targets=["output"]))
    with pytest.raises(ValueError, match="output.lora_a"):
        peft_state_dict(recipe.export_state(model.state_dict()), MCFG)


def _hf_llama_state(state: dict) -> dict:
    """meshtune base weights -> HF LlamaForCausalLM names (q/k rows permuted to rotate-half)."""
    from meshtune.models.hf import to_hf_state_dict

    return to_hf_state_dict({k: v for k, v in state.items() if "lora_" not in k}, MCFG)


def test_peft_loads_exported_adapter(tmp_path):
    """The exported adapter, loaded by PEFT onto the matching HF Llama, gives meshtune's logits."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import json

    from safetensors.torch import save_file

    lora = LoRAConfig(rank=4, alpha=8.0)
    _, model, (recipe,) = adapted("lora", lora=lora)
    train_steps(model)  # B != 0, so a wrong name or permutation shows
    model.eval()
    state = model.state_dict()
    adapter = peft_state_dict(recipe.export_state(state), MCFG)
    save_file(adapter, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter_config(lora, adapter)))

    hf_cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=MCFG.dim, intermediate_size=FFN,
                                      num_hidden_layers=MCFG.n_layers, num_attention_heads=MCFG.n_heads,
                                      num_key_value_heads=MCFG.n_kv_heads, max_position_embeddings=MCFG.max_seq_len,
                                      rms_norm_eps=MCFG.norm_eps, rope_theta=MCFG.rope_theta, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(hf_cfg)
    base = {k: v for k, v in state.items() if ".lora_" not in k}  # the frozen base, unmerged
    missing, unexpected = hf.load_state_dict(_hf_llama_state(base), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    hf = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=1e-4)


# ---- adapters -------------------------------------------------------------------------------------------


def test_adapter_identity_at_init_and_names():
    base, model, _ = adapted("adapters", adapters=AdapterConfig(bottleneck=4))
    x = tokens()
    assert torch.equal(model(x), base(x))
    names = set(model.state_dict())
    assert set(base.state_dict()) <= names
    assert "layers.1.attention.adapter.down.weight" in names and "layers.1.feed_forward.adapter.up.bias" in names
    a = Adapter(8, 2)
    h = torch.randn(3, 8)
    assert torch.equal(a(h), h)


@pytest.mark.parametrize("where, n", [("both", 4), ("attention", 2), ("mlp", 2)])
def test_adapter_placement_and_count(where, n):
    b, dim = 4, MCFG.dim
    _, model, _ = adapted("adapters", adapters=AdapterConfig(bottleneck=b, where=where))
    assert sum(isinstance(m, Adapter) for m in model.modules()) == n
    trainable, _ = count_parameters(model)
    assert trainable == n * (dim * b + b + b * dim + dim)


def test_adapter_trains_only_adapters():
    _, model, _ = adapted("adapters", adapters=AdapterConfig(bottleneck=4))
    before = snapshot(model)
    x = tokens()
    out0 = model(x).detach()
    train_steps(model)
    assert changed_params(before, model) == {n for n in before if ".adapter." in n}
    assert not torch.equal(model(x), out0)


def test_adapter_hook_survives_deepcopy():
    _, model, _ = adapted("adapters", adapters=AdapterConfig(bottleneck=4))
    train_steps(model)
    twin = copy.deepcopy(model)
    x = tokens()
    assert torch.equal(twin(x), model(x))


# ---- prefix tuning --------------------------------------------------------------------------------------


def test_prefix_mask():
    m = window_mask(3, 5, 5)  # 3 queries after 2 prefix positions
    assert m.tolist() == [[True, True, True, False, False],
                          [True, True, True, True, False],
                          [True, True, True, True, True]]


def test_prefix_length_zero_equals_base():
    base, model, _ = adapted("prefix", prefix=PrefixConfig(length=0))
    assert all(isinstance(b.attention, PrefixAttention) for b in model.layers.values())
    x = tokens()
    assert torch.equal(model(x), base(x))
    assert count_parameters(model)[0] == 0


@pytest.mark.parametrize("reparam", [0, 16])
def test_prefix_changes_outputs_keeps_causality_and_trains(reparam):
    base, model, _ = adapted("prefix", prefix=PrefixConfig(length=4, reparam_hidden=reparam))
    assert set(base.state_dict()) <= set(model.state_dict())  # base names unchanged
    x = tokens()
    out = model(x)
    assert not torch.allclose(out, base(x))
    t = 6
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % V
    out_y = model(y)
    assert torch.equal(out_y[:, :t], out[:, :t])  # the prefix does not leak future tokens
    assert not torch.allclose(out_y[:, t:], out[:, t:])
    before = snapshot(model)
    train_steps(model)
    assert changed_params(before, model) == {n for n in before if ".prefix_" in n}


def test_prefix_matches_explicit_attention():
    """A prefix is exactly extra key/value positions: compare with attention written out by hand."""
    _, model, _ = adapted("prefix", prefix=PrefixConfig(length=3))
    attn = model.layers["0"].attention
    T = 5
    x = torch.randn(2, T, MCFG.dim)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    q = apply_rope(attn.wq(x).view(2, T, 4, HEAD_DIM), cos, sin)
    k = apply_rope(attn.wk(x).view(2, T, 2, HEAD_DIM), cos, sin)
    v = attn.wv(x).view(2, T, 2, HEAD_DIM)
    k = torch.cat([attn.prefix_k.expand(2, -1, -1, -1), k], 1).repeat_interleave(2, dim=2)
    v = torch.cat([attn.prefix_v.expand(2, -1, -1, -1), v], 1).repeat_interleave(2, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / HEAD_DIM**0.5
    scores = scores.masked_fill(~window_mask(T, T + 3, T + 3), float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(2, T, -1)
    torch.testing.assert_close(attn(x, cos, sin), attn.wo(y), atol=1e-5, rtol=1e-5)


def test_prefix_export_folds_reparam():
    _, model, (recipe,) = adapted("prefix", prefix=PrefixConfig(length=4, reparam_hidden=16))
    train_steps(model)
    exported = recipe.export_state(model.state_dict())
    assert exported.keys() == {f"layers.{i}.attention.prefix_{kv}" for i in (0, 1) for kv in "kv"}
    assert all(t.shape == (4, MCFG.n_kv_heads, HEAD_DIM) for t in exported.values())
    x = tokens()
    with torch.no_grad():
        before = model(x)
        recipe.fold(model)
        assert not any(".prefix_mlp." in n or n.endswith("prefix_embed") for n in model.state_dict())
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)
    for n, t in exported.items():
        torch.testing.assert_close(model.state_dict()[n], t, atol=1e-6, rtol=1e-6)
    assert all(p.requires_grad == (".prefix_" in n) for n, p in model.named_parameters())


def test_prefix_too_long_names_key():
    with pytest.raises(ConfigError, match=r"recipe\.prefix\.length"):
        adapted("prefix", prefix=PrefixConfig(length=MCFG.max_seq_len + 1))


# ---- stacking -------------------------------------------------------------------------------------------


def test_stacked_recipes_train_each_others_parameters():
    base, model, recipes = adapted("lora+adapters+prefix", lora=LoRAConfig(rank=2, targets=["wq", "w2"]),
                                   adapters=AdapterConfig(bottleneck=4), prefix=PrefixConfig(length=0))
    x = tokens()
    assert torch.equal(model(x), base(x))  # every recipe starts at the identity
    before = snapshot(model)
    train_steps(model)
    own = {n for n in before if ".lora_" in n or ".adapter." in n}
    assert changed_params(before, model) == own
    exported = export_state(model.state_dict(), recipes)
    assert exported.keys() == own


def test_trainer_runs_recipe_loss_and_step_hooks(tmp_path):
    """The trainer backpropagates the recipes' chained loss and calls after_optimizer_step once per step."""
    from meshtune.recipes.base import Recipe
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer
    from tests.distributed.cases import full_grads, step_losses, tiny_config

    class Scale(Recipe):
        name = "scale"

        def __init__(self, factor):
            self.factor, self.steps = factor, 0

        def loss(self, task_loss, logits, batch):
            assert logits.shape[:2] == batch["input_ids"].shape
            return task_loss * self.factor

        def after_optimizer_step(self, model):
            self.steps += 1

    def grads(recipes):
        trainer = build_trainer(tiny_config(str(tmp_path), "parallel.dp_shard=1"), DistEnv())
        trainer.recipes = recipes
        loss_sum, tokens = trainer.forward_backward(trainer.next_micro_batches())
        return trainer, full_grads(trainer.model), loss_sum

    _, plain, plain_loss = grads([])
    hooks = [Scale(2.0), Scale(1.5)]
    trainer, scaled, scaled_loss = grads(hooks)
    assert torch.equal(plain_loss, scaled_loss)  # the logged loss stays the task loss
    for k in plain:
        torch.testing.assert_close(scaled[k], 3.0 * plain[k])
    trainer.optimizer.zero_grad()
    step_losses(trainer, 2)
    assert [h.steps for h in hooks] == [2, 2]
