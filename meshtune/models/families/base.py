"""What a model family is: a `Family` spec, and the config.json translation every family shares.

A family is a Hugging Face architecture meshtune's decoder reproduces exactly. Its spec says how config.json
maps to `model.*` and back, which `model.*` features the architecture has, and what the decoder's modules are
called, in meshtune and in the Hugging Face state dict (so recipes, pruning, PEFT export and the weight
adapter ask the spec instead of naming modules). No torch import: configs are checked at launch time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from meshtune.config import ConfigError


@dataclass(frozen=True)
class ModuleNames:
    """Module paths in meshtune's decoder: a block's relative to `layers.<i>.`, the others to the model."""

    q: str = "attention.wq"
    k: str = "attention.wk"
    v: str = "attention.wv"
    o: str = "attention.wo"
    gate: str = "feed_forward.w1"
    up: str = "feed_forward.w3"
    down: str = "feed_forward.w2"
    attn_norm: str = "attention_norm"
    mlp_norm: str = "ffn_norm"
    attn_out_norm: str = "attn_out_norm"  # model.sandwich_norm only
    ffn_out_norm: str = "ffn_out_norm"
    q_norm: str = "attention.q_norm"
    k_norm: str = "attention.k_norm"
    embed: str = "tok_embeddings"
    final_norm: str = "norm"
    head: str = "output"

    @property
    def attention(self) -> tuple[str, str, str, str]:
        return self.q, self.k, self.v, self.o

    @property
    def mlp(self) -> tuple[str, str, str]:
        return self.gate, self.up, self.down

    @property
    def projections(self) -> tuple[str, ...]:
        """Every linear layer of a block: what LoRA, QAT and pruning adapt by default."""
        return self.attention + self.mlp

    def leaf(self, path: str) -> str:
        """`attention.wq` -> `wq`: the short name recipe targets use."""
        return path.rsplit(".", 1)[-1]


DECODER = ModuleNames()

# Hugging Face names of the decoder's modules, shared by Llama, Mistral, Qwen2 and Qwen3
HF_BLOCK = {
    DECODER.q: "self_attn.q_proj", DECODER.k: "self_attn.k_proj", DECODER.v: "self_attn.v_proj",
    DECODER.o: "self_attn.o_proj", DECODER.gate: "mlp.gate_proj", DECODER.up: "mlp.up_proj",
    DECODER.down: "mlp.down_proj", DECODER.attn_norm: "input_layernorm", DECODER.mlp_norm: "post_attention_layernorm",
    DECODER.q_norm: "self_attn.q_norm", DECODER.k_norm: "self_attn.k_norm",
}
HF_TOP = {DECODER.embed: "model.embed_tokens", DECODER.final_norm: "model.norm", DECODER.head: "lm_head"}

# model.* features beyond a plain Llama, and the value that means "off"
FEATURES = {"attn_bias": False, "qk_norm": False, "sliding_window": 0, "layer_types": [], "rope_local_theta": 0.0,
            "norm_offset": False, "sandwich_norm": False, "mlp_act": "silu", "embed_scale": False, "attn_scale": 0.0,
            "attn_softcap": 0.0, "logit_softcap": 0.0}
# config.json activation names -> model.mlp_act
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture, as meshtune's decoder reproduces it."""

    name: str
    model_types: tuple[str, ...]
    """config.json `model_type` values this family reads."""
    architecture: str
    """config.json `architectures[0]` an export writes."""
    features: frozenset[str] = frozenset()
    """The `FEATURES` this architecture has; a model.* feature outside them is refused (export could not say it)."""
    from_hf: Callable[[dict, Callable[..., ConfigError]], dict] = lambda hf, refuse: {}
    """Family-specific model.* values from config.json (on top of `common_from_hf`); `refuse(key, why)` builds
    the one-line error for an unsupported key."""
    to_hf: Callable[[object], dict] = lambda m: {}
    """Family-specific config.json keys for a ModelConfig (on top of `common_to_hf`)."""
    rope_scaling: bool = True
    """The architecture takes meshtune's scaled rotary embeddings (model.rope_scaling); False: plain only."""
    names: ModuleNames = DECODER
    hf_block: dict[str, str] = field(default_factory=lambda: dict(HF_BLOCK))
    hf_top: dict[str, str] = field(default_factory=lambda: dict(HF_TOP))
    hf_fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """HF block modules holding several meshtune modules as row ranges of one tensor, in row order (Phi-3:
    `self_attn.qkv_proj` -> (wq, wk, wv)); `hf_block` maps each of those modules to the fused name too. The
    weight adapter splits such tensors on load and concatenates them on export; PEFT export fuses the LoRAs."""

    def peft_name(self, module: str) -> str:
        """A block module's name in PEFT's `target_modules` (`attention.wq` -> `q_proj`)."""
        return self.hf_block[module].rsplit(".", 1)[-1]

    def fused_parts(self, module: str) -> tuple[str, ...] | None:
        """The meshtune modules sharing `module`'s fused HF tensor, in row order; None for an unfused module."""
        return self.hf_fused.get(self.hf_block.get(module, ""))


