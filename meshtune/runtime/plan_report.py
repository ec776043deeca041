"""`meshtune validate`: a config's plan on a world size, with per-rank memory, without training.

The layout is `meshtune.runtime.plan.make_plan`'s, the same object the trainer builds from. Parameters per
rank are counted exactly by building the busiest rank's share on the meta device with a fake process group
(its pipeline stages, DTensor shards); memory per rank, fp32 master weights with AdamW:
    parameters 4 B per parameter the rank holds, gradients 4 B and optimizer state 8 B per trainable one,
    divided over the data-parallel ranks where the engine shards them (FSDP2: all three; DeepSpeed ZeRO-1:
    optimizer state, ZeRO-2: + gradients, ZeRO-3: + parameters; FairScale OSS: optimizer state);
    activations and logits per micro-batch in flight from the decoder's own shapes (runtime/memory_plan.py,
    checked against counted saved tensors), with each lever on and off: chunked loss, activation checkpointing
    modes, activation offload (saved activations in CPU memory), FSDP2 CPU offload (parameters, gradients and
    optimizer state leave the device).
Parameters are counted as stored (`tensor_bytes`): QLoRA's NF4 projections, embedding and head at their packed
bytes. Not counted: the NF4 head's dequantized chunk while it runs (2^22 weights, ~40 MiB with its indices and
products at most; recipes/qlora/nf4.py).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.distributed.tensor import DTensor

from meshtune.data import build_tokenizer
from meshtune.data.files import iter_records
from meshtune.models import build_model
from meshtune.recipes import apply_recipes, build_recipes
from meshtune.runtime.memory_plan import Shapes, activation_bytes, logits_bytes
from meshtune.runtime.mesh import AXES, ParallelMesh, fake_process_group
from meshtune.runtime.parallelize import parallelize
from meshtune.runtime.pipeline_parallel import stage_module
from meshtune.runtime.plan import Plan
from meshtune.runtime.precision import frozen_dtype, store_frozen, tensor_bytes
from meshtune.runtime.preflight import preflight, vocab_size
from meshtune.runtime.vocab_parallel import vocab_shard_of
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
        # frozen weights as the run stores them (train.frozen_dtype; auto = bf16 on the GPUs a plan is made for)
        store_frozen(model, frozen_dtype(cfg.train.frozen_dtype, cfg.train.dtype, torch.device("cuda")))
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
        heads = [x.output for x in parts if getattr(x, "output", None) is not None]
        return {"rank": rank, "params": sum(t.numel() for t, _ in local), "groups": groups,
                "param_bytes": sum(tensor_bytes(t) for t, _ in local),
                "trainable": sum(t.numel() for t, g in local if g), "layers": sum(len(x.layers) for x in parts),
                "layer_ids": sorted(int(i) for x in parts for i in x.layers),
                "head": bool(heads), "head_trains": any(h.weight.requires_grad for h in heads),
                # FSDP2's gathered bytes without and with activation checkpointing
                **{key: _gathered_bytes(parts, plan.dims.dp_shard, ac) if mesh.get("fsdp") is not None else 0
                   for key, ac in (("gathered", False), ("gathered_ac", True))}}


def _bytes(params) -> int:
    """Stored bytes of this rank's share of `params`, each Parameter once."""
    return sum(tensor_bytes(q.to_local() if isinstance(q, DTensor) else q) for q in {id(q): q for q in params}.values())


