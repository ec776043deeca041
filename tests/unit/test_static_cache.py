"""The export-only KV-cache decoders (meshtune/export/static_cache.py, and program_decoder.py that programs are
lowered from) compute meshtune's logits for every model feature, fed as generation feeds it (a prefill, then one
token at a time), eagerly (no lowering); and how `--format executorch` picks its model and scheme."""

from __future__ import annotations

import pytest
import torch

from meshtune.config import ConfigError, ModelConfig
from meshtune.export.static_cache import StaticCacheDecoder
from meshtune.models import build_model

BASE = dict(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=24)
FAMILIES = {
    "llama": {},
    "qwen2 (biases, window)": dict(attn_bias=True, sliding_window=5),
    "qwen3 (q/k norms, mixed layers)": dict(qk_norm=True, sliding_window=4,
                                            layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "gemma3": dict(qk_norm=True, sliding_window=6, layer_types=["sliding_attention", "sliding_attention",
                   "full_attention"], rope_local_theta=10000.0, norm_offset=True, sandwich_norm=True,
                   embed_scale=True, mlp_act="gelu_tanh", attn_scale=16.0, tie_embeddings=True),
    "gemma2 (soft-capped scores and logits)": dict(family="gemma2", sliding_window=6, norm_offset=True,
                                                   sandwich_norm=True, embed_scale=True, mlp_act="gelu_tanh",
                                                   attn_scale=16.0, tie_embeddings=True, attn_softcap=0.5,
                                                   logit_softcap=0.5,
                                                   layer_types=["sliding_attention", "full_attention",
                                                                "sliding_attention"]),
    "soft-capped logits only": dict(family="gemma2", logit_softcap=0.5),
    "shrunk (head_dim != dim / n_heads)": dict(n_heads=2, n_kv_heads=1, head_dim=8, ffn_dim=40),
}


def cached_logits(wrapper: StaticCacheDecoder, x: torch.Tensor, prefill: int) -> torch.Tensor:
    rows = [wrapper(x[:, :prefill], torch.arange(prefill))]
    rows += [wrapper(x[:, t:t + 1], torch.tensor([t])) for t in range(prefill, x.shape[1])]
    return torch.cat(rows, dim=1)


def program_decoder():
    pytest.importorskip("executorch.extension.llm.custom_ops", reason="the executorch extra is not installed")
    from meshtune.export.program_decoder import ProgramDecoder

    return ProgramDecoder


@pytest.mark.parametrize("wrapper_cls", [lambda: StaticCacheDecoder, program_decoder],
                         ids=["eager reference", "program decoder"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_cached_decoding_equals_the_full_forward(name, wrapper_cls):
    """Both the eager wrapper and the one programs are lowered from (XNNPACK-friendly ops, ExecuTorch's LLM
    kernels run eagerly here) give the model's logits."""
    cls = wrapper_cls()
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**BASE, **FAMILIES[name]}), vocab_size=50).eval()
    for p in model.parameters():  # norms and biases off their init values, so they matter
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, 50, (2, 20))
    if cls is not StaticCacheDecoder and model.cfg.attn_softcap:  # ExecuTorch's SDPA kernel cannot soft-cap
        with pytest.raises(ConfigError, match=r"^model\.attn_softcap=0\.5: --format executorch .*Gemma 2"):
            cls(model, 24, batch=2)
        return
    with torch.no_grad():
        ref = model(x)
        wrapper = cls(model, 24, batch=2)
        torch.testing.assert_close(cached_logits(wrapper, x, 7), ref, atol=1e-5, rtol=1e-5)
        # a second sequence reuses the cache from position 0; stale later positions are masked
        y = torch.randint(0, 50, (2, 12))
        torch.testing.assert_close(cached_logits(wrapper, y, 3), model(y), atol=1e-5, rtol=1e-5)


def test_cache_length_is_checked():
    model = build_model(ModelConfig(**BASE), vocab_size=50)
    with pytest.raises(ConfigError, match="--max-seq-len: 25 is outside 2..24"):
        StaticCacheDecoder(model, 25)


def test_a_structured_pruned_run_exports_its_shrunk_decoder(tmp_path):
    """`--format executorch` lowers `program_model(run)`: the shrunk dense decoder, with the pruned run's logits."""
    from meshtune.artifacts import find, find_checkpoint, load_run
    from meshtune.export.executorch import program_model
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer
    from tests.distributed.cases import tiny_config

    cfg = tiny_config(str(tmp_path / "run"), "recipe.name=prune", "recipe.prune.method=structured",
                      "recipe.prune.sparsity=0.5", "train.steps=6", "checkpoint.save_final=true")
    trainer = build_trainer(cfg, DistEnv())
    trainer.fit()
    run = load_run(find(find_checkpoint(tmp_path / "run", None), key="RUN_DIR"))
    model = program_model(run)
    assert (model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.head_dim) == (2, 1, 8)  # half the heads
    x = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pruned = trainer.model.eval()(x)
        torch.testing.assert_close(cached_logits(StaticCacheDecoder(model, 32), x, 9), pruned, atol=1e-5, rtol=1e-5)


def test_program_scheme_defaults_to_the_runs_qat_scheme():
    from types import SimpleNamespace

    from meshtune.export.executorch import program_scheme
    from meshtune.recipes.qat import QuantConfig

    def fake_run(qat: bool, **quant):
        recipe = SimpleNamespace(export_formats=lambda: ("quantized",) if qat else ())
        return SimpleNamespace(artifact=SimpleNamespace(recipe_cfg=SimpleNamespace(qat=QuantConfig(**quant))),
                               recipes=[recipe])

    assert program_scheme(fake_run(False), None) == ("fp32", None)
    scheme, c = program_scheme(fake_run(True, scheme="int8-int4", group_size=64), None)
    assert (scheme, c.scheme, c.group_size) == ("int8-int4", "int8-int4", 64)
    assert program_scheme(fake_run(True), "fp32") == ("fp32", None)
    scheme, c = program_scheme(fake_run(False, group_size=32), "int8-int8")
    assert c.group_size == 0  # XNNPACK's int8 weights are per channel
    with pytest.raises(ConfigError, match="would discard its QAT"):
        program_scheme(fake_run(True, scheme="int8-int4"), "int8-int8")
    with pytest.raises(ConfigError, match="multiple of 32"):
        program_scheme(fake_run(False, group_size=16), "int8-int4")
