"""Every model family against transformers: a tiny random checkpoint of the real architecture, built and saved
here (no download), loaded by meshtune from its directory alone, with the same logits at a length past any
sliding window; exported back and reloaded by transformers with meshtune's logits."""

import json

import pytest
import torch

from meshtune.config import ConfigError
from meshtune.models import build_model
from meshtune.models.families import FAMILIES, family
from meshtune.models.hf import load_hf_state_dict, read_hf_config, save_hf_checkpoint
from meshtune.schema import load_config
from tests import hf_models

transformers = pytest.importorskip("transformers")
V, T, WINDOW = hf_models.V, 24, hf_models.WINDOW
CASES, hf_model = hf_models.CASES, hf_models.hf_model


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        out = model(x)
        return out.logits if hasattr(out, "logits") else out


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = hf_model(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path


def test_logits_match_transformers_and_export_round_trips(saved, tmp_path):
    case, hf, path = saved
    cfg = read_hf_config(path)
    model = build_model(cfg, cfg.vocab_size)
    model.load_state_dict(load_hf_state_dict(path))
    model.eval()
    x = tokens()
    gap = (logits(model, x) - logits(hf, x)).abs().max().item()
    assert gap < 1e-4, f"{case}: max |meshtune - transformers| = {gap:.2e}"
    if cfg.sliding_window:  # the window matters at this length: full attention differs
        full = build_model(type(cfg)(**{**cfg.__dict__, "sliding_window": 0, "layer_types": []}), cfg.vocab_size)
        full.load_state_dict(model.state_dict())
        assert (logits(full.eval(), x) - logits(hf, x)).abs().max() > 1e-3
    for cap in ("attn_softcap", "logit_softcap"):  # each soft-cap matters on this model: without it, it differs
        if getattr(cfg, cap):
            uncapped = build_model(type(cfg)(**{**cfg.__dict__, cap: 0.0}), cfg.vocab_size)
            uncapped.load_state_dict(model.state_dict())
            assert (logits(uncapped.eval(), x) - logits(hf, x)).abs().max() > 1e-3, cap

    save_hf_checkpoint(model.state_dict(), cfg, cfg.vocab_size, tmp_path / "out", tokenizer_dir=path)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == [CASES[case][1]]
    back = hf_models.load_pretrained(tmp_path / "out", case)
    assert type(back).__name__ == CASES[case][1]
    torch.testing.assert_close(logits(back, x), logits(hf, x), atol=1e-5, rtol=0)


def test_init_from_fills_the_model_from_config_json(saved, tmp_path):
    """`init_from=<HF dir>`: the user sets nothing of model.*; values that agree may stay, any that contradict
    are listed together in one line."""
    case, hf, path = saved
    cfg = load_config(None, [f"init_from={path}", f"run_dir={tmp_path}", "data.task=add", "data.seq_len=16"])
    assert cfg.model == read_hf_config(path)
    assert cfg.model.family == family(cfg.model.family).name and cfg.model.family in FAMILIES
    load_config(None, [f"init_from={path}", "data.task=add", "data.seq_len=16", "model.dim=64", "model.n_kv_heads=2",
                       "model.max_seq_len=32"])  # agreeing values (and a shorter context) are fine
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"init_from={path}", "data.task=add", "model.dim=32", "model.norm_eps=1e-6",
                           "model.family=qwen3" if not case.startswith("qwen3") else "model.family=llama"])
    msg = str(info.value)
    assert "3 model value(s)" in msg and "model.dim=64" in msg and "model.norm_eps=1e-05" in msg, msg
    assert f"model.family={cfg.model.family}" in msg and "\n" not in msg
    if cfg.model.rope_scaling.get("rope_type") == "llama3":  # the oldest configs' "type" says the same thing
        legacy = {("type" if k == "rope_type" else k): v for k, v in cfg.model.rope_scaling.items()}
        load_config(None, [f"init_from={path}", "data.task=add", "data.seq_len=16",
                           f"model.rope_scaling={json.dumps(legacy)}"])


def test_a_feature_outside_the_family_is_refused():
    with pytest.raises(ConfigError, match=r"model\.qk_norm=True: model\.family=llama.*families that do: qwen3"):
        load_config(None, ["data.task=add", "model.qk_norm=true"])
    with pytest.raises(ConfigError, match=r"model\.family: 'gemma9' is not a model family"):
        load_config(None, ["data.task=add", "model.family=gemma9"])
    with pytest.raises(ConfigError, match=r"model\.rope_scaling: rope_type 'longrope' is not supported"):
        load_config(None, ["data.task=add", "model.rope_scaling={rope_type: longrope, factor: 2}"])
    with pytest.raises(ConfigError, match=r"model\.layer_types has 1 entries for 2 layers"):
        load_config(None, ["data.task=add", "model.family=qwen2", "model.sliding_window=4",
                           "model.layer_types=[sliding_attention]", "model.n_layers=2"])


RECIPE_CASES = ["mistral-window", "qwen2.5-tied-bias", "qwen3-qknorm", "gemma2", "gemma3", "phi3"]


