"""The plan: how a config lays out on a world size, decided once and used by everyone.

    plan = make_plan(cfg, world_size=8)          # raises ConfigError for an impossible layout
    plan.dims, plan.accum, plan.stage_layers     # the mesh degrees, micro-batches per step, pipeline cut
    plan.describe()                              # 'pp=1 x dp_replicate=1 x dp_shard=8 x tp=1 = 8 ranks (fsdp)'

`build_trainer` builds its mesh, sampler, pipeline and engine from it; `meshtune validate` reports it (and
its memory, runtime/plan_report.py); `meshtune launch` and `meshtune slurm submit` check it before any rank
starts, so the four cannot disagree. No torch import: `--dry-run` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from meshtune.config import ConfigError, ParallelConfig
from meshtune.recipes import check_plan, names_of
from meshtune.runtime.mesh import AXES, ParallelDims
from meshtune.schema import Config

SINGLE_STAGE = ("GPipe", "1F1B")
V_SHAPED = ("ZBVZeroBubble", "DualPipeV")
MULTI_STAGE = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble") + V_SHAPED
SCHEDULES = SINGLE_STAGE + MULTI_STAGE


@dataclass(frozen=True)
class Plan:
    """A run's layout on `world_size` ranks.

    Attributes:
        world_size: ranks in the job.
        dims: the resolved mesh degrees (engines other than native: every rank a data-parallel replica, the
            engine shards state itself).
        engine: `native`, `deepspeed` or `fairscale`.
        zero_stage: the DeepSpeed ZeRO stage (0 for the other engines).
        accum: micro-batches per rank per optimizer step (the pipeline schedule's micro-batch count).
        stages_per_rank: pipeline stages each pp rank runs (1 without pipelining).
        stage_layers: the layer indices of each pipeline stage, in stage order (one stage without pipelining).
        schedule: the pipeline schedule name.
        vocab_size: the resolved vocabulary, where the plan was made with it (0: not known).
    """

    world_size: int
    dims: ParallelDims
    engine: str
    zero_stage: int
    accum: int
    stages_per_rank: int
    stage_layers: tuple[tuple[int, ...], ...]
    schedule: str
    vocab_size: int = 0

    @property
    def num_stages(self) -> int:
        return len(self.stage_layers)

    def stages_of(self, pp_rank: int) -> list[int]:
        """The stage ids pp rank `pp_rank` runs (looped, or V-shaped for the ZB-V / DualPipe-V schedules)."""
        return stage_ids(pp_rank, self.dims.pp, self.stages_per_rank, self.schedule)

    @property
    def mode(self) -> str:
        """How data parallelism runs: fsdp, hsdp, ddp, none, `deepspeed ZeRO-N` or `fairscale OSS + DDP`."""
        if self.engine == "deepspeed":
            return f"deepspeed ZeRO-{self.zero_stage}"
        if self.engine == "fairscale":
            return "fairscale OSS + DDP"
        return self.dims.dp_mode

    @property
    def shards_parameters(self) -> bool:
        """Parameters are sharded over the data-parallel ranks (FSDP2/HSDP, or ZeRO-3)."""
        return self.dims.dp_shard > 1 or (self.engine == "deepspeed" and self.zero_stage == 3)

    def describe(self) -> str:
        return (" x ".join(f"{a}={getattr(self.dims, a)}" for a in AXES) + f" = {self.world_size} ranks "
                f"({self.mode})")


def stages_per_rank(cfg: ParallelConfig) -> int:
    return cfg.pp_stages_per_rank or (1 if cfg.pp_schedule in SINGLE_STAGE else 2)


def split_layers(n_layers: int, num_stages: int, split_points: list[int]) -> list[list[int]]:
    """Layer indices of each stage: `split_points` (first layer of stages 1..n-1) or an even split."""
    if n_layers < num_stages:
        raise ConfigError(f"model.n_layers: {n_layers} layers cannot fill {num_stages} pipeline stages "
                          "(parallel.pp x stages per rank); lower parallel.pp or add layers")
    if split_points:
        if len(split_points) != num_stages - 1 or sorted(set(split_points)) != split_points or \
                not 0 < split_points[0] or split_points[-1] >= n_layers:
            raise ConfigError(f"parallel.pp_split_points: {split_points} must be {num_stages - 1} increasing layer "
                              f"indices in 1..{n_layers - 1} (the first layer of each stage after the first)")
        bounds = [0, *split_points, n_layers]
    else:
        base, extra = divmod(n_layers, num_stages)
        bounds = [0]
        for s in range(num_stages):
            bounds.append(bounds[-1] + base + (1 if s < extra else 0))
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:], strict=False)]


def stage_ids(pp_rank: int, pp: int, per_rank: int, schedule: str) -> list[int]:
    if schedule in V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(per_rank)]


def check_pipeline(cfg: ParallelConfig, n_layers: int, pp: int, n_microbatches: int) -> None:
    """Config errors that need the resolved degrees: stage count, stages per rank, micro-batch count."""
    per_rank = stages_per_rank(cfg)
    if cfg.pp_schedule in SINGLE_STAGE and per_rank != 1:
        raise ConfigError(f"parallel.pp_stages_per_rank: {cfg.pp_schedule} runs one stage per rank; set it to 1 "
                          "or pick Interleaved1F1B")
    if cfg.pp_schedule in V_SHAPED and per_rank != 2:
        raise ConfigError(f"parallel.pp_stages_per_rank: {cfg.pp_schedule} needs exactly 2 stages per rank")
    split_layers(n_layers, pp * per_rank, cfg.pp_split_points)
    if cfg.pp_schedule in MULTI_STAGE and n_microbatches % pp:
        raise ConfigError(f"train.micro_batch_size: {cfg.pp_schedule} needs a micro-batch count divisible by "
                          f"parallel.pp={pp}, got {n_microbatches} (= global batch / (micro x dp)); change "
                          "train.micro_batch_size or train.global_batch_size")
    if n_microbatches < pp and cfg.pp_schedule != "GPipe":
        raise ConfigError(f"train.micro_batch_size: {cfg.pp_schedule} needs at least parallel.pp={pp} micro-"
                          f"batches per step, got {n_microbatches}; lower train.micro_batch_size")


def check_tp_sizes(cfg: Config, tp: int, vocab_size: int | None = None) -> None:
    """Every size tensor parallelism splits must divide by `tp` (the vocabulary too, when known).

    Raises:
        ConfigError: naming the model key tp does not divide.
    """
    if tp == 1:
        return
    from meshtune.models.sizes import ffn_hidden_dim

    m = cfg.model
    sizes = [("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads or m.n_heads),
             ("model.ffn_dim (the MLP hidden size)", ffn_hidden_dim(m))]
    if vocab_size:
        sizes.append(("model.vocab_size", vocab_size))
    for key, size in sizes:
        if size % tp:
            raise ConfigError(f"{key}: {size} is not divisible by parallel.tp={tp}; tensor parallelism splits it "
                              f"evenly, so choose a tp that divides {size} or change {key.split(' ')[0]}")


VOCAB_PARALLEL_RECIPES = ("lora",)  # recipes that leave the embedding and head plain modules and the loss alone


def check_vocab_parallel(cfg: Config, dims: ParallelDims) -> None:
    """parallel.vocab_parallel's layout: native FSDP2 or HSDP (split over dp_shard), full fine-tuning or LoRA.

    Raises:
        ConfigError: naming the key that conflicts and the fix.
    """
    p = cfg.parallel
    off = "or set parallel.vocab_parallel=false"
    if p.engine != "native":
        raise ConfigError(f"parallel.engine: vocab_parallel runs on the native FSDP2 engine, got {p.engine}; "
                          f"set parallel.engine=native {off}")
    if dims.dp_shard < 2:
        raise ConfigError(f"parallel.dp_shard: vocab_parallel splits the vocabulary over dp_shard, got "
                          f"dp_shard={dims.dp_shard}; use parallel.dp_shard > 1 {off}")
    for axis in ("tp", "pp"):
        if getattr(dims, axis) != 1:
            raise ConfigError(f"parallel.{axis}: vocab_parallel runs over the data-parallel axes alone, got {axis}="
                              f"{getattr(dims, axis)}; set parallel.{axis}=1 {off}")
    if p.cpu_offload:
        raise ConfigError(f"parallel.cpu_offload: not supported with vocab_parallel; set parallel.cpu_offload=false "
                          f"{off}")
    other = [n for n in names_of(cfg.recipe) if n not in VOCAB_PARALLEL_RECIPES]
    if other:
        raise ConfigError(f"recipe.name: {'+'.join(other)} is not supported with parallel.vocab_parallel (full "
                          f"fine-tuning and {', '.join(VOCAB_PARALLEL_RECIPES)} are); change recipe.name {off}")


def make_plan(cfg: Config, world_size: int, vocab_size: int | None = None) -> Plan:
    """The layout of `cfg` on `world_size` ranks, every check that needs the world size done.

    Args:
        cfg: a validated config.
        world_size: ranks in the job.
        vocab_size: the resolved vocabulary, when known (tensor parallelism must divide it).

    Raises:
        ConfigError: naming the key and the fix, for a layout that cannot run.
    """
    p, t, m = cfg.parallel, cfg.train, cfg.model
    if world_size < 1:
        raise ConfigError(f"--world-size: must be >= 1, got {world_size}")
    if p.pp_schedule not in SCHEDULES:  # checked with pp=1 too: a typo should not wait for a pipelined run
        raise ConfigError(f"parallel.pp_schedule: {p.pp_schedule!r} is not one of {', '.join(SCHEDULES)}")
    try:
        dims = ParallelDims(p.dp_replicate, p.dp_shard, p.tp, p.pp).resolve(world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if p.engine != "native":  # every rank a replica; the engine shards state itself (tp = pp = 1 by config)
        dims = replace(dims, dp_replicate=dims.world_size, dp_shard=1)
    if p.cpu_offload and (p.engine != "native" or dims.dp_shard == 1):
        raise ConfigError("parallel.cpu_offload: FSDP2 offload needs parallel.engine=native and parallel.dp_shard > 1 "
                          f"(got engine={p.engine}, dp_shard={dims.dp_shard}); DeepSpeed offloads with "
                          "parallel.offload_optimizer / offload_param")
    if p.fsdp_unit != "block" and (p.engine != "native" or dims.dp_shard == 1):
        raise ConfigError(f"parallel.fsdp_unit: {p.fsdp_unit} units are FSDP2's, which needs parallel.engine=native "
                          f"and parallel.dp_shard > 1 (got engine={p.engine}, dp_shard={dims.dp_shard}); set "
                          "parallel.fsdp_unit=block")
    if t.global_batch_size % (t.micro_batch_size * dims.dp):
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not divisible by "
                          f"train.micro_batch_size={t.micro_batch_size} x data-parallel degree {dims.dp}; "
                          f"use a multiple of {t.micro_batch_size * dims.dp}")
    accum = t.global_batch_size // (t.micro_batch_size * dims.dp)
    per_rank, layers = 1, [list(range(m.n_layers))]
    if dims.pp > 1:
        if cfg.data.packing:  # a stage receives hidden states only, not the rows' positions
            raise ConfigError("data.packing: packed rows need their positions on every pipeline stage, which "
                              "parallel.pp > 1 does not pass yet; set data.packing=false or parallel.pp=1")
        check_pipeline(p, m.n_layers, dims.pp, accum)
        per_rank = stages_per_rank(p)
        layers = split_layers(m.n_layers, dims.pp * per_rank, p.pp_split_points)
    check_tp_sizes(cfg, dims.tp, vocab_size)
    if p.vocab_parallel:
        check_vocab_parallel(cfg, dims)
    plan = Plan(world_size, dims, p.engine, p.zero_stage if p.engine == "deepspeed" else 0, accum, per_rank,
                tuple(tuple(x) for x in layers), p.pp_schedule, vocab_size or 0)
    if m.init_device == "meta" and not (p.engine == "native" and (dims.dp_shard > 1 or
                                                                  (dims.dp_replicate > 1 and dims.tp > 1))):
        raise ConfigError("model.init_device: meta needs a sharded model (parallel.dp_shard > 1 with "
                          "parallel.engine=native); use auto")
    check_plan(cfg, plan)  # each named recipe against the layout
    return plan
