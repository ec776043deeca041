"""A Llama-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Module names follow torchtitan's Llama (`tok_embeddings`, `layers.<i>.attention.wq`, `feed_forward.w1`, ...)
so tensor-parallel plans, pipeline splits and Hugging Face weight maps can address them by name.

    from meshtune.config import ModelConfig
    model = build_model(ModelConfig(dim=64, n_layers=2), vocab_size=256)   # built and initialised on cpu
    logits = model(torch.randint(0, 256, (2, 16)))                          # (2, 16, 256)

Large models are built on the meta device (no memory), sharded, then materialised:
`build_model(cfg, V, "meta")` -> parallelize -> `model.to_empty(device=...)` -> `model.init_weights()`.
Pipeline stages delete layers from `model.layers` (a ModuleDict, so names stay stable) and set
`tok_embeddings`, `norm` or `output` to None; `forward` then takes or returns hidden states.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from meshtune.config import ConfigError, ModelConfig
from meshtune.models.rope import check_rope_scaling, rope_tables
from meshtune.models.sizes import ffn_hidden_dim, head_dim, layer_windows


def validate_model_config(cfg: ModelConfig, vocab_size: int) -> None:
    """Check that the shapes in `cfg` fit together.

    Raises:
        ConfigError: (a ValueError) naming the offending field and how to fix it.
    """
    if vocab_size <= 0:
        raise ConfigError(f"vocab_size must be > 0, got {vocab_size}; set model.vocab_size or use a tokenizer")
    for name in ("dim", "n_layers", "n_heads", "max_seq_len"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"model.{name} must be > 0, got {getattr(cfg, name)}")
    if cfg.n_kv_heads < 0 or cfg.ffn_dim < 0:
        raise ConfigError("model.n_kv_heads and model.ffn_dim must be >= 0 (0 = default)")
    if not cfg.head_dim and cfg.dim % cfg.n_heads:
        raise ConfigError(f"model.dim ({cfg.dim}) must be divisible by model.n_heads ({cfg.n_heads})")
    n_kv = cfg.n_kv_heads or cfg.n_heads
    if cfg.n_heads % n_kv:
        raise ConfigError(f"model.n_heads ({cfg.n_heads}) must be divisible by model.n_kv_heads ({n_kv})")
    if head_dim(cfg) % 2:
        raise ConfigError(
            f"head dim model.dim / model.n_heads = {head_dim(cfg)} must be even for rotary "
            "embeddings; change model.dim or model.n_heads"
        )
    check_rope_scaling(cfg.rope_scaling, cfg.max_seq_len)
    layer_windows(cfg)  # checks model.layer_types against model.n_layers


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x (B, T, H, D) by position-dependent angles.

    The interleaved-pair layout is Meta's original Llama (torchtitan's complex `freqs_cis`); Hugging Face
    checkpoints use rotate-half and need wq/wk rows permuted when loaded.
    """
    # compute in float32: bf16 angles lose relative-position precision at long context
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    # (T, D/2) tables for positions 0..T-1, or (B, T, D/2) for packed rows' own positions
    cos, sin = (cos[None, :, None, :], sin[None, :, None, :]) if cos.dim() == 2 else (cos[:, :, None], sin[:, :, None])
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): no mean subtraction, no bias. With `offset` the scale is
    1 + weight, in fp32 (Gemma's layout: weights start at 0)."""

    def __init__(self, dim: int, eps: float = 1e-5, offset: bool = False):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # the mean of squares overflows / loses precision in half types
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (1.0 + self.weight.float())).type_as(x)
        return xf.type_as(x) * self.weight

    def init_weights(self) -> None:
        (nn.init.zeros_ if self.offset else nn.init.ones_)(self.weight)


def document_mask(segments: torch.Tensor, window: int = 0, prefix: int = 0) -> torch.Tensor:
    """(B, 1, T, prefix + T) bool for packed rows: query i reads key j when both are in the same example
    (`segments`, (B, T) ids), j <= i, and, with a window, i - j < window; every query reads the `prefix` keys."""
    T = segments.shape[1]
    i = torch.arange(T, device=segments.device)
    mask = (segments[:, :, None] == segments[:, None, :]) & (i[None, :] <= i[:, None])  # (B, T, T)
    if window:
        mask &= i[:, None] - i[None, :] < window
    if prefix:
        mask = torch.cat([mask.new_ones(mask.shape[0], T, prefix), mask], dim=2)
    return mask[:, None]


