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
    optimizer state leave the device);
    FSDP2's gathered units (the root, two blocks; with parallel.fsdp_unit=linear two or three projections), a
    unit's gradient reduce-scatter buffers, and the largest dequantization one call makes (QLoRA's NF4 weights:
    the modules' own `dequantized_bytes`).
The peak is the model state plus the busiest moment of a step (`memory_plan.step_moments`: the root's gather, a
block's compute, a unit's reduce-scatter, the loss), not the sum of every term's own largest: those never
coexist. Checked against the bytes torch's CPU allocator holds at the step's peak (bench/counted_rank.py,
bench/bench_lora_memory.py: a Llama-3.2-1B-shaped LoRA run in fp32, bf16, NF4 and NF4 + offload within 1%).
Parameters are counted as stored (`tensor_bytes`): QLoRA's NF4 projections, embedding and head at their packed
bytes.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.distributed.tensor import DTensor

from meshtune.config import ConfigError
from meshtune.data import build_tokenizer
from meshtune.data.files import iter_records
from meshtune.models import build_model
from meshtune.recipes import apply_recipes, build_recipes
from meshtune.runtime.memory_plan import Shapes, activation_bytes, block_elems_per_token, logits_bytes, step_moments
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
        fsdp = mesh.get("fsdp") is not None
        units = _gathered_bytes(parts, plan.dims.dp_shard) if fsdp else {"root": 0, "blocks": [0, 0],
                                                                          "blocks_ac": [0, 0]}
        return {"rank": rank, "params": sum(t.numel() for t, _ in local), "groups": groups,
                "param_bytes": sum(tensor_bytes(t) for t, _ in local),
                "trainable": sum(t.numel() for t, g in local if g), "layers": sum(len(x.layers) for x in parts),
                "layer_ids": sorted(int(i) for x in parts for i in x.layers),
                "head": bool(heads), "head_trains": any(h.weight.requires_grad for h in heads),
                "units": units, "gathered": units["root"] + max(units["root"], sum(units["blocks"])),
                "dequantized": dequantized_bytes(parts, cfg.train.micro_batch_size * cfg.data.seq_len),
                "reduced": _reduced_bytes(parts, plan.dims.dp_shard) if fsdp else 0}


def _local(q):
    return q.to_local() if isinstance(q, DTensor) else q


def _units(parts: list) -> tuple[list, list]:
    """The FSDP2 units of `parts`, this rank's parameters of each (each Parameter once, in no unit inside it):
    ([(block unit's own, [its projection units' own, ...]) per block], [the root's own per part]). With
    parallel.vocab_parallel the embedding and head belong to no unit (runtime/vocab_parallel.py)."""
    from torch.distributed.fsdp import FSDPModule

    blocks, roots = [], []
    for part in parts:
        taken = set()
        if vocab_shard_of(part) is not None:  # split by vocabulary rows, outside FSDP2: never gathered
            taken |= {id(part.tok_embeddings.weight), id(part.output.weight)}
        for block in part.layers.values():
            inner = []
            for m in block.modules():  # parallel.fsdp_unit=linear: the projections' units
                if m is not block and isinstance(m, FSDPModule):
                    inner.append([q for q in {id(q): q for q in m.parameters()}.values() if id(q) not in taken])
                    taken |= {id(q) for q in inner[-1]}
            own = [q for q in {id(q): q for q in block.parameters()}.values() if id(q) not in taken]
            taken |= {id(q) for q in own}
            blocks.append((own, inner))
        roots.append([q for q in {id(q): q for q in part.parameters()}.values() if id(q) not in taken])
    return blocks, roots


