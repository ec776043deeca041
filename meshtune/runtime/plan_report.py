"""`meshtune validate`: a config's plan on a world size, with per-rank memory, without training.

The layout is `meshtune.runtime.plan.make_plan`'s, the same object the trainer builds from. Parameters per
rank are counted exactly by building the busiest rank's share on the meta device with a fake process group
(its pipeline stages, DTensor shards); memory per rank, fp32 master weights with AdamW:
    parameters 4 B per parameter the rank holds, gradients 4 B and optimizer state 8 B per trainable one,
    divided over the data-parallel ranks where the engine shards them (FSDP2: all three; DeepSpeed ZeRO-1:
    optimizer state, ZeRO-2: + gradients, ZeRO-3: + parameters; FairScale OSS: optimizer state);
    activations per micro-batch ~ 34 * layers * tokens * dim bytes in 16-bit (Korthikanti et al. 2022, with
    fused scaled-dot-product attention, which stores no score matrix; tensor parallelism divides 24 of the
    34 terms by tp, sequence parallelism all of them), doubled for fp32; with activation checkpointing each
    block keeps only its input, plus one block's full activations during recompute.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.distributed.tensor import DTensor

from meshtune.data import build_tokenizer
from meshtune.data.files import iter_records
from meshtune.models import build_model
from meshtune.recipes import apply_recipes, build_recipes
from meshtune.runtime.mesh import AXES, ParallelMesh, fake_process_group
from meshtune.runtime.parallelize import parallelize
from meshtune.runtime.pipeline_parallel import stage_module
from meshtune.runtime.plan import Plan
from meshtune.runtime.precision import tensor_bytes
from meshtune.runtime.preflight import preflight, vocab_size
from meshtune.schema import Config


def _gb(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def _short(ranks: list[int]) -> str:
    return str(ranks) if len(ranks) <= 8 else f"[{', '.join(map(str, ranks[:4]))}, ..., {ranks[-1]}] ({len(ranks)})"


def _rank_layout(cfg: Config, plan: Plan, vocab: int, rank: int) -> dict:
    """Build `rank`'s share of the model exactly as training would (meta device, fake process group):
    its mesh groups, its pipeline stages, its DTensor shards; count what it holds."""
    p = replace(cfg.parallel, compile=False, activation_checkpointing=False)
    cpu = torch.device("cpu")
    with fake_process_group(rank, plan.world_size):
        mesh = ParallelMesh(plan.dims, "cpu", rank)
        recipes = build_recipes(cfg.recipe)
        model = apply_recipes(build_model(cfg.model, vocab, device="meta"), recipes)
        if plan.dims.pp > 1:
            n = plan.num_stages
            parts = [stage_module(model, list(plan.stage_layers[i]), i == 0, i == n - 1)
                     for i in plan.stages_of(mesh.coordinate["pp"])]
        else:
            parts = [model]
        parts = [parallelize(part, mesh, p, cpu, wrap_ddp=False, recipes=recipes) for part in parts]
        unique = {id(q): q for part in parts for q in part.parameters()}.values()
        local = [(q.to_local() if isinstance(q, DTensor) else q, q.requires_grad) for q in unique]
        groups = {a: mesh.get(a).mesh.flatten().tolist() for a in AXES if mesh.get(a) is not None}
        return {"rank": rank, "params": sum(t.numel() for t, _ in local), "groups": groups,
                "param_bytes": sum(tensor_bytes(t) for t, _ in local),  # NF4 weights at their packed size
                "trainable": sum(t.numel() for t, g in local if g), "layers": sum(len(x.layers) for x in parts)}


def engine_shards(plan: Plan) -> tuple[int, int, int]:
    """How many ranks share the (parameters, gradients, optimizer state) an engine shards itself (native
    sharding is in the counted layout already)."""
    dp = plan.dims.dp
    if plan.engine == "deepspeed":
        stage = plan.zero_stage
        return (dp if stage >= 3 else 1), (dp if stage >= 2 else 1), dp
    if plan.engine == "fairscale":
        return 1, 1, dp
    return 1, 1, 1


def describe_plan(cfg: Config, world_size: int) -> str:
    """A short report of the plan and per-rank memory; raises ConfigError for an impossible plan."""
    t, m, p = cfg.train, cfg.model, cfg.parallel
    plan = preflight(cfg, world_size)  # every check a rank would make at start-up
    vocab = vocab_size(cfg, build_tokenizer(cfg.data.tokenizer))
    dims = plan.dims
    data_lines = []
    for key, path in (("data.train_path", cfg.data.train_path), ("data.eval_path", cfg.data.eval_path)):
        if path:
            data_lines.append(f"{key}: {sum(1 for _ in iter_records(path, key)):,} records in {path}")
    n = build_model(m, vocab, device="meta").num_params()
    # the exact per-rank layout, built on a fake world: the first rank of each pipeline stage group
    per_stage = world_size // dims.pp
    layouts = [_rank_layout(cfg, plan, vocab, s * per_stage) for s in range(dims.pp)]
    busiest = max(layouts, key=lambda x: x["params"])
    seq, dim = cfg.data.seq_len, m.dim
    bytes_per_elem = 4 if t.dtype == "fp32" else 2  # auto = bf16 on the GPUs a plan is made for
    # Korthikanti et al.: tensor parallelism divides 24 of the 34 sbh terms, sequence parallelism all of them
    factor = 34 / dims.tp if p.sequence_parallel else 10 + 24 / dims.tp
    per_layer = t.micro_batch_size * seq * dim * factor / 2 * bytes_per_elem
    layers = busiest["layers"]
    # micro-batches whose activations a stage holds at once: all of them under GPipe, up to pp under 1F1B
    accum = plan.accum
    in_flight = 1 if dims.pp == 1 else accum if p.pp_schedule == "GPipe" else min(accum, dims.pp)
    if p.activation_checkpointing:
        act = layers * t.micro_batch_size * seq * dim * bytes_per_elem * in_flight + per_layer
    else:
        act = layers * per_layer * in_flight
    params, trainable = busiest["params"], busiest["trainable"]
    sp, sg, so = engine_shards(plan)
    mem_p, mem_g, mem_o = busiest["param_bytes"] / sp, 4 * trainable / sg, 8 * trainable / so
    lines = [f"layout: {plan.describe()}",
             f"batch: global {t.global_batch_size} = micro {t.micro_batch_size} x dp {dims.dp} x accumulation "
             f"{accum}; {t.global_batch_size * seq:,} tokens per step"]
    for axis in AXES:
        group = busiest["groups"].get(axis)
        where = f"rank {busiest['rank']}'s group {_short(group)}" if group else "-"
        lines.append(f"  {axis:<13} degree {getattr(dims, axis):>5}  {where}")
    if dims.pp > 1:
        lines.append(f"pipeline: {plan.num_stages} stages ({p.pp_schedule}), layers per stage "
                     f"{[len(x) for x in plan.stage_layers]}")
    held = f"{params // sp:,}" if sp > 1 else f"{params:,}"
    lines += [f"model: {n:,} parameters; recipe: {cfg.recipe.name or 'none (full training)'}",
              f"per rank (busiest: rank {busiest['rank']}, {layers} layers): {held} parameters "
              f"({trainable // sp:,} trainable); parameters {_gb(mem_p)}, gradients {_gb(mem_g)}, "
              f"AdamW state {_gb(mem_o)}, activations ~{_gb(act)} "
              f"({'fp32' if bytes_per_elem == 4 else 'bf16'}); total ~{_gb(mem_p + mem_g + mem_o + act)}"]
    return "\n".join(lines + data_lines)