def window_mask(q_len: int, kv_len: int, window: int, device=None) -> torch.Tensor:
    """(q_len, kv_len) bool, True where query i (the last q_len of kv_len positions) may read key j: causal and
    at most `window` positions back, itself included (transformers' sliding_window_overlay)."""
    i = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    return (j <= i) & (i - j < window)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
              softcap: float = 0.0) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale) on (B, H, T, D)
    tensors; with `softcap` > 0 the scores are soft-capped to softcap * tanh(score / softcap) before the mask and the
    softmax (Gemma 2), computed here in matmuls as transformers' eager attention does (SDPA cannot soft-cap).
    `mask`: boolean, True where a query reads a key."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    if mask is None:
        mask = window_mask(q.shape[-2], k.shape[-2], k.shape[-2], q.device)
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = (torch.tanh(scores / softcap) * softcap).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def softcap_logits(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """model.logit_softcap: cap * tanh(logits / cap) (Gemma 2's final_logit_softcapping); cap 0 = unchanged."""
    return torch.tanh(logits / cap) * cap if cap else logits


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (Ainslie et al. 2023) and rotary positions; optional q/k/v
    biases (Qwen2), per-head q/k RMSNorm (Qwen3) and a sliding window (Mistral; Beltagy et al. 2020)."""

    def __init__(self, cfg: ModelConfig, window: int = 0):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = head_dim(cfg)
        self.window = window
        self.scale = cfg.attn_scale ** -0.5 if cfg.attn_scale else None  # None: SDPA's 1 / sqrt(head_dim)
        self.softcap = cfg.attn_softcap
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=cfg.attn_bias)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.attn_bias)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=cfg.attn_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.norm_offset)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries (B, T, Hq, D) and keys (B, T, Hkv, D), normed (qk_norm) and rotated, and values."""
        B, T, _ = x.shape
        # -1 heads, not self.n_heads: under tensor parallelism each rank holds a slice of the heads
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, Hq, D)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
        v = self.wv(x).view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               segments: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(D)) v over the causal (windowed) positions, then the output projection.

        q is (B, Tq, Hq, D); k and v (B, Tkv, Hkv, D) with Tkv >= Tq (prefix tuning prepends keys). `segments`
        (B, T), for packed rows, keeps each query within its own example (`document_mask`)."""
        B, T = q.shape[:2]
        n_rep = q.shape[2] // k.shape[2]
        if n_rep > 1:  # query head h reads kv head h // n_rep
            k = k.repeat_interleave(n_rep, dim=2)  # (B, T, Hq, D)
            v = v.repeat_interleave(n_rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, Hq, T, D)
        if segments is not None:
            mask = document_mask(segments, self.window, k.shape[2] - T)
        elif self.window and k.shape[2] > self.window:
            mask = window_mask(T, k.shape[2], self.window, q.device)
        elif k.shape[2] == T:
            mask = None  # causal
        else:
            mask = window_mask(T, k.shape[2], k.shape[2], q.device)
        y = attention(q, k, v, mask, self.scale, self.softcap)  # (B, Hq, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(*self.qkv(x, cos, sin), segments)

    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, mean=0.0, std=std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.wo.weight, mean=0.0, std=out_std)
        if hasattr(self, "q_norm"):
            self.q_norm.init_weights()
            self.k_norm.init_weights()


class FeedForward(nn.Module):
    """Gated MLP (Shazeer 2020): w2(act(w1 x) * w3 x), act = silu (SwiGLU) or tanh-approximated gelu (GeGLU)."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "silu"):
        super().__init__()
        self.act = act
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.silu(self.w1(x)) if self.act == "silu" else F.gelu(self.w1(x), approximate="tanh")
        return self.w2(gate * self.w3(x))

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, mean=0.0, std=std)
        nn.init.normal_(self.w3.weight, mean=0.0, std=std)
        nn.init.normal_(self.w2.weight, mean=0.0, std=out_std)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then + feed_forward(norm(x)); with `sandwich_norm` each output
    is normed again before it is added (Gemma)."""

    def __init__(self, cfg: ModelConfig, window: int = 0):
        super().__init__()
        self.local_rope = bool(window and cfg.rope_local_theta)  # reads the sliding layers' rotary tables
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        self.attention = Attention(cfg, window)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        self.feed_forward = FeedForward(cfg.dim, ffn_hidden_dim(cfg), cfg.mlp_act)
        if cfg.sandwich_norm:
            self.attn_out_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
            self.ffn_out_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        if hasattr(self, "attn_out_norm"):
            h = x + self.attn_out_norm(self.attention(self.attention_norm(x), cos, sin, segments))
            return h + self.ffn_out_norm(self.feed_forward(self.ffn_norm(h)))
        h = x + self.attention(self.attention_norm(x), cos, sin, segments)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, std: float, out_std: float) -> None:
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()
        if hasattr(self, "attn_out_norm"):
            self.attn_out_norm.init_weights()
            self.ffn_out_norm.init_weights()
        self.attention.init_weights(std, out_std)
        self.feed_forward.init_weights(std, out_std)


class Transformer(nn.Module):
    """The decoder. Prefer `build_model`, which validates, initialises and handles the meta device."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        validate_model_config(cfg, vocab_size)
        self.cfg = cfg
        self.vocab_size = vocab_size
        # built on meta (build_model) and initialised by init_weights: an explicit weight skips nn.Embedding's own
        # normal_ init, whose first call on meta imports torch._refs (~1 s of every launch's preflight and rank)
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(vocab_size, cfg.dim,
                                                                _weight=torch.empty(vocab_size, cfg.dim))
        # a ModuleDict keyed "0", "1", ...: pipeline stages delete entries and the rest keep their names
        windows = layer_windows(cfg)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, windows[i]) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        self.output: nn.Linear | None = nn.Linear(cfg.dim, vocab_size, bias=False)
        self.tie_weights()
        # non-persistent: derived from the config, so checkpoints hold only parameters. Built on meta (build_model)
        # they are only shaped here, and computed by init_buffers: arithmetic on meta runs torch's Python
        # reference ops, whose first use imports torch._dynamo (~1.5 s of every launch's preflight and rank)
        names = ["rope_cos", "rope_sin"] + (["rope_local_cos", "rope_local_sin"] if cfg.rope_local_theta else [])
        for name in names:
            self.register_buffer(name, torch.empty(cfg.max_seq_len, head_dim(cfg) // 2), persistent=False)
        if self.rope_cos.device.type != "meta":
            self.init_buffers()

    def tie_weights(self) -> None:
        """Make the output head use the embedding's Parameter (model.tie_embeddings); again after anything
        that gives either module a new Parameter (meta -> device, tensor parallelism)."""
        tied = self.cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None
        if tied and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight

    def to_empty(self, *, device, recurse: bool = True) -> Transformer:
        """`nn.Module.to_empty`, then re-tie the output head: moving off meta makes a new Parameter per module."""
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                hidden_only: bool = False) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, V).

        A pipeline stage without `tok_embeddings` takes hidden states (B, T, dim); one without `norm` and
        `output` returns hidden states (B, T, dim), and so does `hidden_only=True` (the final norm applied,
        the head not: a chunked loss applies `output` itself, runtime/chunked_loss.py). `positions` (B, T), for
        packed rows (`data.packing`), are each token's position in its own example; a 0 starts an example, and
        attention stays within one.

        Raises:
            ValueError: if T exceeds model.max_seq_len.
        """
        T = tokens.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(
                f"input has {T} tokens but model.max_seq_len is {self.cfg.max_seq_len}; "
                "raise model.max_seq_len or lower data.seq_len"
            )
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens  # (B, T, dim)
        if self.tok_embeddings is not None and self.cfg.embed_scale:
            h = h * torch.tensor(self.cfg.dim ** 0.5, dtype=h.dtype)
        at = slice(None, T) if positions is None else positions
        cos, sin = self.rope_cos[at], self.rope_sin[at]  # (T, D/2), or (B, T, D/2) at packed positions
        local = (self.rope_local_cos[at], self.rope_local_sin[at]) if self.cfg.rope_local_theta else (cos, sin)
        segments = None if positions is None else (positions == 0).cumsum(dim=1)  # (B, T) example ids
        for layer in self.layers.values():
            h = layer(h, *local, segments) if layer.local_rope else layer(h, cos, sin, segments)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None and not hidden_only:
            h = self.logits(h)  # (B, T, V)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head on final hidden states (the norm applied), soft-capped where model.logit_softcap is set."""
        return softcap_logits(self.output(hidden), self.cfg.logit_softcap)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the rotary tables (derived from the config, never saved) in place; draws no random numbers.

        Call after `to_empty(device=...)` when every parameter is then loaded from a checkpoint."""
        cos, sin = rope_tables(head_dim(self.cfg), self.cfg.max_seq_len, self.cfg.rope_theta, self.cfg.rope_scaling,
                               device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        if self.cfg.rope_local_theta:
            cos, sin = rope_tables(head_dim(self.cfg), self.cfg.max_seq_len, self.cfg.rope_local_theta,
                                   device=self.rope_cos.device)
            self.rope_local_cos.copy_(cos)
            self.rope_local_sin.copy_(sin)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and recompute the rotary tables, in place.

        Runs after `to_empty(device=...)` for a model built on meta. Draws from torch's default generator
        in a fixed module order, so the same seed gives the same weights on any build path.
        """
        self.init_buffers()
        std = self.cfg.init_std
        # GPT-2: each block adds two outputs to the residual stream; scale them so its variance stays ~flat
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        for layer in self.layers.values():
            layer.init_weights(std, out_std)
        if self.norm is not None:
            self.norm.init_weights()
        tied = self.tok_embeddings is not None and self.cfg.tie_embeddings
        if self.output is not None and not tied:
            nn.init.normal_(self.output.weight, mean=0.0, std=std)

    def tp_plan(self, sequence_parallel: bool = False) -> dict:
        """Tensor-parallel layout (Megatron-LM, Shoeybi et al. 2019) for `parallelize_module`.

        q/k/v and the MLP gate/up projections are split by output features (heads), the attention and MLP
        output projections by input features, so each block needs one all-reduce forward and one backward
        per sub-layer. The embedding table is split by vocabulary rows and the output head by vocabulary
        columns. With `sequence_parallel` (Korthikanti et al. 2022) the norms and the residual stream are
        split along the sequence between the two, trading the all-reduces for reduce-scatter + all-gather
        pairs and dividing norm activations by the tp degree. Modules a pipeline stage removed are skipped.
        """
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            PrepareModuleInput,
            RowwiseParallel,
            SequenceParallel,
        )

        seq = Shard(1) if sequence_parallel else Replicate()  # layout of the residual stream
        plan = {}
        if self.tok_embeddings is not None:
            plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
        if self.norm is not None and sequence_parallel:
            plan["norm"] = SequenceParallel()
        if self.output is not None:
            plan["output"] = ColwiseParallel(input_layouts=seq, output_layouts=Replicate())
        for name in self.layers:
            p = f"layers.{name}."
            plan.update({
                p + "attention.wq": ColwiseParallel(), p + "attention.wk": ColwiseParallel(),
                p + "attention.wv": ColwiseParallel(), p + "attention.wo": RowwiseParallel(output_layouts=seq),
                p + "feed_forward.w1": ColwiseParallel(), p + "feed_forward.w3": ColwiseParallel(),
                p + "feed_forward.w2": RowwiseParallel(output_layouts=seq),
            })
            # one replicated DTensor input per sub-layer: q/k/v (and gate/up) then share it, so backward
            # all-reduces the input gradient once per sub-layer, not once per projection (measured: 30 -> 18
            # activation all-reduces per micro-batch for 4 layers)
            plan.update({
                p + "attention": PrepareModuleInput(input_layouts=(seq, None, None, None),
                                                    desired_input_layouts=(Replicate(), None, None, None)),
                p + "feed_forward": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            })
            if sequence_parallel:
                plan.update({p + "attention_norm": SequenceParallel(), p + "ffn_norm": SequenceParallel()})
            if self.cfg.qk_norm:  # one weight over every head, heads split: replicated, its gradient summed
                plan.update({p + f"attention.{n}": SequenceParallel(sequence_dim=2, use_local_output=True)
                             for n in ("q_norm", "k_norm")})
            if self.cfg.sandwich_norm and sequence_parallel:  # the outputs arrive split along the sequence
                plan.update({p + n: SequenceParallel(use_local_output=True) for n in ("attn_out_norm", "ffn_out_norm")})
        return plan

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied matrix counts once); optionally without the token embedding table."""
        n = sum(p.numel() for p in self.parameters())  # parameters() already deduplicates tied weights
        if exclude_embeddings and self.tok_embeddings is not None:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 N + 12 n_layers dim seq_len (PaLM appendix B; nanoGPT).

        N excludes the embedding lookup but keeps the output head's matmul, also when it is tied.
        """
        n = self.num_params(exclude_embeddings=True)
        if self.cfg.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            n += self.output.weight.numel()
        return 6.0 * n + 12.0 * self.cfg.n_layers * self.cfg.dim * seq_len


def build_model(cfg: ModelConfig, vocab_size: int, device: str | torch.device = "cpu") -> Transformer:
    """Build the decoder on `device`.

    On "meta" nothing is allocated or initialised: shard first, then `to_empty(device=...)` and
    `init_weights()`. On a real device the model is built on meta and materialised the same way, so a given
    seed yields the same weights on both paths (and construction spends no time on discarded inits).

    Args:
        cfg: the model section of the config.
        vocab_size: resolved vocabulary size (cfg.vocab_size or the tokenizer's).
        device: where the parameters live.

    Returns:
        The model, in train mode.

    Raises:
        ConfigError: (a ValueError) if the config's shapes do not fit together.
    """
    with torch.device("meta"):
        model = Transformer(cfg, vocab_size)
    device = torch.device(device)
    if device.type != "meta":
        model.to_empty(device=device)
        model.init_weights()
    return model