def hf_rope(hf: dict) -> tuple[float, dict]:
    """(rope_theta, rope_scaling) from a config.json in either form: transformers 4.x (`rope_theta` plus
    `rope_scaling`) or 5.x (`rope_parameters` holding both)."""
    params = dict(hf.get("rope_parameters") or {})
    if isinstance(params.get("full_attention"), dict):  # per layer type (Gemma 3): the global layers' here
        params = dict(params["full_attention"])
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = params or dict(hf.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:  # the oldest configs
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        scaling = {}
    return float(theta), {k: v for k, v in scaling.items() if k != "rope_theta"}


def common_from_hf(hf: dict, refuse: Callable[..., ConfigError]) -> dict:
    """The model.* values every family reads the same way."""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(hf.get(key), int) or isinstance(hf.get(key), bool):
            raise refuse(key, "is missing or not an integer; not a complete decoder config")
    if hf.get("mlp_bias"):
        raise refuse("mlp_bias", "is not supported: meshtune's MLP has no bias terms")
    act_key = "hidden_activation" if hf.get("hidden_activation") else "hidden_act"
    act = hf.get(act_key) or "silu"
    if act not in ACTIVATIONS:
        raise refuse(act_key, f"is not supported: meshtune's gated MLP takes {', '.join(ACTIVATIONS)}")
    if hf.get("partial_rotary_factor", 1.0) != 1.0 or (hf.get("rope_parameters") or {}).get(
            "partial_rotary_factor", 1.0) != 1.0:
        raise refuse("partial_rotary_factor", "is not supported: meshtune rotates the whole head")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    theta, scaling = hf_rope(hf)
    if scaling.get("rope_type") in ("dynamic", "yarn") and "original_max_position_embeddings" not in scaling:
        scaling["original_max_position_embeddings"] = hf.get("max_position_embeddings", 2048)  # where it starts
    out = {
        "dim": dim, "n_layers": hf["num_hidden_layers"], "n_heads": n_heads,
        "n_kv_heads": hf.get("num_key_value_heads") or n_heads, "ffn_dim": hf["intermediate_size"],
        "vocab_size": hf["vocab_size"], "max_seq_len": hf.get("max_position_embeddings", 2048),
        "rope_theta": theta, "rope_scaling": scaling, "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": float(hf.get("initializer_range", 0.02)),
        "head_dim": hf.get("head_dim") or dim // n_heads, "mlp_act": ACTIVATIONS[act],
    }
    return out


def common_to_hf(m, vocab_size: int) -> dict:
    """config.json keys every family writes the same way (read by transformers 4.x and 5.x)."""
    from meshtune.models.sizes import ffn_hidden_dim, head_dim

    rope = {"rope_type": "default", **m.rope_scaling}
    return {
        "hidden_size": m.dim, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads or m.n_heads, "head_dim": head_dim(m),
        "intermediate_size": ffn_hidden_dim(m), "vocab_size": vocab_size, "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
        "rope_parameters": {**rope, "rope_theta": m.rope_theta}, "rope_scaling": m.rope_scaling or None,
        "tie_word_embeddings": m.tie_embeddings, "attention_dropout": 0.0,
        "hidden_act": {v: k for k, v in ACTIVATIONS.items()}[m.mlp_act],
        "initializer_range": m.init_std, "use_cache": True,
    }


def sliding_from_hf(hf: dict) -> dict:
    """Qwen-style sliding attention: `use_sliding_window`, `sliding_window`, `max_window_layers`/`layer_types`."""
    if not hf.get("use_sliding_window") or not hf.get("sliding_window"):
        return {"sliding_window": 0, "layer_types": []}
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", n) else
                                      "full_attention" for i in range(n)]
    if all(t == "sliding_attention" for t in types):
        types = []
    return {"sliding_window": hf["sliding_window"], "layer_types": list(types)}


def sliding_to_hf(m) -> dict:
    types = list(m.layer_types) or ["sliding_attention" if m.sliding_window else "full_attention"] * m.n_layers
    return {"use_sliding_window": bool(m.sliding_window), "sliding_window": m.sliding_window or None,
            "max_window_layers": m.n_layers if not m.sliding_window else
            next((i for i, t in enumerate(types) if t == "sliding_attention"), m.n_layers),
            "layer_types": types}