@pytest.fixture(scope="module")
def recipe_dirs(tmp_path_factory):
    out = {}
    for case in RECIPE_CASES:
        out[case] = tmp_path_factory.mktemp(f"recipes-{case}")
        hf_model(case).save_pretrained(out[case])
    return out


@pytest.mark.parametrize("recipe", ["adapters", "prefix", "qat", "prune"])
@pytest.mark.parametrize("case", RECIPE_CASES)
def test_every_recipe_trains_on_every_family(recipe_dirs, tmp_path, case, recipe):
    """Each recipe from each family's HF dir trains (the loss falls); adapters (identity at start) and pruning
    (no mask yet) start at transformers' logits. Prefixes and fake quantization change them from the start."""
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer
    from tests.distributed.cases import step_losses

    if case in ("mistral-window", "phi3") and recipe == "prefix":
        pytest.skip("a window of 8 in every layer keeps the prefix out of the answer tokens' reach (as in "
                    "transformers, where prefixes are cached positions): nothing to learn")
    cfg = load_config(None, [f"init_from={recipe_dirs[case]}", f"run_dir={tmp_path}", "data.task=reverse",
                             "data.seq_len=24", "data.num_train=64", "data.num_eval=16", "train.eval_batches=2",
                             "train.global_batch_size=8",
                             "train.micro_batch_size=8", "optim.lr=1e-2",
                             "optim.warmup_steps=0",
                             "metrics.progress=false", f"recipe.name={recipe}"])
    trainer = build_trainer(cfg, DistEnv())
    x = tokens()
    if recipe in ("adapters", "prune"):
        gap = (logits(trainer.model.eval(), x) - logits(hf_model(case), x)).abs().max().item()
        assert gap < 1e-4, gap
    before = trainer.evaluate()["eval_loss"]  # the same held-out batches before and after: no batch noise
    step_losses(trainer, 4)
    after = trainer.evaluate()["eval_loss"]
    assert after < before, (before, after)


@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_gemma_keys_left_out_of_config_json_take_transformers_defaults(case):
    """A hand-written config.json without the Gemma keys reads as transformers reads it (soft-caps on for Gemma 2,
    a 4096 window, 256-wide heads and query_pre_attn_scalar), never as a silently different model."""
    import transformers

    from meshtune.models.hf_config import model_config_from_hf

    conf_cls, model_cls, _ = CASES[case]
    written = json.loads(getattr(transformers, conf_cls)(**hf_models.BASE).to_json_string())
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window", "query_pre_attn_scalar",
                "head_dim", "layer_types"):
        written.pop(key, None)
    ours, theirs = model_config_from_hf(written), getattr(transformers, conf_cls)(**written)
    assert ours.head_dim == theirs.head_dim == 256 and ours.sliding_window == theirs.sliding_window == 4096
    assert ours.attn_scale == theirs.query_pre_attn_scalar == 256
    assert ours.attn_softcap == (theirs.attn_logit_softcapping or 0.0)
    assert ours.logit_softcap == (theirs.final_logit_softcapping or 0.0)
    assert ours.layer_types == theirs.layer_types
    if case == "gemma2":
        assert (ours.attn_softcap, ours.logit_softcap) == (50.0, 30.0)


def test_values_the_user_set_right_are_not_contradictions(tmp_path):
    """Derived values resolve against the checkpoint's own model: 0 = default, the window as config.json has it."""
    hf_model("mistral-window").save_pretrained(tmp_path)
    cfg = load_config(None, [f"init_from={tmp_path}", "data.task=add", "data.seq_len=16",
                             f"model.sliding_window={WINDOW}", "model.n_kv_heads=2", "model.head_dim=0"])
    assert cfg.model.sliding_window == WINDOW


def test_gemma3_with_one_window_for_every_layer_exports_all_sliding():
    from meshtune.config import ModelConfig
    from meshtune.models.hf_config import hf_config_dict, model_config_from_hf
    from meshtune.models.sizes import layer_windows

    m = ModelConfig(family="gemma3", dim=64, n_layers=3, n_heads=4, head_dim=16, sliding_window=8, layer_types=[],
                    norm_offset=True, sandwich_norm=True, mlp_act="gelu_tanh", embed_scale=True, qk_norm=True,
                    rope_local_theta=10000.0, tie_embeddings=True)
    hf = hf_config_dict(m, 264)
    assert hf["layer_types"] == ["sliding_attention"] * 3
    assert layer_windows(model_config_from_hf(hf)) == layer_windows(m) == [8, 8, 8]


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("phi3-fused")
    hf_model("phi3").save_pretrained(path)
    return path


@pytest.mark.parametrize("targets", [["wq", "wv", "w3", "wo"], ["wq", "wv", "w3", "layers.0.attention.wk"]],
                         ids=["same-parts-every-layer", "more-parts-in-layer-0"])
