"""Rotary position embeddings (Su et al. 2021) and the scaled variants real checkpoints use.

    cos, sin = rope_tables(head_dim=64, max_seq_len=8192, theta=500000.0,
                           scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})

`scaling` takes Hugging Face's `rope_scaling` keys (model.rope_scaling): linear (Chen et al. 2023, position
interpolation), dynamic (NTK-aware; equal to plain RoPE up to the pretraining length), llama3 (Llama 3.1's
per-frequency interpolation) and yarn (Peng et al. 2023, with its attention factor folded into cos and sin).
This module imports torch only inside the table functions: `check_rope_scaling` runs at config time.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from meshtune.config import ConfigError

if TYPE_CHECKING:
    import torch

# rope_type -> keys it needs (besides rope_type) and keys it may have
ROPE_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ("original_max_position_embeddings",)),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (("factor",), ("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                           "mscale", "mscale_all_dim", "truncate")),
}
_IGNORED = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}  # theta lives in model.rope_theta


def rope_type(scaling: dict) -> str:
    return scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"


def check_rope_scaling(scaling: dict, max_seq_len: int, key: str = "model.rope_scaling") -> None:
    """Refuse an unknown rope type, a missing or unknown key, and lengths a fixed table cannot reproduce.

    Raises:
        ConfigError: one line naming `key` and the fix.
    """
    kind = rope_type(scaling)
    if kind not in ROPE_KEYS:
        raise ConfigError(f"{key}: rope_type {kind!r} is not supported; meshtune implements "
                          f"{', '.join(ROPE_KEYS)} (longrope and others are not)")
    needed, optional = ROPE_KEYS[kind]
    missing = [k for k in needed if scaling.get(k) is None]
    if missing:
        raise ConfigError(f"{key}: rope_type {kind} needs {', '.join(missing)}; add them (see the model's config.json)")
    unknown = sorted(set(scaling) - set(needed) - set(optional) - _IGNORED)
    if unknown:
        raise ConfigError(f"{key}: {', '.join(unknown)} is not a key of rope_type {kind}; it takes "
                          f"{', '.join(needed + optional) or 'no other keys'}")
    if kind == "dynamic" and max_seq_len > scaling.get("original_max_position_embeddings", max_seq_len):
        raise ConfigError(f"{key}: dynamic NTK scaling rescales per sequence length beyond "
                          f"original_max_position_embeddings={scaling['original_max_position_embeddings']}, which "
                          f"fixed rotary tables do not reproduce; set model.max_seq_len <= that length")


def inv_freq_and_scale(head_dim: int, theta: float, scaling: dict, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim // 2,) in float32 and the factor cos/sin are multiplied by."""
    import torch

    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    kind = rope_type(scaling)
    if kind in ("default", "dynamic"):  # dynamic equals plain RoPE within the pretraining length (checked)
        return freqs, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return freqs / factor, 1.0
    if kind == "llama3":
        old_len = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / freqs
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * freqs / factor + smooth * freqs
        out = torch.where(wavelen > old_len / low, freqs / factor, freqs)  # long wavelengths interpolated
        return torch.where((wavelen <= old_len / low) & (wavelen >= old_len / high), mid, out), 1.0
    return _yarn(head_dim, theta, scaling, factor, freqs)


def _yarn(head_dim: int, theta: float, scaling: dict, factor: float, freqs: torch.Tensor) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies, keep the high ones, ramp between (as transformers computes it)."""
    import torch

    old_len = scaling.get("original_max_position_embeddings") or 2048

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = dim_of(fast), dim_of(slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    hi = hi + 0.001 if lo == hi else hi
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=freqs.device) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    return freqs / factor * (1 - keep) + freqs * keep, float(attention)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, scaling: dict | None = None,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each (max_seq_len, head_dim // 2), in float32."""
    import torch

    freqs, scale = inv_freq_and_scale(head_dim, theta, scaling or {}, device)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), freqs)  # (T, D/2)
    if scale == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * scale, angles.sin() * scale
