"""The core sections of a run config: model, data, optim, parallel, train, checkpoint, metrics.

The `recipe` section belongs to the recipes (each declares its own, meshtune/recipes/) and the whole run's
schema is assembled in meshtune/schema.py. This package imports nothing else of meshtune, and no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from meshtune.config.loader import ConfigError


@dataclass
class ModelConfig:
    """The Llama-style decoder."""

    dim: int = 64
    """Hidden size (width of the residual stream)."""
    n_layers: int = 2
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention (query) heads; must divide model.dim."""
    n_kv_heads: int = 0
    """Key/value heads for grouped-query attention; 0 = same as model.n_heads. Must divide model.n_heads."""
    ffn_dim: int = 0
    """SwiGLU hidden size; 0 = 8/3 * model.dim rounded up to a multiple of 32 (Llama's rule)."""
    vocab_size: int = 0
    """Vocabulary size; 0 = the tokenizer's size rounded up to a multiple of 8."""
    max_seq_len: int = 256
    """Longest sequence the rotary tables are built for; data.seq_len must not exceed it."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    tie_embeddings: bool = False
    """Share the token embedding matrix with the output head."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of linear and embedding weights."""
    init_device: Literal["auto", "meta"] = "auto"
    """`auto` builds and initialises the full model on the training device, then shards it (the same values
    as a single-process run from the same seed); `meta` allocates nothing until the model is sharded and then
    initialises each shard (for models one device cannot hold; values differ from an unsharded init)."""
    head_dim: int = 0
    """Width of one attention head; 0 = model.dim / model.n_heads. Structured pruning sets it when it removes
    heads (fewer heads of the same width), so the shrunk model keeps its weights."""
    family: str = "llama"
    """Model family (meshtune/models/families/): llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3. It names the
    Hugging Face architecture an export writes and the module names recipes address; `init_from=<HF dir>` sets it."""
    rope_scaling: dict = field(default_factory=dict)
    """Scaled rotary embeddings, in Hugging Face's `rope_scaling` keys: {} = plain RoPE, or e.g.
    {rope_type: llama3, factor: 32.0, low_freq_factor: 1.0, high_freq_factor: 4.0,
    original_max_position_embeddings: 8192}; rope_type is one of linear, dynamic, llama3, yarn."""
    attn_bias: bool = False
    """Bias terms on the query, key and value projections (Qwen2 / Qwen2.5)."""
    qk_norm: bool = False
    """RMSNorm over each query and key head before the rotary embedding (Qwen3)."""
    sliding_window: int = 0
    """Attend to at most this many tokens (the current one included); 0 = the whole causal prefix (Mistral)."""
    layer_types: list[Literal["full_attention", "sliding_attention"]] = field(default_factory=list)
    """Per-layer attention kind when only some layers slide; [] = every layer slides when model.sliding_window
    is set."""
    rope_local_theta: float = 0.0
    """Rotary base of the sliding-window layers (plain RoPE, no scaling); 0 = the same tables as every layer
    (Gemma 3: 10000 locally, model.rope_theta globally)."""
    norm_offset: bool = False
    """RMSNorm scales by (1 + weight), its weights stored as offsets from 1 (Gemma)."""
    sandwich_norm: bool = False
    """Also norm the attention and MLP outputs before they join the residual stream (Gemma's four norms)."""
    mlp_act: Literal["silu", "gelu_tanh"] = "silu"
    """Gate activation of the gated MLP: silu (SwiGLU) or tanh-approximated GELU (GeGLU, Gemma)."""
    embed_scale: bool = False
    """Multiply the token embeddings by sqrt(model.dim) (Gemma)."""
    attn_scale: float = 0.0
    """Softmax scale of attention as 1 / sqrt(attn_scale) (Gemma's query_pre_attn_scalar); 0 = the head width."""
    attn_softcap: float = 0.0
    """Soft-cap attention scores to cap * tanh(score / cap) before the softmax (Gemma 2: 50); 0 = off. Attention
    then runs as explicit matmuls and softmax (SDPA has no soft-capping), keeping each layer's (heads, seq, seq)
    scores for backward: `meshtune validate` counts them."""
    logit_softcap: float = 0.0
    """Soft-cap the output logits to cap * tanh(logit / cap) (Gemma 2: 30); 0 = off."""