def _gathered_bytes(parts: list, shards: int) -> dict[str, int]:
    """FSDP2's unsharded parameters per unit: `root` (embeddings, final norm, head: gathered at the start of forward
    and kept all step) and `blocks`, the two largest blocks (at any moment one block computes while the next one's
    all-gather output fills). A unit's all-gather output and its unsharded parameters coexist only while it is
    copied out, which overlaps no other block's gathered parameters (counted: bench/counted_rank.py); the root's
    moment is `root` twice. With parallel.vocab_parallel the embedding and head are never gathered
    (runtime/vocab_parallel.py): they count as held shards only.

    With parallel.fsdp_unit=linear (runtime/fsdp_units.py) `blocks` are the two largest projections, each with what
    a block unit keeps (its norms); `blocks_ac`, under activation checkpointing, adds the third largest: a block's
    last projection stays gathered while the others are recomputed (counted: tests/distributed/test_fsdp_units.py).
    Without projection units `blocks_ac` is `blocks`."""
    def nbytes(qs) -> int:
        return shards * sum(tensor_bytes(_local(q)) for q in qs)
    blocks, roots = _units(parts)
    root = sum(nbytes(r) for r in roots)
    whole = sorted((nbytes(own) + sum(nbytes(p) for p in inner) for own, inner in blocks), reverse=True) + [0, 0]
    projections = sorted((nbytes(p) for _, inner in blocks for p in inner), reverse=True)
    if not projections:
        return {"root": root, "blocks": whole[:2], "blocks_ac": whole[:2]}
    rest = max(nbytes(own) for own, _ in blocks)
    held = [p + rest for p in projections[:2]] + [0, 0]
    return {"root": root, "blocks": held[:2], "blocks_ac": held[:2] + projections[2:3]}


def _reduced_bytes(parts: list, shards: int) -> int:
    """The most trainable bytes one FSDP2 unit (a block, a projection of parallel.fsdp_unit=linear, or the root:
    what is in no block) reduces: its unsharded fp32 gradients (gradients reduce in fp32)."""
    def gathered(qs) -> int:
        return sum(shards * _local(q).numel() for q in qs if q.requires_grad)
    blocks, roots = _units(parts)
    return 4 * max([0, *(gathered(r) for r in roots), *(gathered(own) for own, _ in blocks),
                    *(gathered(p) for _, inner in blocks for p in inner)])


def dequantized_bytes(parts: list, tokens: int) -> int:
    """The most any one module allocates at once to dequantize a stored weight (QLoRA's NF4 projections, head and
    embedding: their `dequantized_bytes`) for a micro-batch of `tokens` tokens; 0 without such modules."""
    return max((m.dequantized_bytes(tokens) for part in parts for m in part.modules()
                if callable(getattr(m, "dequantized_bytes", None))), default=0)


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


