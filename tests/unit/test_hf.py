"""Hugging Face checkpoints in and out: a tiny LlamaForCausalLM built locally (no downloads) round-trips through
meshtune's decoder with equal logits."""

import dataclasses
import json

import pytest
import torch

from meshtune.config import ConfigError, ModelConfig
from meshtune.models import build_model
from meshtune.models.hf import (
    TOKENIZER_FILES,
    check_matches_hf,
    is_hf_dir,
    load_hf_state_dict,
    model_config_from_hf,
    permute_rope_rows,
    read_hf_config,
    save_hf_checkpoint,
    unpermute_rope_rows,
)

transformers = pytest.importorskip("transformers")
V, T = 300, 24


def hf_model(tie: bool = False, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, tie_word_embeddings=tie, attn_implementation="sdpa",
                                   **overrides)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at ones; randomise them so a swapped norm name shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))


def load_meshtune(path):
    cfg = read_hf_config(path)
    model = build_model(cfg, cfg.vocab_size)
    model.load_state_dict(load_hf_state_dict(path))
    return cfg, model.eval()


def hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits


def assert_same_logits(hf, ours, x):
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf_logits(hf, x), atol=1e-4, rtol=1e-4)


def fine_tune(model, steps: int = 2):
    """A few SGD steps so exported weights differ from the loaded ones."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for i in range(steps):
        x = tokens(seed=10 + i)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_permutation_round_trip():
    w = torch.randn(32, 5)
    assert torch.equal(unpermute_rope_rows(permute_rope_rows(w, 2), 2), w)


@pytest.mark.parametrize("tie,shard", [(False, None), (False, "60KB"), (True, None)])
def test_hf_in_and_out(tmp_path, tie, shard):
    hf = hf_model(tie=tie)
    src, out = tmp_path / "src", tmp_path / "out"
    hf.save_pretrained(src, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    (src / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    assert is_hf_dir(src) and ((src / "model.safetensors.index.json").is_file() == bool(shard))

    cfg, ours = load_meshtune(src)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size, cfg.tie_embeddings) == (
        64, 2, 4, 2, 128, V, tie)
    assert_same_logits(hf, ours, tokens())

    fine_tune(ours)
    save_hf_checkpoint(ours.state_dict(), cfg, V, out, tokenizer_dir=src,
                       max_shard_bytes=60_000 if shard else 5 * 2**30)
    assert (out / "model.safetensors.index.json").is_file() == bool(shard)
    assert (out / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    assert (out / "tokenizer_config.json").is_file()
    back = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    assert back.config.tie_word_embeddings == tie
    assert_same_logits(back, ours, tokens(seed=2))
    with torch.no_grad():  # fine-tuning changed the weights, so this compares more than the original
        assert not torch.allclose(hf_logits(back, tokens()), hf_logits(hf, tokens()), atol=1e-3)


def test_export_from_meshtune_init(tmp_path):
    """A model trained from scratch in meshtune (default ffn_dim, no HF source) exports and loads."""
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=4, max_seq_len=32)
    torch.manual_seed(0)
    ours = build_model(cfg, 64).eval()
    save_hf_checkpoint(ours.state_dict(), cfg, 64, tmp_path)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 64, (1, 16))
    assert_same_logits(back, ours, x)


def llama_json(**changes) -> dict:
    d = json.loads(hf_model().config.to_json_string())
    d.update(changes)
    return d


@pytest.mark.parametrize("changes,key", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"model_type": "gpt2"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"hidden_size": None}, "hidden_size"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 5e5, "factor": 8.0}}, "rope_parameters.*longrope"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "low_freq_factor"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0, "beta": 1}, "rope_parameters": None}, "rope_scaling.*beta"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unsupported_config_names_key(changes, key):
    with pytest.raises(ConfigError, match=key) as info:
        model_config_from_hf(llama_json(**changes))
    assert "\n" not in str(info.value)


def test_config_json_of_either_transformers_generation():
    legacy = model_config_from_hf(llama_json(rope_parameters=None, rope_theta=5e5,  # transformers 4.x layout
                                             rope_scaling={"type": "linear", "factor": 2.0}))
    assert legacy.rope_theta == 5e5 and legacy.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    new = model_config_from_hf(llama_json(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}))
    assert new == legacy
    mistral = model_config_from_hf(llama_json(model_type="mistral", sliding_window=32, max_position_embeddings=4096))
    assert (mistral.family, mistral.sliding_window, mistral.max_seq_len) == ("mistral", 32, 4096)


def test_missing_and_unexpected_tensors_name_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_model().save_pretrained(tmp_path, safe_serialization=True)
    f = tmp_path / "model.safetensors"
    full = load_file(str(f))
    save_file({k: v for k, v in full.items() if k != "model.layers.1.mlp.up_proj.weight"}, str(f),
              metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_state_dict(tmp_path)
    save_file({**full, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, str(f), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"model\.safetensors.*q_proj\.bias.*does config.json belong"):
        load_hf_state_dict(tmp_path)


def test_export_refuses_unmerged_adapter(tmp_path):
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4)
    state = dict(build_model(cfg, 64).state_dict())
    state["layers.0.attention.wq.lora_a.weight"] = torch.zeros(4, 32)
    with pytest.raises(ConfigError, match="lora_a"):
        save_hf_checkpoint(state, cfg, 64, tmp_path)


def test_is_hf_dir(tmp_path):
    assert not is_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert not is_hf_dir(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    assert is_hf_dir(tmp_path) and not is_hf_dir(tmp_path / "config.json")


def test_check_matches_hf_names_the_field(tmp_path):
    hf_model().save_pretrained(tmp_path, safe_serialization=True)
    cfg = read_hf_config(tmp_path)
    check_matches_hf(dataclasses.replace(cfg, ffn_dim=128, n_kv_heads=2), V, tmp_path)  # equal: no error
    with pytest.raises(ConfigError, match=r"model\.rope_theta=10000"):
        check_matches_hf(dataclasses.replace(cfg, rope_theta=5e5), V, tmp_path)
    with pytest.raises(ConfigError, match=r"model\.vocab_size=300"):
        check_matches_hf(cfg, 304, tmp_path)
    with pytest.raises(ConfigError, match="tie_embeddings=false"):
        check_matches_hf(dataclasses.replace(cfg, tie_embeddings=True), V, tmp_path)
    with pytest.raises(ConfigError) as info:  # every mismatching key at once, not one per run
        check_matches_hf(dataclasses.replace(cfg, dim=2 * cfg.dim, n_layers=cfg.n_layers + 1, norm_eps=0.5), V,
                         tmp_path)
    msg = str(info.value)
    assert "3 value(s)" in msg and f"model.dim={cfg.dim}" in msg and f"model.n_layers={cfg.n_layers}" in msg
    assert f"model.norm_eps={cfg.norm_eps}" in msg and "\n" not in msg


def test_init_from_an_hf_directory_trains_with_lora(tmp_path):
    """`init_from=<HF dir>` with LoRA: the run starts from the HF weights (same logits), only LoRA trains."""
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer
    from tests.distributed.cases import step_losses, tiny_config

    hf_dir = tmp_path / "hf"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(hf_dir, safe_serialization=True)
    trainer = build_trainer(tiny_config(str(tmp_path / "run"), "parallel.dp_shard=1", f"init_from={hf_dir}",
                                        "recipe.name=lora", "model.ffn_dim=96", "model.rope_theta=10000.0"),
                            DistEnv())
    tokens = torch.randint(0, 264, (2, 12))
    with torch.no_grad():
        ours, theirs = trainer.model(tokens), model(tokens).logits
    assert (ours - theirs).abs().max() < 1e-4
    step_losses(trainer, 2)
    assert all(("lora_" in n) == p.requires_grad for n, p in trainer.model.named_parameters())


def save_tokenizer(path):
    """A real byte-level BPE tokenizer, saved by transformers (tokenizer.json, tokenizer_config.json, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["reverse: abc\ncba", "reverse: hello\nolleh"] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


@pytest.mark.parametrize("shard,recipe", [(None, ""), ("60KB", "lora")], ids=["single-full", "sharded-lora"])
def test_fine_tune_an_hf_dir_and_export_it_back(tmp_path, monkeypatch, shard, recipe):
    """HF dir (single file or sharded index) -> `init_from` -> meshtune training -> `export --format hf` ->
    transformers loads it with meshtune's logits; the tokenizer files come along."""
    from meshtune.export import export
    from meshtune.runtime.data_parallel import unwrap
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer
    from tests.distributed.cases import tiny_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src, run_dir, out = tmp_path / "src", tmp_path / "run", tmp_path / "out"
    source_tok = save_tokenizer(src)
    vocab = 280
    assert len(source_tok) <= vocab
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(src, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("model-*.safetensors"))) > 1
    if not (src / "special_tokens_map.json").exists():  # transformers 4.x writes it, 5.x does not
        (src / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok_files = [f for f in TOKENIZER_FILES if (src / f).exists()]
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(tok_files)

    cfg = tiny_config(str(run_dir), "parallel.dp_shard=1", f"init_from={src}",
                      f"data.tokenizer={src / 'tokenizer.json'}", f"model.vocab_size={vocab}", "model.ffn_dim=96",
                      "model.rope_theta=10000.0", "train.steps=3",
                      "checkpoint.save_final=true", f"recipe.name={recipe}")
    trainer = build_trainer(cfg, DistEnv())
    x = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(x), hf_logits(hf, x), atol=1e-4, rtol=0)  # loaded right
    trainer.fit()
    ours = unwrap(trainer.model).eval()

    written = export(run_dir, "hf", out, quiet=True)
    assert {p.name for p in written} >= {"config.json", "model.safetensors", *tok_files}
    for f in tok_files:
        assert (out / f).read_bytes() == (src / f).read_bytes()
    back = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    assert not any("lora" in k for k in back.state_dict())
    with torch.no_grad():
        gap = (ours(x) - hf_logits(back, x)).abs().max().item()
        print(f"\nmax |logits(meshtune) - logits(transformers, exported)| = {gap:.2e}")
        assert gap < 1e-4
        assert (hf_logits(back, x) - hf_logits(hf, x)).abs().max() > 1e-3  # training changed the model
    text = "reverse: hello\nolleh"
    assert transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"] == source_tok(text)["input_ids"]



