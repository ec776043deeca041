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

transformers = pytest.importorskip("transformers")
V, T, WINDOW = 96, 24, 8
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, attn_implementation="sdpa")
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 500000.0}

# id -> (transformers config class, model class, config kwargs)
CASES = {
    "llama3.2-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_parameters=LLAMA3)),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM",
                     dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM",
                   dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                         "original_max_position_embeddings": 16})),
    "llama-dynamic": ("LlamaConfig", "LlamaForCausalLM",
                      dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "qwen2.5-tied-bias": ("Qwen2Config", "Qwen2ForCausalLM",
                          dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW,
                               max_window_layers=1)),
    "qwen3-qknorm": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False)),
}


def hf_model(case: str, seed: int = 0):
    conf_cls, model_cls, extra = CASES[case]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, conf_cls)(**BASE, **extra)).eval()
    with torch.no_grad():  # norms start at ones and biases at zero: randomise them so a mis-mapped one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5)
    return model


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
    if case.startswith(("mistral", "qwen2")):  # the window matters at this length: full attention differs
        full = build_model(type(cfg)(**{**cfg.__dict__, "sliding_window": 0, "layer_types": []}), cfg.vocab_size)
        full.load_state_dict(model.state_dict())
        assert (logits(full.eval(), x) - logits(hf, x)).abs().max() > 1e-3

    save_hf_checkpoint(model.state_dict(), cfg, cfg.vocab_size, tmp_path / "out", tokenizer_dir=path)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == [CASES[case][1]]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="sdpa").eval()
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