def _gathered_bytes(parts: list, shards: int, checkpointing: bool = False) -> int:
    """FSDP2's unsharded parameters at the busiest moment: the root unit (embeddings, final norm, head; kept
    gathered all step) and two blocks (the one computing and the prefetched next), plus one all-gather buffer of
    the largest unit while it is copied out into the unsharded parameters. With parallel.vocab_parallel the
    embedding and head are never gathered (runtime/vocab_parallel.py): they count as held shards only.

    With parallel.fsdp_unit=linear (projection units inside the blocks, runtime/fsdp_units.py) the two largest
    projections take the blocks' place, with what the block units keep (norms) of two blocks; under activation
    checkpointing (`checkpointing`) one projection more: a block's last projection stays gathered while the others
    are recomputed. Counted against the gathered bytes of a run: tests/distributed/test_fsdp_units.py."""
    from torch.distributed.fsdp import FSDPModule

    root, blocks, projections, rests = 0, [0], [0], [0]
    for part in parts:
        in_blocks = set()
        if vocab_shard_of(part) is not None:  # split by vocabulary rows, outside FSDP2: never gathered
            in_blocks |= {id(part.tok_embeddings.weight), id(part.output.weight)}
        for block in part.layers.values():
            own = {id(q): q for q in block.parameters()}
            in_blocks |= own.keys()
            blocks.append(_bytes(own.values()))
            inner = [m for m in block.modules() if m is not block and isinstance(m, FSDPModule)]
            projections += [_bytes(m.parameters()) for m in inner]
            in_inner = {id(q) for m in inner for q in m.parameters()}
            rests.append(_bytes(q for i, q in own.items() if i not in in_inner))
        root += _bytes(q for q in part.parameters() if id(q) not in in_blocks)
    if len(projections) > 1:  # parallel.fsdp_unit=linear
        held = sorted(projections, reverse=True)[:3 if checkpointing else 2] + sorted(rests, reverse=True)[:2]
        return shards * (root + sum(held) + max(root, *projections, *rests))
    blocks = sorted(blocks, reverse=True)
    return shards * (root + sum(blocks[:2]) + max(root, blocks[0]))


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


def describe_plan(cfg: Config, world_size: int, device_memory: float | None = None) -> str:
    """A short report of the plan and per-rank memory, with each memory lever on and off (and, given
    `device_memory` bytes, which fit); raises ConfigError for an impossible plan."""
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
    seq = cfg.data.seq_len
    bytes_per_elem = 4 if t.dtype == "fp32" else 2  # auto = bf16 on the GPUs a plan is made for
    layers = busiest["layer_ids"]
    # micro-batches whose activations a stage holds at once: all of them under GPipe, up to pp under 1F1B
    accum = plan.accum
    in_flight = 1 if dims.pp == 1 else accum if p.pp_schedule == "GPipe" else min(accum, dims.pp)
    shapes = model_shapes(cfg, vocab, dims.tp)
    tokens = t.micro_batch_size * seq * in_flight
    params, trainable = busiest["params"], busiest["trainable"]
    sp, sg, so = engine_shards(plan)
    state = {"parameters": busiest["param_bytes"] / sp, "gradients": 4 * trainable / sg,
             "optimizer": 8 * trainable / so}
    has_head = busiest["head"]  # the last pipeline stage holds the logits

    def levers(chunk: int, ac: bool, every: int, mode: str, offload: bool,
               act_offload: bool = p.activation_offload, units: dict = busiest) -> dict[str, float]:
        act = activation_bytes(shapes, tokens, layers, bytes_per_elem, ac, every, mode, act_offload)
        logit = logits_bytes(shapes, t.micro_batch_size, seq, bytes_per_elem, chunk,
                             busiest["head_trains"])["peak"] if has_head else 0.0
        row = {k: (0.0 if offload else v) for k, v in state.items()}
        return {**row, "gathered": units["gathered_ac" if ac else "gathered"], "activations": act, "logits": logit}

    now = levers(t.loss_chunk_size, p.activation_checkpointing, p.ac_every, p.ac_mode, p.cpu_offload)
    act = now["activations"]
    mem_p, mem_g, mem_o = state["parameters"], state["gradients"], state["optimizer"]
    lines = [f"layout: {plan.describe()}" + (" + vocabulary-parallel embedding and head (never gathered)"
                                            if p.vocab_parallel else ""),
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
              f"per rank (busiest: rank {busiest['rank']}, {len(layers)} layers): {held} parameters "
              f"({trainable // sp:,} trainable); parameters {_gb(mem_p)}, gradients {_gb(mem_g)}, "
              f"AdamW state {_gb(mem_o)}, activations ~{_gb(act)} "
              f"({'fp32' if bytes_per_elem == 4 else 'bf16'}); total ~{_gb(mem_p + mem_g + mem_o + act)}"]
    linear = None  # parallel.fsdp_unit=linear as a lever: the same rank's layout with projection units
    if plan.engine == "native" and dims.dp_shard > 1 and p.fsdp_unit == "block":
        linear = _rank_layout(replace(cfg, parallel=replace(p, fsdp_unit="linear")), plan, vocab, busiest["rank"])
    lines += lever_table(now, levers, cfg, plan, device_memory, linear)
    return "\n".join(lines + data_lines)