def test_export_keeps_the_source_dtype_and_copies_generation_config(tmp_path):
    """An HF checkpoint stored in bf16 exports in bf16 by default (fp32 would double it), `dtype` overrides it,
    and generation_config.json comes along; transformers reads both exports."""
    from safetensors import safe_open

    from meshtune.export import export
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer
    from meshtune.schema import load_config

    src = tmp_path / "src"
    hf = hf_model()
    hf.generation_config.do_sample, hf.generation_config.temperature = True, 0.6  # something to recognise
    hf.to(torch.bfloat16).save_pretrained(src)
    assert (src / "generation_config.json").is_file()
    cfg = load_config(None, [f"init_from={src}", f"run_dir={tmp_path / 'run'}", "data.task=reverse",
                             "data.seq_len=16", "train.steps=1", "train.global_batch_size=2",
                             "train.micro_batch_size=2", "checkpoint.save_final=true", "metrics.progress=false",
                             "train.eval_every=0", "train.eval_batches=0"])
    build_trainer(cfg, DistEnv()).fit()
    for dtype, expected in [(None, torch.bfloat16), ("fp32", torch.float32)]:
        out = tmp_path / f"out-{dtype}"
        export(tmp_path / "run", "hf", out, quiet=True, dtype=dtype)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {expected}  # noqa: SIM118
        assert json.loads((out / "generation_config.json").read_text())["temperature"] == 0.6
        back = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert back.config.dtype == expected and next(back.parameters()).dtype == expected