@dataclass
class DataConfig:
    """Tokenizer and datasets."""

    tokenizer: str = "byte"
    """`byte` for the built-in byte-level tokenizer, or a Hugging Face tokenizer folder (or its `tokenizer.json`):
    special tokens, add-BOS, stop tokens and the chat template come from its config files."""
    task: str = ""
    """Bundled synthetic task with checkable answers (reverse, sort, rsort, add, arrange), or `chat` (multi-turn
    conversations of them, rendered with the chat template); this or data.train_path."""
    train_path: str = ""
    """A local training file: JSONL of conversations (`messages` or ShareGPT `conversations`), `prompt`/`response`
    or `text` records; plain text (.txt); Parquet; or a folder saved by `datasets`' save_to_disk."""
    eval_path: str = ""
    """A local evaluation file in the same formats; empty = a held-out split of the training data."""
    seq_len: int = 64
    """Tokens per training sequence; longer examples are truncated, shorter ones padded."""
    num_train: int = 4096
    """Examples generated for a synthetic task's training split."""
    num_eval: int = 128
    """Examples in the evaluation split (generated for a task, or held out from data.train_path)."""
    shuffle: bool = True
    """Shuffle the training set each epoch (seeded by train.seed)."""
    chat_template: str = ""
    """Jinja chat template for conversations (a file, or the text); empty = the tokenizer folder's own."""
    train_on: Literal["assistant", "last", "all"] = "assistant"
    """Which tokens of a conversation the loss covers: every assistant turn, the last one, or all tokens."""
    cache_dir: str = ""
    """Token cache for data files: tokenized once (by each node's first rank), read by every rank, reused
    on resume and by later runs of the same data, tokenizer, template and seq_len; share one dir between runs.
    Empty = RUN_DIR/data_cache; `none` = tokenize into memory every time."""
    packing: bool = False
    """Pack training examples best-fit into data.seq_len rows; attention never crosses an example and positions
    restart per example. False: one padded row per example (text: one stream cut into rows)."""


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay."""

    lr: float = 3e-3
    """Peak learning rate, reached after optim.warmup_steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of optim.lr at the end of the cosine decay."""
    warmup_steps: int = 10
    """Steps of linear warmup from 0 to optim.lr."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate shape after warmup."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW); not applied to norms and biases."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""


