"""Unit tests for the Llama-style decoder (meshtune.models.decoder): one process, tiny sizes."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from meshtune.config import ModelConfig
from meshtune.models import Transformer, build_model
from meshtune.models.decoder import Attention
from meshtune.models.sizes import ffn_hidden_dim

V = 61  # odd on purpose: nothing may assume a round vocabulary


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 16, **kw})


def seeded_build(cfg: ModelConfig, vocab_size: int = V, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return build_model(cfg, vocab_size)


def test_logits_shape_and_dtype():
    model = seeded_build(tiny())
    logits = model(torch.randint(0, V, (3, 10)))
    assert logits.shape == (3, 10, V)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_module_names_follow_torchtitan():
    names = set(seeded_build(tiny(n_layers=2)).state_dict())
    for i in ("0", "1"):
        for sub in (
            "attention.wq",
            "attention.wk",
            "attention.wv",
            "attention.wo",
            "feed_forward.w1",
            "feed_forward.w2",
            "feed_forward.w3",
            "attention_norm",
            "ffn_norm",
        ):
            assert f"layers.{i}.{sub}.weight" in names
    assert {"tok_embeddings.weight", "norm.weight", "output.weight"} <= names
    assert not any(".bias" in n or "rope" in n for n in names)  # no biases; rotary tables not checkpointed


def test_ffn_hidden_dim_rule():
    assert ffn_hidden_dim(ModelConfig(dim=64)) == 192  # int(8 * 64 / 3) = 170 -> 192
    assert ffn_hidden_dim(ModelConfig(dim=4096)) == 10944  # Llama-2 7B rounds to 256 instead: 11008
    assert ffn_hidden_dim(ModelConfig(dim=64, ffn_dim=100)) == 100


def test_causal():
    model = seeded_build(tiny())
    tokens = torch.randint(0, V, (2, 12))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % V
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def reference_attention(attn: Attention, x: torch.Tensor, theta: float) -> torch.Tensor:
    """Attention written out by hand: complex-number RoPE (Meta's reference) and an explicit per-head loop
    where query head h reads kv head h // (n_heads / n_kv_heads)."""
    B, T, _ = x.shape
    D, Hq, Hkv = attn.head_dim, attn.n_heads, attn.n_kv_heads
    freqs = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    rot = torch.polar(torch.ones(T, D // 2), torch.outer(torch.arange(T).float(), freqs))  # (T, D/2)

    def rope(t):  # (B, T, H, D)
        tc = torch.view_as_complex(t.reshape(*t.shape[:-1], D // 2, 2))
        return torch.view_as_real(tc * rot[None, :, None, :]).flatten(-2)

    q = rope((x @ attn.wq.weight.T).view(B, T, Hq, D))
    k = rope((x @ attn.wk.weight.T).view(B, T, Hkv, D))
    v = (x @ attn.wv.weight.T).view(B, T, Hkv, D)
    mask = torch.ones(T, T).tril().bool()
    heads = []
    for h in range(Hq):
        kv = h // (Hq // Hkv)
        scores = q[:, :, h] @ k[:, :, kv].transpose(1, 2) / math.sqrt(D)  # (B, T, T)
        scores = scores.masked_fill(~mask, float("-inf"))
        heads.append(scores.softmax(-1) @ v[:, :, kv])  # (B, T, D)
    return torch.cat(heads, dim=-1) @ attn.wo.weight.T


@pytest.mark.parametrize("n_kv_heads", [0, 4, 2, 1])
def test_attention_matches_hand_written_reference(n_kv_heads):
    cfg = tiny(n_kv_heads=n_kv_heads)
    model = seeded_build(cfg)
    attn = model.layers["0"].attention
    assert attn.wk.weight.shape[0] == (n_kv_heads or 4) * 8
    x = torch.randn(2, 9, cfg.dim)
    T = x.shape[1]
    got = attn(x, model.rope_cos[:T], model.rope_sin[:T])
    torch.testing.assert_close(got, reference_attention(attn, x, cfg.rope_theta), atol=1e-5, rtol=1e-4)


def test_tied_embeddings_share_storage_and_save_params():
    untied = seeded_build(tiny())
    tied = seeded_build(tiny(tie_embeddings=True))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.num_params() - tied.num_params() == V * 32
    tied.output.weight.grad = None
    tied(torch.randint(0, V, (1, 4))).sum().backward()
    assert tied.tok_embeddings.weight.grad is not None
    # the head's matmul still costs FLOPs when tied
    assert tied.flops_per_token(16) == untied.flops_per_token(16)


def test_meta_build_then_init_equals_cpu_build():
    for cfg in (tiny(n_kv_heads=2), tiny(tie_embeddings=True)):
        direct = seeded_build(cfg, seed=7)
        torch.manual_seed(7)
        meta = build_model(cfg, V, device="meta")
        assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
        meta.to_empty(device="cpu")
        with torch.no_grad():  # make sure init_weights overwrites everything, buffers included
            for t in [*meta.parameters(), *meta.buffers()]:
                t.fill_(float("nan"))
        meta.init_weights()
        for (name, a), b in zip(direct.named_buffers(), meta.buffers(), strict=True):
            torch.testing.assert_close(a, b, msg=name)
        for (name, a), b in zip(direct.state_dict().items(), meta.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        assert (meta.output.weight is meta.tok_embeddings.weight) == cfg.tie_embeddings


def test_init_is_seeded_and_scaled():
    cfg = tiny(n_layers=8, dim=64, init_std=0.02)
    a, b, c = seeded_build(cfg, seed=1), seeded_build(cfg, seed=1), seeded_build(cfg, seed=2)
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)
    assert not torch.equal(a.output.weight, c.output.weight)
    wq_std = a.layers["0"].attention.wq.weight.std().item()
    wo_std = a.layers["0"].attention.wo.weight.std().item()
    assert abs(wq_std - 0.02) < 0.002
    assert abs(wo_std - 0.02 / 4) < 0.0005  # 1 / sqrt(2 * 8 layers)
    assert torch.equal(a.norm.weight, torch.ones(64))


def test_1b_config_builds_on_meta_without_memory():
    # Llama-3.2-1B's body with a 32k vocabulary
    cfg = ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, max_seq_len=4096)
    model = build_model(cfg, 32000, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert 1.0e9 <= model.num_params() <= 1.5e9
    assert model.num_params() - model.num_params(exclude_embeddings=True) == 32000 * 2048
    n = model.num_params(exclude_embeddings=True)
    assert model.flops_per_token(4096) == 6 * n + 12 * 16 * 2048 * 4096


def test_too_long_input_raises():
    model = seeded_build(tiny(max_seq_len=8))
    model(torch.zeros(1, 8, dtype=torch.long))  # exactly max_seq_len is fine
    with pytest.raises(ValueError, match="model.max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize(
    "kw, vocab, field",
    [
        ({"dim": 30, "n_heads": 4}, V, "model.n_heads"),
        ({"n_heads": 4, "n_kv_heads": 3}, V, "model.n_kv_heads"),
        ({"dim": 36, "n_heads": 4}, V, "model.dim"),  # head_dim 9 is odd
        ({}, 0, "vocab_size"),
    ],
)
def test_config_validation_names_the_field(kw, vocab, field):
    with pytest.raises(ValueError, match=field):
        build_model(tiny(**kw), vocab)


def test_pipeline_stages_chain_to_the_full_model():
    model = seeded_build(tiny(n_layers=4))
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    for i in ("2", "3"):
        del first.layers[i]
    for i in ("0", "1"):
        del last.layers[i]
    first.norm = first.output = None
    last.tok_embeddings = None
    tokens = torch.randint(0, V, (2, 10))
    hidden = first(tokens)
    assert hidden.shape == (2, 10, 32)
    torch.testing.assert_close(last(hidden), model(tokens))
    assert "layers.3.attention.wq.weight" in last.state_dict()


def test_overfits_a_tiny_batch():
    model = seeded_build(tiny(dim=32, n_layers=2))
    tokens = torch.randint(0, V, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(V), rel=0.1)  # small init -> near-uniform predictions
    assert losses[-1] < 0.3 * losses[0]
