"""An export-only decoder with a fixed-size KV cache (the eager reference of the ExecuTorch program).

    wrapper = StaticCacheDecoder(model, max_seq_len=128)       # model: meshtune's Transformer (fp32 or torchao)
    logits = wrapper(tokens, input_pos)                         # (B, T, V); the cache keeps positions input_pos

The pattern of ExecuTorch's llama example: one `forward(tokens (B, T), input_pos (T,))` method, the keys and
values of every layer in mutable buffers of the full cache length (static shapes: B x max_seq_len), written at
`input_pos` and attended through a mask, so prefill (T = prompt length) and decode (T = 1) are the same method
with a dynamic T. The wrapper reads the weights of meshtune's own modules (`Attention.qkv` for projections,
biases, q/k norms and rotary positions; the block's norms and MLP), so every model family the decoder supports
is exported as it computes: sliding windows become the mask's band, sandwich norms and embedding scaling are
applied as in `Transformer.forward` (tests/integration/test_executorch.py compares them). Training code never
sees this module. It is the eager reference (plain torch ops, any dtype); the program is lowered from
`meshtune.export.program_decoder.ProgramDecoder`, the same computation in the ops XNNPACK and ExecuTorch's LLM
kernels run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from meshtune.config import ConfigError
from meshtune.models.decoder import attention

INSTALL = "pip install 'meshtune[executorch]'"


def require_executorch(what: str = "--format executorch"):
    """Import executorch, or a one-line ConfigError with the install command."""
    from meshtune.quiet import quiet_torchao

    quiet_torchao()  # executorch imports torchao
    try:
        import executorch  # noqa: F401
        from executorch import exir  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{what}: needs the ExecuTorch runtime, which is not installed ({e}); {INSTALL}") from None


class StaticCacheDecoder(nn.Module):
    """meshtune's decoder with a KV cache of `max_seq_len` positions for `batch` sequences, for torch.export.

    Args:
        model: a full `Transformer` (embedding, every layer, norm and head); shared, not copied or changed.
        max_seq_len: cache length; at most model.max_seq_len (the rotary tables end there).
        batch: rows of the cache (generation uses 1).

    Raises:
        ConfigError: naming --max-seq-len when it is out of range.
    """

    def __init__(self, model: nn.Module, max_seq_len: int, batch: int = 1):
        super().__init__()
        cfg = model.cfg
        if not 2 <= max_seq_len <= cfg.max_seq_len:
            raise ConfigError(f"--max-seq-len: {max_seq_len} is outside 2..{cfg.max_seq_len} (model.max_seq_len, "
                              "where its rotary tables end); give a value in that range")
        assert model.tok_embeddings is not None and model.output is not None, "a pipeline stage, not a model"
        self.model, self.max_seq_len = model, max_seq_len
        for name, layer in model.layers.items():
            att = layer.attention
            shape = (batch, max_seq_len, att.n_kv_heads, att.head_dim)  # (B, S, Hkv, D)
            dtype = att.wo.weight.dtype if att.wo.weight.is_floating_point() else torch.float32
            self.register_buffer(f"k_cache_{name}", torch.zeros(shape, dtype=dtype), persistent=False)
            self.register_buffer(f"v_cache_{name}", torch.zeros(shape, dtype=dtype), persistent=False)

    def reset(self) -> None:
        """Forget every cached position (eager use; a program is reloaded instead)."""
        for buf in self.buffers():
            if buf.dim() == 4:
                buf.zero_()

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T) at positions input_pos (T,) (consecutive, < max_seq_len) -> logits (B, T, V); their keys
        and values are stored in the cache, and each query attends to the cached positions up to its own."""
        m, cfg = self.model, self.model.cfg
        h = m.tok_embeddings(tokens)  # (B, T, dim)
        if cfg.embed_scale:
            h = h * torch.tensor(cfg.dim ** 0.5, dtype=h.dtype)
        rope = (m.rope_cos[input_pos], m.rope_sin[input_pos])  # (T, D/2)
        local = (m.rope_local_cos[input_pos], m.rope_local_sin[input_pos]) if cfg.rope_local_theta else rope
        keys = torch.arange(self.max_seq_len, device=tokens.device)[None, :]  # (1, S)
        causal = keys <= input_pos[:, None]  # (T, S): a query reads the cached positions up to its own
        for name, layer in m.layers.items():
            att = layer.attention
            mask = causal & (input_pos[:, None] - keys < att.window) if att.window else causal
            cos, sin = local if layer.local_rope else rope

            def attend(x, att=att, name=name, cos=cos, sin=sin, mask=mask):
                return self._attend(att, x, cos, sin, input_pos, name, mask)

            # TransformerBlock.forward with the cached attention
            if hasattr(layer, "attn_out_norm"):
                h = h + layer.attn_out_norm(attend(layer.attention_norm(h)))
                h = h + layer.ffn_out_norm(mlp(layer.feed_forward, layer.ffn_norm(h)))
            else:
                h = h + attend(layer.attention_norm(h))
                h = h + mlp(layer.feed_forward, layer.ffn_norm(h))
        return m.logits(m.norm(h))  # (B, T, V)

    def _attend(self, att, x, cos, sin, input_pos, name, mask) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = att.qkv(x, cos, sin)  # (B, T, H, D), normed and rotated as in training
        k_cache, v_cache = getattr(self, f"k_cache_{name}"), getattr(self, f"v_cache_{name}")
        k_cache.index_copy_(1, input_pos, k.to(k_cache.dtype))
        v_cache.index_copy_(1, input_pos, v.to(v_cache.dtype))
        # a program's mutable buffers start undefined, not zero: keep the unwritten positions out of the sums
        written = (torch.arange(self.max_seq_len, device=x.device) <= input_pos[-1])[None, :, None, None]
        k = torch.where(written, k_cache, 0.0).to(q.dtype)  # (B, S, Hkv, D)
        v = torch.where(written, v_cache, 0.0).to(q.dtype)
        n_rep = q.shape[2] // k.shape[2]
        if n_rep > 1:  # query head h reads kv head h // n_rep
            k, v = k.repeat_interleave(n_rep, dim=2), v.repeat_interleave(n_rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T|S, D)
        y = attention(q, k, v, mask, att.scale, att.softcap)  # (B, H, T, D)
        return att.wo(y.transpose(1, 2).reshape(B, T, -1))


def mlp(ff, x: torch.Tensor) -> torch.Tensor:
    """`FeedForward.forward`, its tanh-approximated gelu (GeGLU) written out: XNNPACK 1.5.1 delegates
    `gelu(approximate="tanh")` as the exact erf gelu (measured: 1e-3 off on logits of magnitude 5)."""
    if ff.act == "silu":
        return ff(x)
    g = ff.w1(x)
    g = 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g * g * g)))
    return ff.w2(g * ff.w3(x))


def example_inputs(batch: int = 1, length: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (batch, length), input_pos (length,)) to trace with."""
    return torch.zeros(batch, length, dtype=torch.long), torch.arange(length)