@dataclass
class ParallelConfig:
    """How ranks are laid out on the device mesh. Degrees multiply to the world size; -1 = the rest."""

    dp_replicate: int = 1
    """Replicated data-parallel degree (DDP; the outer axis of HSDP)."""
    dp_shard: int = -1
    """Sharded data-parallel degree (FSDP2 `fully_shard`); -1 = whatever the world size leaves."""
    tp: int = 1
    """Tensor-parallel degree."""
    pp: int = 1
    """Pipeline-parallel degree."""
    pp_schedule: str = "1F1B"
    """Pipeline schedule: GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble or
    DualPipeV. The micro-batch count is the accumulation count: global batch / (micro batch x dp)."""
    pp_stages_per_rank: int = 0
    """Pipeline stages each pp rank runs; 0 = 1 for GPipe/1F1B, 2 for the multi-stage schedules."""
    pp_split_points: list[int] = field(default_factory=list)
    """First layer of each pipeline stage after the first (e.g. [3] for 2 stages of a 6-layer model);
    empty = an even split."""
    sequence_parallel: bool = False
    """With parallel.tp > 1, also split norms and the residual stream along the sequence (less activation
    memory; the same communication volume as plain tensor parallelism)."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after forward (ZeRO-3); false keeps them until backward (ZeRO-2-like)."""
    fsdp_unit: Literal["block", "linear"] = "block"
    """FSDP2 (parallel.engine=native, dp_shard > 1): what one all-gather unshards. `block` = a transformer block;
    `linear` = each projection of a block (attention q/k/v/o, MLP gate/up/down, with its LoRA adapters) on its
    own, the block keeping the rest (norms): about two projections are gathered at once instead of two blocks
    (less peak memory; more, smaller collectives)."""
    activation_checkpointing: bool = False
    """Recompute blocks' activations in backward instead of storing them (every block; see parallel.ac_every
    and parallel.ac_mode)."""
    ac_every: int = 1
    """With activation checkpointing, checkpoint every k-th block (layers 0, k, 2k, ...); 1 = every block, 2 =
    half of them (trades memory for less recompute)."""
    ac_mode: Literal["full", "selective_op"] = "full"
    """With activation checkpointing: `full` recomputes a checkpointed block entirely; `selective_op` keeps its
    matmul and attention outputs and recomputes only the cheap ops between them (norms, activations, rotary)."""
    activation_offload: bool = False
    """Move the activations blocks save for backward to CPU memory during forward and back in backward
    (torch.autograd.graph.save_on_cpu, pinned on CUDA); with activation checkpointing that is each checkpointed
    block's input. On a CPU device it changes nothing (the tensors are already in CPU memory)."""
    cpu_offload: bool = False
    """FSDP2 (parallel.engine=native with dp_shard > 1): keep sharded parameters, gradients and optimizer state
    in CPU memory (CPUOffloadPolicy, pinned where CUDA is present); each block's parameters are copied to the
    device for its compute and the optimizer steps on CPU."""
    vocab_parallel: bool = False
    """FSDP2 or HSDP (parallel.engine=native, dp_shard > 1, tp = pp = 1): keep the embedding and output head split
    by vocabulary rows over the dp_shard ranks (the same split on every dp_replicate replica, gradients averaged
    over them) and never gather them; token ids and hidden states are gathered
    instead and the loss is a vocabulary-parallel cross-entropy (runtime/vocab_parallel.py). For large vocabularies
    (Llama 3's 128K): the root unit no longer holds the whole table. Full fine-tuning and LoRA. Each rank's logits
    are (dp x batch, seq, vocab / dp), as many as without the key: train.loss_chunk_size chunks them too."""
    compile: bool = False
    """Compile each block with torch.compile."""
    timeout_s: float = 600.0
    """Seconds a collective (or any call) may block before the run fails, naming the rank, the operation
    and the ranks that stopped answering (runtime/watchdog.py)."""
    engine: Literal["native", "deepspeed", "fairscale"] = "native"
    """Data-parallel engine: `native` = PyTorch DDP/FSDP2 on the device mesh (the default: every layout,
    DCP checkpoints); `deepspeed` = ZeRO (parallel.zero_stage) through deepspeed.initialize, its config generated
    from this one (pip install meshtune[deepspeed]); `fairscale` = FairScale OSS optimizer-state sharding with
    torch DDP (pip install meshtune[fairscale]). The engines run data parallelism only (tp = pp = 1)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (1: optimizer state, 2: + gradients, 3: + parameters sharded over the ranks)."""
    deepspeed_config: str = ""
    """Optional DeepSpeed JSON merged into the generated config (e.g. communication or offload tuning); a key
    that contradicts a value meshtune generates is an error."""
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """DeepSpeed: offload optimizer state (zero_optimization.offload_optimizer.device)."""
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    """DeepSpeed ZeRO-3: offload parameters (zero_optimization.offload_param.device)."""
    nvme_path: str = ""
    """DeepSpeed: directory for nvme offload (required when an offload device is nvme)."""


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 100
    """Optimizer steps to run."""
    global_batch_size: int = 32
    """Sequences per optimizer step over all data-parallel ranks; fixed when the world size changes."""
    micro_batch_size: int = 8
    """Sequences per forward pass on one rank; accumulation = global / (micro * data-parallel degree)."""
    stop_after: int = 0
    """End this job after this step with a checkpoint, leaving the schedule at train.steps (for time-sliced
    jobs; the next job resumes); 0 = run to train.steps."""
    seed: int = 1234
    """Seeds initialisation, data order and dropout."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision: `auto` = bf16 autocast on GPU, fp32 on CPU (CPU bf16 is much slower)."""
    frozen_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Storage of the weights a PEFT recipe (LoRA, adapters, prefix) freezes: `bf16` halves their memory while
    the trainable ones stay fp32; `auto` = bf16 when the run computes in bf16 (GPU), else fp32. bf16 needs
    train.dtype bf16 (auto on GPU)."""
    eval_every: int = 50
    """Evaluate every this many steps (and at the end); 0 = only at the end."""
    eval_batches: int = 4
    """Micro-batches per rank used by one evaluation; 0 = the whole evaluation split."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    loss_chunk_size: int = 0
    """Compute the output head and the loss in chunks of this many sequence positions, each chunk's logits
    recomputed in backward, so the full (batch, seq, vocab) logits are never held (distillation's KL too);
    0 = off. E.g. 1024 with a 128K vocabulary at seq 8192 holds 1/8 of the logits at a time."""
    deterministic: bool = True
    """Use deterministic CUDA algorithms so a resumed run repeats an uninterrupted one bitwise (CPU kernels
    already are)."""


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (torch.distributed.checkpoint) under run_dir/checkpoints."""

    every: int = 0
    """Save every this many steps; 0 = only at the end."""
    keep_last: int = 2
    """Keep this many newest complete checkpoints; older ones are deleted."""
    resume: str = "auto"
    """`auto` = continue from the newest complete checkpoint in run_dir if any; `never`; or a checkpoint path."""
    save_final: bool = True
    """Save a checkpoint after the last step."""


@dataclass
class MetricsConfig:
    """Metrics: JSONL always; a progress bar and wandb when enabled."""

    progress: bool = True
    """Show a progress bar on rank 0 (only when stdout is a terminal)."""
    wandb: bool = False
    """Log to Weights & Biases (offline mode when WANDB_API_KEY is not set)."""
    wandb_project: str = "meshtune"
    """wandb project name."""


def check_core(cfg) -> None:
    """Checks of the core sections' single values and of values against each other (the world size is
    checked by the plan, each recipe's section by the recipe). `cfg` is the run config.

    Raises:
        ConfigError: naming the key and the fix.
    """
    m, d, o, p, t, c = cfg.model, cfg.data, cfg.optim, cfg.parallel, cfg.train, cfg.checkpoint

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for key, value in [("model.dim", m.dim), ("model.n_layers", m.n_layers), ("model.n_heads", m.n_heads),
                       ("model.max_seq_len", m.max_seq_len), ("data.seq_len", d.seq_len),
                       ("train.steps", t.steps), ("train.global_batch_size", t.global_batch_size),
                       ("train.micro_batch_size", t.micro_batch_size), ("data.num_eval", d.num_eval)]:
        need(value > 0, f"{key}: must be positive, got {value}")
    for key, value in [("model.n_kv_heads", m.n_kv_heads), ("model.ffn_dim", m.ffn_dim),
                       ("model.vocab_size", m.vocab_size), ("optim.warmup_steps", o.warmup_steps),
                       ("optim.weight_decay", o.weight_decay), ("optim.grad_clip", o.grad_clip),
                       ("train.eval_every", t.eval_every), ("train.eval_batches", t.eval_batches),
                       ("checkpoint.every", c.every), ("data.num_train", d.num_train),
                       ("train.stop_after", t.stop_after), ("train.loss_chunk_size", t.loss_chunk_size)]:
        need(value >= 0, f"{key}: must be >= 0, got {value}")
    need(t.log_every > 0, f"train.log_every: must be positive, got {t.log_every}")
    need(c.keep_last >= 1, f"checkpoint.keep_last: must be >= 1 so the newest checkpoint is kept, got {c.keep_last}")
    need(o.lr > 0, f"optim.lr: must be positive, got {o.lr}")
    need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    need(0 <= o.beta1 < 1, f"optim.beta1: must be in [0, 1), got {o.beta1}")
    need(0 <= o.beta2 < 1, f"optim.beta2: must be in [0, 1), got {o.beta2}")
    need(m.head_dim >= 0 and m.head_dim % 2 == 0, f"model.head_dim: must be 0 or even, got {m.head_dim}")
    for key in ("attn_softcap", "logit_softcap"):
        need(math.isfinite(getattr(m, key)) and getattr(m, key) >= 0,
             f"model.{key}: must be a finite number >= 0 (0 = off), got {getattr(m, key)}")
    if not m.head_dim:
        need(m.dim % m.n_heads == 0, f"model.dim: {m.dim} is not divisible by model.n_heads={m.n_heads}")
        need((m.dim // m.n_heads) % 2 == 0, f"model.dim / model.n_heads must be even for rotary embeddings, got "
             f"{m.dim // m.n_heads}; change model.dim or model.n_heads")
    kv = m.n_kv_heads or m.n_heads
    need(m.n_heads % kv == 0, f"model.n_kv_heads: {kv} does not divide model.n_heads={m.n_heads}")
    need(d.seq_len <= m.max_seq_len, f"data.seq_len: {d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
         "lower data.seq_len or raise model.max_seq_len")
    need(bool(d.task) != bool(d.train_path), "data.task / data.train_path: set exactly one of them "
         "(a bundled task name, or a local file)")
    need(t.global_batch_size % t.micro_batch_size == 0, f"train.global_batch_size: {t.global_batch_size} is not "
         f"a multiple of train.micro_batch_size={t.micro_batch_size}")
    for key in ("dp_replicate", "dp_shard", "tp", "pp"):
        value = getattr(p, key)
        need(value == -1 or value >= 1, f"parallel.{key}: must be >= 1 or -1 (the rest of the world), got {value}")
    if p.tp > 1:
        for key, heads in (("model.n_heads", m.n_heads), ("model.n_kv_heads", kv)):
            need(heads % p.tp == 0, f"{key}: {heads} heads cannot be split over parallel.tp={p.tp}; choose a tp "
                 f"that divides {heads}")
    need(p.ac_every >= 1, f"parallel.ac_every: must be >= 1 (1 = every block), got {p.ac_every}")
    need(p.activation_checkpointing or (p.ac_every == 1 and p.ac_mode == "full"), "parallel.ac_every / "
         "parallel.ac_mode: they choose what activation checkpointing does; set parallel.activation_checkpointing"
         "=true")
    need(p.timeout_s > 0, f"parallel.timeout_s: must be positive, got {p.timeout_s}")
    need(p.zero_stage in (1, 2, 3), f"parallel.zero_stage: {p.zero_stage} is not a ZeRO stage; pick 1, 2 or 3")
    need(not p.deepspeed_config or Path(p.deepspeed_config).is_file(), f"parallel.deepspeed_config: file "
         f"{p.deepspeed_config} not found; give the path of a DeepSpeed JSON file")
    need(p.offload_param == "none" or p.zero_stage == 3, "parallel.offload_param: parameter offload needs "
         "parallel.zero_stage=3")
    need("nvme" not in (p.offload_optimizer, p.offload_param) or bool(p.nvme_path), "parallel.nvme_path: "
         "nvme offload needs a directory; set parallel.nvme_path")
    if p.engine != "native":
        need(p.tp == 1 and p.pp == 1, f"parallel.engine: {p.engine} runs data parallelism only, got parallel.tp="
             f"{p.tp} pp={p.pp}; set parallel.engine=native for tensor or pipeline parallelism")
    need(p.engine != "fairscale" or p.dp_shard in (-1, 1), f"parallel.dp_shard: {p.dp_shard} asks for sharded "
         "parameters, and FairScale's FSDP needs CUDA streams (it now lives in PyTorch as FSDP2); use "
         "parallel.engine=native for FSDP2, or dp_shard=1 for FairScale OSS + DDP")
    need(not (t.loss_chunk_size and p.tp != 1 and p.sequence_parallel), "train.loss_chunk_size: a chunked loss "
         "does not split sequence-parallel hidden states; set parallel.sequence_parallel=false or "
         "train.loss_chunk_size=0")
    need(not (t.loss_chunk_size and p.engine == "deepspeed" and p.zero_stage == 3), "train.loss_chunk_size: "
         "DeepSpeed ZeRO-3 gathers the head only inside forward; use parallel.zero_stage 1 or 2, or "
         "train.loss_chunk_size=0")
    if c.resume not in ("auto", "never"):
        need(Path(c.resume).exists(), f"checkpoint.resume: {c.resume} does not exist; give auto, never or a "
             "checkpoint directory")
    need(not (d.task and d.eval_path), f"data.eval_path: {d.eval_path} would be ignored: data.task={d.task} "
         "generates its own evaluation split; drop data.eval_path, or train on a file with data.train_path")
    need(not cfg.run_dir or not Path(cfg.run_dir).is_file(), f"run_dir: {cfg.run_dir} is a file; give a "
         "directory (it is created if missing)")
    for key, value in [("data.train_path", d.train_path), ("data.eval_path", d.eval_path)]:
        need(not value or Path(value).exists(), f"{key}: {value} not found; give the path of a local file or folder")
    tok = "" if d.tokenizer == "byte" else d.tokenizer
    need(not tok or Path(tok).is_file() or (Path(tok) / "tokenizer.json").is_file(), f"data.tokenizer: {tok} not "
         "found (or a folder without tokenizer.json); give a Hugging Face tokenizer folder or its tokenizer.json")
    if cfg.init_from:
        need(Path(cfg.init_from).exists(), f"init_from: {cfg.init_from} does not exist; give a .safetensors "
             "file or a checkpoint directory")