def test_fused_peft_export_of_some_parts_matches_peft(phi3_dir, tmp_path, targets):
    """LoRA on some of q/k/v and gate/up of Phi-3 becomes one adapter on qkv_proj / gate_up_proj (zero blocks for
    the parts without one, rank and alpha scaled together): PeftModel on the HF model gives meshtune's logits."""
    from safetensors.torch import save_file

    from meshtune.recipes import RecipeConfig, apply_recipes, build_recipes, export_state
    from meshtune.recipes.lora import LoRAConfig, adapter_config, peft_state_dict

    peft = pytest.importorskip("peft")
    cfg = read_hf_config(phi3_dir)
    lora = LoRAConfig(rank=4, alpha=6.0, targets=targets)
    recipes = build_recipes(RecipeConfig(name="lora", lora=lora))
    model = build_model(cfg, cfg.vocab_size)
    model.load_state_dict(load_hf_state_dict(phi3_dir))
    model = apply_recipes(model, recipes)
    torch.manual_seed(3)
    with torch.no_grad():  # B != 0 everywhere, so a wrong block, permutation or scaling shows
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.2)
    adapter = peft_state_dict(export_state(model.state_dict(), recipes), cfg)
    qkv = "base_model.model.model.layers.0.self_attn.qkv_proj"
    assert {k.rsplit(".", 2)[0] for k in adapter} >= {qkv, qkv.replace("0.self_attn.qkv", "1.mlp.gate_up")}
    conf = adapter_config(lora, adapter)
    if "layers.0.attention.wk" in targets:  # layer 0 adapts q, k, v (rank 12), layer 1 q and v (rank 8)
        assert adapter[f"{qkv}.lora_A.weight"].shape[0] == 12
        assert sorted(conf["rank_pattern"].values()) == [8, 12] and sorted(conf["alpha_pattern"].values()) == [12, 18]
    else:
        assert conf["rank_pattern"] == {"qkv_proj": 8} and conf["alpha_pattern"] == {"qkv_proj": 12.0}
    assert adapter[f"{qkv}.lora_B.weight"].shape[0] == 128  # q 64 + k 32 + v 32 rows, the zero k block too
    save_file(adapter, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(conf))
    base = transformers.AutoModelForCausalLM.from_pretrained(phi3_dir, attn_implementation="sdpa").eval()
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    x = tokens()
    ours = logits(model.eval(), x)
    assert (ours - logits(hf_model("phi3"), x)).abs().max() > 1e-3  # the adapters change the model
    gap = (logits(adapted, x) - ours).abs().max().item()
    assert gap < 1e-4, gap


def test_fused_export_of_a_shrunk_phi3(phi3_dir, tmp_path):
    """Structured pruning's shrunk model (one of two kv groups and a third of the MLP channels cut out of the
    separate wq/wk/wv/w1/w3) exports to a smaller Phi3ForCausalLM with the pruned model's logits."""
    from meshtune.recipes.prune.export import shrink_state

    cfg = read_hf_config(phi3_dir)
    state = load_hf_state_dict(phi3_dir)
    for i in range(cfg.n_layers):  # kv group 1 (k/v rows 16:32, its query heads' rows 32:64), MLP channels 64:96
        for name, rows in (("attention.wq", slice(32, 64)), ("attention.wk", slice(16, 32)),
                           ("attention.wv", slice(16, 32)), ("feed_forward.w1", slice(64, 96)),
                           ("feed_forward.w3", slice(64, 96))):
            state[f"layers.{i}.{name}.weight"][rows] = 0
    pruned = build_model(cfg, cfg.vocab_size)
    pruned.load_state_dict(state)
    small_state, small_cfg = shrink_state(state, cfg)
    assert (small_cfg.n_heads, small_cfg.n_kv_heads, small_cfg.ffn_dim) == (2, 1, 64)
    save_hf_checkpoint(small_state, small_cfg, cfg.vocab_size, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="sdpa").eval()
    assert back.model.layers[0].self_attn.qkv_proj.weight.shape == (64, 64)
    assert back.model.layers[0].mlp.gate_up_proj.weight.shape == (128, 64)
    x = tokens()
    gap = (logits(back, x) - logits(pruned.eval(), x)).abs().max().item()
    assert gap < 1e-4, gap


def test_phi3_longrope_is_refused_in_one_line(phi3_dir):
    """The 128k variants' LongRoPE (`longrope`, or `su` in older config.json files) names the key."""
    from meshtune.models.hf_config import model_config_from_hf

    hf = json.loads((phi3_dir / "config.json").read_text())
    factors = [1.0] * 8
    for key, rope in (("rope_scaling", {"type": "longrope", "short_factor": factors, "long_factor": factors}),
                      ("rope_scaling", {"type": "su", "short_factor": factors, "long_factor": factors}),
                      ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": factors,
                                           "long_factor": factors})):
        bad = {**{k: v for k, v in hf.items() if k != "rope_parameters"}, key: rope}
        with pytest.raises(ConfigError, match=rf"config\.json: {key}=.*longrope.*not implemented") as info:
            model_config_from_hf(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"model\.rope_scaling: rope_type 'linear' is not available for "
                                          r"model\.family=phi3"):  # an export transformers would refuse
        load_config(None, ["data.task=add", "model.family=phi3", "model.rope_scaling={rope_type: linear, factor: 2}"])
