"""The decoder as it is lowered to an ExecuTorch program: `StaticCacheDecoder`'s computation written so that
XNNPACK takes whole layers and ExecuTorch's LLM kernels do the cache and the attention.

    program = lower(model, max_seq_len=64)      # `.buffer` is the .pte file's bytes
    wrapper = ProgramDecoder(model, 64)         # runs eagerly too (the LLM ops have CPU kernels), for tests

Why not lower `StaticCacheDecoder` itself: measured on the demo's model (dim 128 x 3 layers), its program ran
29 XNNPACK partitions per step, with ~200 portable ops between them (masked SDPA's where / logical_not / any,
the RMSNorm means, every reshape with a symbolic length, the cache's index_put), 1.1k decode tokens/s. Here:
  - the cache and attention are `llama::update_cache` + `llama::custom_sdpa` (executorch.extension.llm.custom_ops,
    what ExecuTorch's llama export uses): the keys are written at `start_pos = input_pos[0]` and attention reads
    positions 0..start_pos + T - 1 only, so the unwritten (undefined) rest of the cache is never read; causal
    with `is_causal`; a sliding window is an additive (T, max_seq_len) mask built once per step (with a mask the
    kernel reads the whole cache, so a windowed layer hands it copies with the unwritten positions zeroed);
  - RMSNorm's mean of squares is a linear layer with a constant (1, dim) weight of 1/dim (XNNPACK's mean takes
    4-d inputs only), rotary positions are x * cos + (x P) * sin with P the constant pair-swap matrix (no
    unflatten / select / stack), and reshapes name every size but the sequence's (XNNPACK reshapes take one -1);
so XNNPACK runs everything from one attention to the next: n_layers + 1 partitions; measured (bench_executorch.py,
same model, 1 thread): the fp32 program 7.6k decode tokens/s (was 1.1k), int8 18k (eager fp32: 1.2k).
The program needs the LLM ops' kernels where it runs (`load_runtime_ops`; the C++ runner links
`custom_ops`), and the quantized-embedding kernels (`executorch.kernels.quantized`) for quantized schemes.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from meshtune.config import ConfigError
from meshtune.export.static_cache import StaticCacheDecoder, example_inputs, mlp, require_executorch
from meshtune.models.decoder import softcap_logits


def load_runtime_ops(what: str = "--format executorch") -> None:
    """Register the kernels a program needs beyond the portable ones: ExecuTorch's LLM ops (custom_sdpa,
    update_cache) and quantized ops (quantized embeddings), both for export and in the Python runtime.

    Raises:
        ConfigError: naming `what` when executorch is not installed (`require_executorch`).
    """
    require_executorch(what)
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.kernels import quantized  # noqa: F401


def check_program_model(m) -> None:
    """Refuse a model config a program cannot run (before anything is installed, loaded or lowered).

    Raises:
        ConfigError: naming model.attn_softcap (Gemma 2): ExecuTorch's SDPA kernel cannot soft-cap scores.
    """
    if m.attn_softcap:
        raise ConfigError(f"model.attn_softcap={m.attn_softcap}: --format executorch runs attention in ExecuTorch's "
                          "SDPA kernel, which cannot soft-cap scores (Gemma 2); export --format hf and run it "
                          "elsewhere")


def pair_swap(head_dim: int) -> torch.Tensor:
    """(D, D) P with F.linear(x, P) = (-x1, x0, -x3, x2, ...): `apply_rope` is x * cos + F.linear(x, P) * sin."""
    p = torch.zeros(head_dim, head_dim)
    i = torch.arange(0, head_dim, 2)
    p[i, i + 1] = -1.0  # F.linear(x, p)[..., 2i] = sum_j p[2i, j] x[..., j]
    p[i + 1, i] = 1.0
    return p


class ProgramDecoder(StaticCacheDecoder):
    """`StaticCacheDecoder` (same arguments, same cache buffers, same logits) computed with ops XNNPACK and
    ExecuTorch's LLM kernels run. The model must be float32 (`program_model`'s is): no casts are traced.

    Raises:
        ConfigError: as StaticCacheDecoder, for a max_seq_len out of range.
    """

    def __init__(self, model, max_seq_len: int, batch: int = 1):
        check_program_model(model.cfg)
        super().__init__(model, max_seq_len, batch)
        assert model.rope_cos.dtype == model.norm.weight.dtype == torch.float32, "program_model() is float32"
        load_runtime_ops()
        cfg = model.cfg
        # constants (buffers, so XNNPACK sees a linear with a static weight); a model's own rotary tables are
        # model.max_seq_len long, the program keeps the cache's rows only
        dims = {cfg.dim} | {layer.attention.head_dim for layer in model.layers.values()}
        for d in dims:
            self.register_buffer(f"mean_{d}", torch.full((1, d), 1.0 / d), persistent=False)
        head_dims = {layer.attention.head_dim for layer in model.layers.values()}
        for d in head_dims:
            self.register_buffer(f"pair_swap_{d}", pair_swap(d), persistent=False)
        tables = ["rope_cos", "rope_sin"] + (["rope_local_cos", "rope_local_sin"] if cfg.rope_local_theta else [])
        for name in tables:
            self.register_buffer(name, getattr(model, name)[:max_seq_len].clone(), persistent=False)

    def rms(self, norm, x: torch.Tensor) -> torch.Tensor:
        """`RMSNorm.forward` (fp32: no casts), its mean of squares a linear layer."""
        x = x * torch.rsqrt(F.linear(x * x, getattr(self, f"mean_{x.shape[-1]}")) + norm.eps)
        return x * (1.0 + norm.weight) if norm.offset else x * norm.weight

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T) at positions input_pos (T,) (consecutive from input_pos[0]) -> logits (B, T, V)."""
        m, cfg = self.model, self.model.cfg
        B, T = tokens.shape
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + T <= self.max_seq_len)
        h = m.tok_embeddings(tokens)  # (B, T, dim)
        if cfg.embed_scale:
            h = h * torch.tensor(cfg.dim ** 0.5, dtype=h.dtype)

        def interleaved(cos, sin):  # (T, D/2) tables -> (1, T, 1, D), each angle twice (for x[2i], x[2i+1])
            return tuple(torch.stack((t, t), dim=-1).flatten(-2)[None, :, None, :] for t in (cos, sin))

        rope = interleaved(self.rope_cos[input_pos], self.rope_sin[input_pos])
        local = interleaved(self.rope_local_cos[input_pos], self.rope_local_sin[input_pos]) \
            if cfg.rope_local_theta else rope
        back = input_pos[:, None] - torch.arange(self.max_seq_len)[None, :]  # (T, S): query - key position
        masks = {}  # window -> (T, S) additive mask, shared by the layers with that window
        for name, layer in m.layers.items():
            att = layer.attention
            if att.window and att.window not in masks:
                masks[att.window] = torch.where((back >= 0) & (back < att.window), 0.0, float("-inf"))
            rotary = local if layer.local_rope else rope
            # TransformerBlock.forward with the cached attention (sandwich norms: also on each branch's output)
            sandwich = hasattr(layer, "attn_out_norm")
            y = self._attend(att, self.rms(layer.attention_norm, h), rotary, start, name, masks.get(att.window))
            h = h + (self.rms(layer.attn_out_norm, y) if sandwich else y)
            y = mlp(layer.feed_forward, self.rms(layer.ffn_norm, h))
            h = h + (self.rms(layer.ffn_out_norm, y) if sandwich else y)
        return softcap_logits(m.output(self.rms(m.norm, h)), cfg.logit_softcap)  # (B, T, V)

    def _attend(self, att, x, rotary, start, name, mask) -> torch.Tensor:
        """`Attention.qkv` + the cache + `Attention.attend`, in XNNPACK's and the LLM kernels' ops."""
        B, H, Hkv, D = x.shape[0], att.n_heads, att.n_kv_heads, att.head_dim
        q = att.wq(x).reshape(B, -1, H, D)  # (B, T, H, D)
        k = att.wk(x).reshape(B, -1, Hkv, D)
        v = att.wv(x).reshape(B, -1, Hkv, D)
        if hasattr(att, "q_norm"):
            q, k = self.rms(att.q_norm, q), self.rms(att.k_norm, k)
        cos, sin = rotary
        swap = getattr(self, f"pair_swap_{D}")
        q, k = (t * cos + F.linear(t, swap) * sin for t in (q, k))
        k_cache, v_cache = getattr(self, f"k_cache_{name}"), getattr(self, f"v_cache_{name}")
        torch.ops.llama.update_cache(k, k_cache, start)
        torch.ops.llama.update_cache(v, v_cache, start)
        if mask is not None:  # the kernel reads all S positions: keep the undefined unwritten ones out of the sums
            written = (torch.arange(self.max_seq_len) < start + q.shape[1])[None, :, None, None]
            k_cache, v_cache = torch.where(written, k_cache, 0.0), torch.where(written, v_cache, 0.0)
        # GQA inside the kernel (query head h reads kv head h // (H / Hkv)); the mask, when given, is the causal one
        y = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, mask, 0.0, mask is None, att.scale)  # (B, T, H, D)
        return att.wo(y.reshape(B, -1, H * D))


def lower(model, max_seq_len: int, batch: int = 1):
    """torch.export a `ProgramDecoder` of `model` (T dynamic in 1..max_seq_len) -> edge, XNNPACK delegate ->
    ExecuTorch program, quantized embeddings fused into ExecuTorch's quantized embedding kernels.

    Returns:
        The `ExecutorchProgramManager` (`.buffer` is the .pte file's bytes).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

    wrapper = ProgramDecoder(model, max_seq_len, batch)
    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    with warnings.catch_warnings(), torch.no_grad():
        # the LLM ops' shape checks call torch._check_is_size, deprecated in this torch: noise, not ours to fix
        warnings.filterwarnings("ignore", message="_check_is_size will be removed", category=FutureWarning)
        # executorch's passes deep-copy graphs with LeafSpecs, deprecated in this torch: the same
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        # the caches' undefined initial state is intended (never read unwritten)
        warnings.filterwarnings("ignore", message="Mutation on a buffer in the model is detected")
        ep = torch.export.export(wrapper, example_inputs(batch), dynamic_shapes=({1: seq}, {0: seq}), strict=False)
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
        return edge.to_executorch(ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True))