def planned_memory(cfg: Config, world_size: int) -> dict:
    """Per-rank memory of the busiest rank, as configured (bytes): parameters, gradients, optimizer, gathered,
    activations, logits, dequantized (each at its own largest), `moments` (runtime/memory_plan.step_moments),
    `total` (the peak on the device), `host` (what cpu_offload keeps in host memory); with the plan, the rank's
    layout, its model `state` wherever it lives, and `levers(chunk, ac, every, mode, offload, act_offload)` giving
    the same row for other levers.
    Raises ConfigError for an impossible plan."""
    t, p = cfg.train, cfg.parallel
    plan = preflight(cfg, world_size)  # every check a rank would make at start-up
    vocab = vocab_size(cfg, build_tokenizer(cfg.data.tokenizer))
    dims = plan.dims
    # the exact per-rank layout, built on a fake world: the first rank of each pipeline stage group
    per_stage = world_size // dims.pp
    layouts = [_rank_layout(cfg, plan, vocab, s * per_stage) for s in range(dims.pp)]
    busiest = max(layouts, key=lambda x: x["params"])
    seq = cfg.data.seq_len
    elem = 4 if t.dtype == "fp32" else 2  # auto = bf16 on the GPUs a plan is made for
    layers = busiest["layer_ids"]
    # micro-batches whose activations a stage holds at once: all of them under GPipe, up to pp under 1F1B
    accum = plan.accum
    in_flight = 1 if dims.pp == 1 else accum if p.pp_schedule == "GPipe" else min(accum, dims.pp)
    shapes = model_shapes(cfg, vocab, dims.tp)
    tokens = t.micro_batch_size * seq * in_flight
    trainable = busiest["trainable"]
    sp, sg, so = engine_shards(plan)
    state = {"parameters": busiest["param_bytes"] / sp, "gradients": 4 * trainable / sg,
             "optimizer": 8 * trainable / so}
    def levers(chunk: int, ac: bool, every: int, mode: str, offload: bool,
               act_offload: bool = p.activation_offload, layout: dict = busiest) -> dict:
        units = layout["units"]
        blocks = units["blocks_ac" if ac else "blocks"]  # parallel.fsdp_unit=linear: one more held when recomputing
        act = activation_bytes(shapes, tokens, layers, elem, ac, every, mode, act_offload)
        logit = (logits_bytes(shapes, t.micro_batch_size, seq, elem, chunk, busiest["head_trains"],
                              dims.dp_shard if p.vocab_parallel else 1, bool(cfg.model.logit_softcap))
                 if busiest["head"] else {"kept": 0.0, "peak": 0.0, "held": 0.0})  # the last stage's logits
        row = {k: (0.0 if offload else v) for k, v in state.items()}
        own = 0.0 if act_offload else block_elems_per_token(shapes, "none", elem) * tokens * elem  # a block's own
        moments = step_moments(units["root"], blocks, act, logit, busiest["dequantized"], layout["reduced"],
                               min(own, act))
        return {**row, "gathered": units["root"] + max(units["root"], sum(blocks)), "activations": act,
                "logits": logit["peak"],
                "dequantized": busiest["dequantized"], "moments": moments,
                "total": sum(row.values()) + max(moments.values()),
                "host": sum(state.values()) if offload else 0.0}

    now = levers(t.loss_chunk_size, p.activation_checkpointing, p.ac_every, p.ac_mode, p.cpu_offload)
    return {**now, "plan": plan, "vocab": vocab, "layout": busiest, "levers": levers, "elem": elem, "state": state}


def linear_units_layout(cfg: Config, now: dict) -> dict | None:
    """The busiest rank's layout with parallel.fsdp_unit=linear, where that is a lever of `now`'s plan (native FSDP2
    sharding on block units), else None."""
    plan, p = now["plan"], cfg.parallel
    if plan.engine != "native" or plan.dims.dp_shard < 2 or p.fsdp_unit != "block":
        return None
    return _rank_layout(replace(cfg, parallel=replace(p, fsdp_unit="linear")), plan, now["vocab"],
                        now["layout"]["rank"])


def vocab_parallel_rows(cfg: Config, world_size: int, now: dict) -> list[tuple[str, dict]]:
    """Lever rows for parallel.vocab_parallel (alone, and with fsdp_unit=linear) where a config without it allows
    it: the plan of the same config with the key set (no cpu_offload: it refuses that)."""
    t, p = cfg.train, cfg.parallel
    if p.vocab_parallel or now["plan"].engine != "native" or now["plan"].dims.dp_shard < 2:
        return []
    keyed = replace(cfg, parallel=replace(p, vocab_parallel=True, cpu_offload=False))
    try:
        vp = planned_memory(keyed, world_size)
    except ConfigError:  # a layout or recipe it does not support: no row
        return []
    rows = [("vocab_parallel (embedding/head by vocab rows)", vp)]
    if (linear := linear_units_layout(keyed, vp)) is not None:
        rows.append(("vocab_parallel + fsdp_unit=linear", vp["levers"](
            t.loss_chunk_size, p.activation_checkpointing, p.ac_every, p.ac_mode, False, layout=linear)))
    return rows


