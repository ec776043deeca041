"""`meshtune validate`: check a config against a world size and estimate per-rank memory, without training.

The model is built on the meta device (no memory, any size), the degrees are resolved against the world
size, and the batch split is checked. Memory per rank, fp32 master weights with AdamW:
    parameters 4 B per parameter this rank holds (its FSDP/TP shards of its pipeline stages, counted exactly
    by building its layout on the meta device with a fake process group), gradients 4 B and optimizer state
    8 B per trainable one
    activations per micro-batch ~ 34 * layers * tokens * dim bytes in 16-bit (Korthikanti et al. 2022, with
    fused scaled-dot-product attention, which stores no score matrix; tensor parallelism divides 24 of the
    34 terms by tp, sequence parallelism all of them), doubled for fp32; with activation
    checkpointing each block keeps only its input, plus one block's full activations during recompute.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.distributed.tensor import DTensor

from meshtune.config import Config, ConfigError
from meshtune.data import build_tokenizer, get_task, load_records
from meshtune.models import build_model
from meshtune.recipes import apply_recipes, build_recipes
from meshtune.runtime.mesh import AXES, ParallelDims, ParallelMesh, fake_process_group
from meshtune.runtime.parallelize import parallelize
from meshtune.runtime.pipeline_parallel import (
    check_pipeline,
    split_layers,
    stage_ids,
    stage_module,
    stages_per_rank,
)
from meshtune.runtime.run import vocab_size
from meshtune.runtime.tensor_parallel import check_tp, check_tp_recipes


def _gb(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def _short(ranks: list[int]) -> str:
    return str(ranks) if len(ranks) <= 8 else f"[{', '.join(map(str, ranks[:4]))}, ..., {ranks[-1]}] ({len(ranks)})"


def _rank_layout(cfg: Config, dims: ParallelDims, vocab: int, rank: int) -> dict:
    """Build `rank`'s share of the model exactly as training would (meta device, fake process group):
    its mesh groups, its pipeline stages, its DTensor shards; count what it holds."""
    p = replace(cfg.parallel, compile=False, activation_checkpointing=False)
    cpu = torch.device("cpu")
    with fake_process_group(rank, dims.world_size):
        mesh = ParallelMesh(dims, "cpu", rank)
        model = apply_recipes(build_model(cfg.model, vocab, device="meta"), build_recipes(cfg.recipe))
        if dims.pp > 1:
            per_rank = stages_per_rank(p)
            n_stages = dims.pp * per_rank
            split = split_layers(cfg.model.n_layers, n_stages, p.pp_split_points)
            ids = stage_ids(mesh.coordinate["pp"], dims.pp, per_rank, p.pp_schedule)
            parts = [stage_module(model, split[i], i == 0, i == n_stages - 1) for i in ids]
        else:
            parts = [model]
        parts = [parallelize(part, mesh, p, cpu, wrap_ddp=False) for part in parts]
        unique = {id(q): q for part in parts for q in part.parameters()}.values()
        local = [(q.to_local() if isinstance(q, DTensor) else q, q.requires_grad) for q in unique]
        groups = {a: mesh.get(a).mesh.flatten().tolist() for a in AXES if mesh.get(a) is not None}
        return {"rank": rank, "params": sum(t.numel() for t, _ in local), "groups": groups,
                "trainable": sum(t.numel() for t, g in local if g), "layers": sum(len(x.layers) for x in parts)}


def describe_plan(cfg: Config, world_size: int) -> str:
    """A short report of the layout and per-rank memory; raises ConfigError for an impossible plan."""
    if world_size < 1:
        raise ConfigError(f"--world-size: must be >= 1, got {world_size}")
    p, t, m = cfg.parallel, cfg.train, cfg.model
    try:
        dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp).resolve(world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
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
    check_tp_recipes(cfg, dims.tp)
    build_recipes(cfg.recipe)
    n = build_model(m, vocab, device="meta").num_params()
    # the exact per-rank layout, built on a fake world: the first rank of each pipeline stage group
    per_stage = world_size // dims.pp
    layouts = [_rank_layout(cfg, dims, vocab, s * per_stage) for s in range(dims.pp)]
    busiest = max(layouts, key=lambda x: x["params"])
    seq, dim = cfg.data.seq_len, m.dim
    bytes_per_elem = 4 if t.dtype == "fp32" else 2  # auto = bf16 on the GPUs a plan is made for
    # Korthikanti et al.: tensor parallelism divides 24 of the 34 sbh terms, sequence parallelism all of them
    factor = 34 / dims.tp if p.sequence_parallel else 10 + 24 / dims.tp
    per_layer = t.micro_batch_size * seq * dim * factor / 2 * bytes_per_elem
    layers = busiest["layers"]
    # micro-batches whose activations a stage holds at once: all of them under GPipe, up to pp under 1F1B
    in_flight = 1 if dims.pp == 1 else accum if p.pp_schedule == "GPipe" else min(accum, dims.pp)
    if p.activation_checkpointing:
        act = layers * t.micro_batch_size * seq * dim * bytes_per_elem * in_flight + per_layer
    else:
        act = layers * per_layer * in_flight
    params, trainable = busiest["params"], busiest["trainable"]
    state = 4 * params + 4 * trainable + 8 * trainable
    lines = [f"layout: {' x '.join(f'{a}={getattr(dims, a)}' for a in AXES)} = {world_size} ranks "
             f"({dims.dp_mode})",
             f"batch: global {t.global_batch_size} = micro {t.micro_batch_size} x dp {dims.dp} x accumulation "
             f"{accum}; {t.global_batch_size * seq:,} tokens per step"]
    for axis in AXES:
        group = busiest["groups"].get(axis)
        where = f"rank {busiest['rank']}'s group {_short(group)}" if group else "-"
        lines.append(f"  {axis:<13} degree {getattr(dims, axis):>5}  {where}")
    lines += [f"model: {n:,} parameters; recipe: {cfg.recipe.name or 'none (full training)'}",
              f"per rank (busiest: rank {busiest['rank']}, {layers} layers): {params:,} parameters "
              f"({trainable:,} trainable); parameters {_gb(4 * params)}, gradients {_gb(4 * trainable)}, "
              f"AdamW state {_gb(8 * trainable)}, activations ~{_gb(act)} "
              f"({'fp32' if bytes_per_elem == 4 else 'bf16'}); total ~{_gb(state + act)}"]
    return "\n".join(lines + data_lines)
