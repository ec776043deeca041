"""`meshtune validate`: check a config against a world size and estimate per-rank memory, without training.

The model is built on the meta device (no memory, any size), the degrees are resolved against the world
size, and the batch split is checked. Memory per rank, fp32 master weights with AdamW:
    parameters 4 B, gradients 4 B, optimizer state 8 B per parameter, divided by dp_shard x tp
    activations per micro-batch ~ 34 * layers * tokens * dim bytes in 16-bit (Korthikanti et al. 2022, with
    fused scaled-dot-product attention, which stores no score matrix; tensor parallelism divides 24 of the
    34 terms by tp, sequence parallelism all of them), doubled for fp32; with activation
    checkpointing each block keeps only its input, plus one block's full activations during recompute.
"""

from __future__ import annotations

from meshtune.config import Config, ConfigError
from meshtune.data import build_tokenizer, get_task, load_records
from meshtune.models import build_model
from meshtune.runtime.mesh import AXES, ParallelDims
from meshtune.runtime.pipeline_parallel import check_pipeline
from meshtune.runtime.run import vocab_size
from meshtune.runtime.tensor_parallel import check_tp


def _gb(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def describe_plan(cfg: Config, world_size: int) -> str:
    """A short report of the layout and per-rank memory; raises ConfigError for an impossible plan."""
    if world_size < 1:
        raise ConfigError(f"--world-size: must be >= 1, got {world_size}")
    p, t, m = cfg.parallel, cfg.train, cfg.model
    try:
        dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp).resolve(world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if dims.tp > 1 and dims.dp_mode == "ddp":
        raise ConfigError("parallel.tp > 1 with DDP (dp_replicate > 1, dp_shard = 1) is not supported; shard "
                          "the data-parallel axis instead: parallel.dp_shard=-1 parallel.dp_replicate=1")
    if t.global_batch_size % (t.micro_batch_size * dims.dp):
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not divisible by "
                          f"train.micro_batch_size={t.micro_batch_size} x data-parallel degree {dims.dp}; "
                          f"use a multiple of {t.micro_batch_size * dims.dp}")
    accum = t.global_batch_size // (t.micro_batch_size * dims.dp)
    if dims.pp > 1:
        check_pipeline(p, m.n_layers, dims.pp, accum)
        if m.tie_embeddings:
            raise ConfigError("model.tie_embeddings: the embedding and the head sit on different pipeline stages; "
                              "set model.tie_embeddings=false or parallel.pp=1")
    if cfg.data.task:
        get_task(cfg.data.task)
    data_lines = []
    for key, path in (("data.train_path", cfg.data.train_path), ("data.eval_path", cfg.data.eval_path)):
        if path:  # parse once here, so a malformed line is reported before any rank starts
            data_lines.append(f"{key}: {len(load_records(path, key)):,} records in {path}")
    vocab = vocab_size(cfg, build_tokenizer(cfg.data.tokenizer))
    check_tp(m, vocab, dims.tp)
    model = build_model(m, vocab, device="meta")
    n = model.num_params()
    shard = dims.dp_shard * dims.tp * dims.pp  # tp-replicated norms, uneven stages: a slight underestimate
    state = n * (4 + 4 + 8) / shard
    seq, dim = cfg.data.seq_len, m.dim
    bytes_per_elem = 4 if t.dtype == "fp32" else 2  # auto = bf16 on the GPUs a plan is made for
    # Korthikanti et al.: tensor parallelism divides 24 of the 34 sbh terms, sequence parallelism all of them
    factor = 34 / dims.tp if p.sequence_parallel else 10 + 24 / dims.tp
    per_layer = t.micro_batch_size * seq * dim * factor / 2 * bytes_per_elem
    layers = -(-m.n_layers // dims.pp)  # on the busiest stage
    # micro-batches whose activations a stage holds at once: all of them under GPipe, up to pp under 1F1B
    in_flight = 1 if dims.pp == 1 else accum if p.pp_schedule == "GPipe" else min(accum, dims.pp)
    if p.activation_checkpointing:
        act = layers * t.micro_batch_size * seq * dim * bytes_per_elem * in_flight + per_layer
    else:
        act = layers * per_layer * in_flight
    lines = [f"layout: {' x '.join(f'{a}={getattr(dims, a)}' for a in AXES)} = {world_size} ranks "
             f"({dims.dp_mode})",
             f"batch: global {t.global_batch_size} = micro {t.micro_batch_size} x dp {dims.dp} x accumulation "
             f"{accum}; {t.global_batch_size * seq:,} tokens per step",
             f"model: {n:,} parameters ({model.num_params(exclude_embeddings=True):,} without embeddings)",
             f"per rank: {n // shard:,} parameters; parameters {_gb(4 * n / shard)}, gradients "
             f"{_gb(4 * n / shard)}, AdamW state {_gb(8 * n / shard)}, activations ~{_gb(act)} "
             f"({'fp32' if bytes_per_elem == 4 else 'bf16'}); "
             f"total ~{_gb(state + act)}"]
    return "\n".join(lines + data_lines)