def describe_plan(cfg: Config, world_size: int, device_memory: float | None = None) -> str:
    """A short report of the plan and per-rank memory, with each memory lever on and off (and, given
    `device_memory` bytes, which fit); raises ConfigError for an impossible plan."""
    t, p = cfg.train, cfg.parallel
    now = planned_memory(cfg, world_size)
    plan, busiest, sp = now["plan"], now["layout"], engine_shards(now["plan"])[0]
    dims, seq = plan.dims, cfg.data.seq_len
    data_lines = []
    for key, path in (("data.train_path", cfg.data.train_path), ("data.eval_path", cfg.data.eval_path)):
        if path:
            data_lines.append(f"{key}: {sum(1 for _ in iter_records(path, key)):,} records in {path}")
    n = build_model(cfg.model, now["vocab"], device="meta").num_params()
    act, layers = now["activations"], busiest["layer_ids"]
    params, trainable = busiest["params"], busiest["trainable"]
    mem_p, mem_g, mem_o = (now["state"][k] for k in ("parameters", "gradients", "optimizer"))
    lines = [f"layout: {plan.describe()}" + (" + vocabulary-parallel embedding and head (never gathered)"
                                            if p.vocab_parallel else ""),
             f"batch: global {t.global_batch_size} = micro {t.micro_batch_size} x dp {dims.dp} x accumulation "
             f"{plan.accum}; {t.global_batch_size * seq:,} tokens per step"]
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
              f"({'fp32' if now['elem'] == 4 else 'bf16'}); total ~{_gb(mem_p + mem_g + mem_o + act)}"]
    lines += lever_table(now, now["levers"], cfg, plan, device_memory, linear_units_layout(cfg, now),
                         vocab_parallel_rows(cfg, world_size, now))
    if p.cpu_offload:
        lines.append(f"cpu_offload: {_gb(now['host'])} per rank of parameters, gradients and AdamW state in host "
                     f"memory (on a CPU device the same memory: {_gb(now['total'] + now['host'])} in all)")
    return "\n".join(lines + data_lines)


def model_shapes(cfg: Config, vocab: int, tp: int) -> Shapes:
    """The widths the memory formulas need, per tensor-parallel rank (heads and the MLP split over tp)."""
    from meshtune.models.sizes import ffn_hidden_dim, head_dim

    m = cfg.model
    hd = head_dim(m)
    return Shapes(dim=m.dim, q=m.n_heads * hd // tp, kv=(m.n_kv_heads or m.n_heads) * hd // tp,
                  ffn=ffn_hidden_dim(m) // tp, heads=m.n_heads // tp, vocab=vocab,
                  scores=m.n_heads // tp * cfg.data.seq_len if m.attn_softcap else 0)


def lever_table(now: dict, levers, cfg: Config, plan: Plan, device_memory: float | None,
                linear: dict | None = None, more: list[tuple[str, dict]] = ()) -> list[str]:
    """Per-rank bytes with each memory lever switched on alone (from the config as it is), and which fit;
    `linear`: the busiest rank's layout with parallel.fsdp_unit=linear, where that is a lever; `more`: further
    (name, row) pairs (vocab_parallel_rows)."""
    t, p = cfg.train, cfg.parallel
    chunk = t.loss_chunk_size or min(1024, cfg.data.seq_len)
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
                            layout=linear)))
    offload = plan.engine == "native" and plan.dims.dp_shard > 1 and not p.vocab_parallel
    rows.append(("all levers", levers(chunk, True, 1, "full", offload, True, **({"layout": linear} if linear else {}))))
    rows += more
    keys = ("parameters", "gradients", "optimizer", "gathered", "activations", "logits", "dequantized")
    out = ["memory levers, per rank on the device (GiB): " + " / ".join(keys) + " -> peak",
           "  (each at its own largest; peak = parameters + gradients + optimizer + the busiest moment of the step)"]
    for name, row in rows:
        total = row["total"]
        fits = "" if device_memory is None else ("  fits" if total <= device_memory else "  does not fit")
        out.append(f"  {name:<48} " + " / ".join(f"{row[k] / 2**30:.3f}" for k in keys) + f" -> {total / 2**30:.3f}"
                   + fits)
    out.append("moments beyond the model state, as configured (GiB): " + ", ".join(
        f"{k} {v / 2**30:.3f}" for k, v in now["moments"].items()))
    if device_memory is not None:
        fit = [name for name, row in rows if row["total"] <= device_memory]
        out.append(f"device memory {_gb(device_memory)}: " + (
            f"fits with: {', '.join(fit)}" if fit else "no lever alone fits; add ranks (dp_shard, tp or pp)"))
    return out