def model_shapes(cfg: Config, vocab: int, tp: int) -> Shapes:
    """The widths the memory formulas need, per tensor-parallel rank (heads and the MLP split over tp)."""
    from meshtune.models.sizes import ffn_hidden_dim, head_dim

    m = cfg.model
    hd = head_dim(m)
    return Shapes(dim=m.dim, q=m.n_heads * hd // tp, kv=(m.n_kv_heads or m.n_heads) * hd // tp,
                  ffn=ffn_hidden_dim(m) // tp, heads=m.n_heads // tp, vocab=vocab)


def lever_table(now: dict, levers, cfg: Config, plan: Plan, device_memory: float | None,
                linear: dict | None = None) -> list[str]:
    """Per-rank bytes with each memory lever switched on alone (from the config as it is), and which fit;
    `linear`: the busiest rank's layout with parallel.fsdp_unit=linear, when that is a lever here."""
    t, p = cfg.train, cfg.parallel
    # parallel.vocab_parallel refuses a chunked loss (its logits are already 1 / dp_shard of the vocabulary per rank)
    chunk = 0 if p.vocab_parallel else t.loss_chunk_size or min(1024, cfg.data.seq_len)
    rows = [("as configured", now)]
    if chunk:
        rows.append((f"train.loss_chunk_size={chunk}", levers(chunk, p.activation_checkpointing, p.ac_every, p.ac_mode,
                                                               p.cpu_offload)))
    rows += [("activation_checkpointing (all blocks)", levers(t.loss_chunk_size, True, 1, "full", p.cpu_offload)),
            ("ac_every=2", levers(t.loss_chunk_size, True, 2, "full", p.cpu_offload)),
            ("ac_mode=selective_op", levers(t.loss_chunk_size, True, 1, "selective_op", p.cpu_offload))]
    if plan.engine == "native" and plan.dims.dp_shard > 1 and not p.vocab_parallel:
        rows.append(("cpu_offload (params, grads, AdamW state on CPU)",
                     levers(t.loss_chunk_size, p.activation_checkpointing, p.ac_every, p.ac_mode, True)))
    rows.append(("activation_offload (saved activations on CPU)",
                 levers(t.loss_chunk_size, p.activation_checkpointing, p.ac_every, p.ac_mode, p.cpu_offload, True)))
    if linear is not None:
        rows.append(("fsdp_unit=linear (one projection gathered)",
                     levers(t.loss_chunk_size, p.activation_checkpointing, p.ac_every, p.ac_mode, p.cpu_offload,
                            units=linear)))
    offload = plan.engine == "native" and plan.dims.dp_shard > 1 and not p.vocab_parallel
    rows.append(("all levers", levers(chunk, True, 1, "full", offload, True, **({"units": linear} if linear else {}))))
    keys = ("parameters", "gradients", "optimizer", "gathered", "activations", "logits")
    out = ["memory levers, per rank on the device (GiB): " + " / ".join(keys) + " = total"]
    for name, row in rows:
        total = sum(row[k] for k in keys)
        fits = "" if device_memory is None else ("  fits" if total <= device_memory else "  does not fit")
        out.append(f"  {name:<48} " + " / ".join(f"{row[k] / 2**30:.3f}" for k in keys) + f" = {total / 2**30:.3f}"
                   + fits)
    if device_memory is not None:
        fit = [name for name, row in rows if sum(row[k] for k in keys) <= device_memory]
        out.append(f"device memory {_gb(device_memory)}: " + (
            f"fits with: {', '.join(fit)}" if fit else "no lever alone fits; add ranks (dp_shard, tp or pp)"))
    return out
