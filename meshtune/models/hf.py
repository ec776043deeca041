"""Hugging Face Llama-family checkpoints in and out: config.json + safetensors <-> meshtune's decoder.

    cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))   # ModelConfig, vocab_size set
    model = build_model(cfg, cfg.vocab_size)
    model.load_state_dict(load_hf_state_dict(hf_dir))
    ...                                                                               # train
    save_hf_checkpoint(model.state_dict(), cfg, cfg.vocab_size, "out/hf", tokenizer_dir=hf_dir)

Reading needs only json and safetensors (transformers stays optional). Names follow the table below; q/k
projection rows are permuted because meshtune's rotary embedding rotates interleaved pairs (Meta's layout)
while Hugging Face's rotates halves (its convert_llama_weights_to_hf `permute`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch

from meshtune.config import ConfigError, ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
# meshtune name within a block -> HF name within `model.layers.{i}.`
_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_HF_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_IGNORED_HF_KEY = re.compile(r"\.rotary_emb\.inv_freq$")  # a buffer some older checkpoints saved
_FROM_HF_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_FROM_HF_TOP = {v + ".weight": k + ".weight" for k, v in _TOP_NAMES.items()}


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from meshtune's interleaved pairs to HF rotate-half: per head, row 2i+c -> row c*D/2+i."""
    assert w.shape[0] % (2 * n_heads) == 0, f"{w.shape[0]} rows do not split into {n_heads} heads of pairs"
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_rope_rows`: HF rotate-half rows -> meshtune interleaved pairs."""
    assert w.shape[0] % (2 * n_heads) == 0, f"{w.shape[0]} rows do not split into {n_heads} heads of pairs"
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def is_hf_dir(path: str | Path) -> bool:
    """True for a directory holding config.json and model.safetensors or its sharded index."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and ((p / SINGLE_FILE).is_file() or (p / INDEX_FILE).is_file())


def model_config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """A Hugging Face Llama/Mistral config.json (as a dict) -> ModelConfig, with `vocab_size` filled in.

    Mistral's sliding window equals full attention up to the window, so `max_seq_len` is capped at it.

    Raises:
        ConfigError: for features meshtune's decoder cannot reproduce, naming the config.json key.
    """
    def refuse(key: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: {key}={hf.get(key)!r} {why}")

    model_type = hf.get("model_type")
    if model_type not in ("llama", "mistral"):
        raise refuse("model_type", "is not supported; meshtune loads Llama-family checkpoints (llama, mistral) "
                     "whose attention and MLP have no biases (qwen2 has q/k/v biases)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise refuse(key, "is not supported: meshtune's decoder has no bias terms; use a checkpoint without them")
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", "is not supported: meshtune's MLP is SwiGLU (silu)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
        raise refuse(key, "is not supported: meshtune implements plain RoPE only (no scaled/extended variants); "
                     "use a checkpoint with default rotary embeddings")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise refuse(key, "is missing or not an integer; not a complete Llama config")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, dim // n_heads):
        raise refuse("head_dim", f"differs from hidden_size / num_attention_heads = {dim // n_heads}, which "
                     "meshtune's decoder requires")
    max_seq_len = hf.get("max_position_embeddings", 2048)
    if hf.get("sliding_window") and hf.get("use_sliding_window", True):
        max_seq_len = min(max_seq_len, hf["sliding_window"])
    return ModelConfig(
        dim=dim, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, ffn_dim=hf["intermediate_size"],
        vocab_size=hf["vocab_size"], max_seq_len=max_seq_len,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def read_hf_config(path: str | Path) -> ModelConfig:
    """`model_config_from_hf` of `path/config.json`."""
    f = Path(path) / "config.json"
    try:
        return model_config_from_hf(json.loads(f.read_text()), source=str(f))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{f}: cannot read a Hugging Face config ({e})") from None


def check_matches_hf(cfg: ModelConfig, vocab_size: int, path: str | Path) -> None:
    """Refuse to load `path` into a model built from `cfg` when they differ, including in values that no tensor
    shape reveals (rope_theta, norm_eps) and that would silently change the logits.

    Raises:
        ConfigError: naming every differing `model.*` field at once, as the overrides that fix them.
    """
    hf = read_hf_config(path)
    ours = dataclasses.replace(cfg, n_kv_heads=cfg.n_kv_heads or cfg.n_heads, ffn_dim=_ffn(cfg), vocab_size=vocab_size)
    fields = ["dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "rope_theta", "norm_eps"]
    fixes = [f"model.{f}={getattr(hf, f)}" for f in fields if getattr(ours, f) != getattr(hf, f)]
    if cfg.tie_embeddings and not hf.tie_embeddings:
        fixes.append("model.tie_embeddings=false")
    if fixes:
        raise ConfigError(f"init_from: {path} (config.json) differs from this run's model in {len(fixes)} "
                          f"value(s); set {' '.join(fixes)}")


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """meshtune parameter name -> shape, for every tensor of an untied decoder."""
    d, hd, kv = cfg.dim, cfg.dim // cfg.n_heads, cfg.n_kv_heads or cfg.n_heads
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, d), "norm.weight": (d,), "output.weight": (cfg.vocab_size, d)}
    block = {"attention.wq": (d, d), "attention.wk": (kv * hd, d), "attention.wv": (kv * hd, d),
             "attention.wo": (d, d), "feed_forward.w1": (cfg.ffn_dim, d), "feed_forward.w3": (cfg.ffn_dim, d),
             "feed_forward.w2": (d, cfg.ffn_dim), "attention_norm": (d,), "ffn_norm": (d,)}
    for i in range(cfg.n_layers):
        shapes.update({f"layers.{i}.{name}.weight": s for name, s in block.items()})
    return shapes


def _meshtune_name(hf_key: str) -> str | None:
    m = _HF_LAYER_KEY.match(hf_key)
    if m:
        name = _FROM_HF_LAYER.get(m.group(2))
        return f"layers.{m.group(1)}.{name}.weight" if name else None
    return _FROM_HF_TOP.get(hf_key)


def _rope_heads(name: str, cfg: ModelConfig) -> int | None:
    """Heads whose rows to permute for a q/k projection, else None."""
    if name.endswith("attention.wq.weight"):
        return cfg.n_heads
    return (cfg.n_kv_heads or cfg.n_heads) if name.endswith("attention.wk.weight") else None


def load_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an HF checkpoint directory into a meshtune state dict (names mapped, q/k rows un-permuted).

    With tied embeddings (no `lm_head.weight`) `output.weight` is the embedding tensor itself.

    Raises:
        ConfigError: naming the file and key of an unknown, missing or mis-shaped tensor, or an unsupported config.
    """
    from safetensors.torch import load_file

    path = Path(path)
    cfg = read_hf_config(path)
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = [SINGLE_FILE]
    state: dict[str, torch.Tensor] = {}
    shapes = _expected_shapes(cfg)
    for fname in files:
        if not (path / fname).is_file():
            raise ConfigError(f"{index}: lists {fname}, which is missing from {path}")
        for key, t in load_file(str(path / fname)).items():
            if _IGNORED_HF_KEY.search(key):
                continue
            name = _meshtune_name(key)
            if name is None or name not in shapes:
                raise ConfigError(f"{path / fname}: unexpected tensor {key!r}; meshtune maps only Llama decoder "
                                  "weights (no biases, no extra modules)")
            if tuple(t.shape) != shapes[name]:
                raise ConfigError(f"{path / fname}: tensor {key!r} has shape {tuple(t.shape)}, config.json implies "
                                  f"{shapes[name]}")
            heads = _rope_heads(name, cfg)
            state[name] = unpermute_rope_rows(t, heads).contiguous() if heads else t
    if "output.weight" not in state and cfg.tie_embeddings and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    missing = [k for k in shapes if k not in state]
    if missing:
        hf_name = _hf_name(missing[0])
        raise ConfigError(f"{path}: tensor {hf_name!r} is missing from the checkpoint files {files} "
                          f"({len(missing)} missing in all)")
    return state


def _hf_name(name: str) -> str:
    """meshtune parameter name -> HF name."""
    parts = name.removesuffix(".weight")
    if parts in _TOP_NAMES:
        return _TOP_NAMES[parts] + ".weight"
    _, i, rest = parts.split(".", 2)
    return f"model.layers.{i}.{_LAYER_NAMES[rest]}.weight"


def hf_config_dict(cfg: ModelConfig, vocab_size: int, dtype: torch.dtype = torch.float32) -> dict:
    """config.json of a LlamaForCausalLM equal to meshtune's decoder with `cfg` (read by transformers 4.x and 5.x)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads, "head_dim": cfg.dim // cfg.n_heads,
        "intermediate_size": _ffn(cfg), "vocab_size": vocab_size, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std, "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def _ffn(cfg: ModelConfig) -> int:
    from meshtune.models.sizes import ffn_hidden_dim

    return ffn_hidden_dim(cfg)


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """meshtune weights -> HF LlamaForCausalLM names, q/k rows permuted to HF's rotate-half layout.

    Raises ConfigError for a tensor that has no HF Llama name (an unmerged adapter) or a missing one."""
    vocab = cfg.vocab_size or state["tok_embeddings.weight"].shape[0]
    cfg = dataclasses.replace(cfg, ffn_dim=_ffn(cfg), vocab_size=vocab)
    shapes = _expected_shapes(cfg)
    if cfg.tie_embeddings:
        del shapes["output.weight"]
    extra = sorted(set(state) - set(shapes) - {"output.weight"})
    if extra:
        raise ConfigError(f"save_hf_checkpoint: {extra[0]!r} has no Hugging Face Llama name; merge or drop "
                          "recipe tensors (LoRA, adapters) before exporting")
    tensors = {}
    for name in shapes:
        if name not in state:
            raise ConfigError(f"save_hf_checkpoint: the state has no {name!r}")
        t = state[name].detach().to("cpu")
        heads = _rope_heads(name, cfg)
        # clone: safetensors refuses tensors that share storage (tied weights, views)
        tensors[_hf_name(name)] = (permute_rope_rows(t, heads) if heads else t).contiguous().clone()
    return tensors


def save_hf_checkpoint(state: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int, out_dir: str | Path,
                       max_shard_bytes: int = 5 * 2**30, tokenizer_dir: str | Path | None = None) -> Path:
    """Write a meshtune state dict as an HF Llama checkpoint directory that `from_pretrained` loads.

    Args:
        state: full (unsharded) meshtune weights, e.g. `model.state_dict()` or `get_model_state_dict(...,
            full_state_dict=True)`; LoRA/adapter tensors must be merged or dropped first.
        cfg, vocab_size: the model's config and resolved vocabulary size.
        out_dir: created if needed.
        max_shard_bytes: above this total, write model-0000i-of-0000n.safetensors + model.safetensors.index.json.
        tokenizer_dir: copy its tokenizer files (and bos/eos/pad ids of its config.json, if any) alongside.

    Returns:
        `out_dir` as a Path.

    Raises:
        ConfigError: for a tensor that has no HF Llama name (e.g. an unmerged adapter), or a missing one.
    """
    from safetensors.torch import save_file

    cfg = dataclasses.replace(cfg, ffn_dim=_ffn(cfg), vocab_size=vocab_size)
    tensors = to_hf_state_dict(state, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:  # a previous export's shards
        stale.unlink(missing_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata=meta)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
    hf_cfg = hf_config_dict(cfg, vocab_size, dtype=tensors["model.embed_tokens.weight"].dtype)
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        for fname in TOKENIZER_FILES:
            if (src / fname).is_file():
                shutil.copyfile(src / fname, out / fname)
        if (src / "config.json").is_file():
            ids = json.loads((src / "config.json").read_text())
            hf_cfg.update({k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in ids})
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return out
