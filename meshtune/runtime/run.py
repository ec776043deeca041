"""Assemble a run from its config and start it: what `meshtune train` does on every rank.

    config -> DistEnv -> tokenizer -> make_plan(cfg, world) -> ParallelMesh -> datasets, sampler
           -> model (device or meta) -> parallelize -> AdamW + schedule -> resume -> Trainer.fit()

Usable in-process too (tests, notebooks): `train(cfg)` joins an existing process group if there is one.
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from meshtune.artifacts import ArtifactLoader, load_weights
from meshtune.config import ConfigError, dump_yaml, to_dict
from meshtune.data import StepSampler, build_datasets, build_tokenizer
from meshtune.models import build_model
from meshtune.recipes import apply_recipes, build_recipes, count_parameters
from meshtune.runtime.checkpoint import Checkpointer
from meshtune.runtime.data_parallel import unwrap
from meshtune.runtime.engines import build_engine, check_saved_by
from meshtune.runtime.env import DistEnv
from meshtune.runtime.mesh import ParallelMesh
from meshtune.runtime.metrics import Metrics
from meshtune.runtime.parallelize import parallelize
from meshtune.runtime.pipeline_parallel import Pipeline, parts_view, stage_module
from meshtune.runtime.plan import Plan, make_plan
from meshtune.runtime.precision import frozen_dtype, store_frozen, tensor_bytes, use_bf16
from meshtune.runtime.preflight import check_init_from_config, check_run_dir, vocab_size
from meshtune.runtime.trainer import Trainer, lr_lambda
from meshtune.schema import Config


def model_state_bytes(model: torch.nn.Module) -> int:
    """Bytes of model state this rank holds: its parameter shards (as stored: NF4 weights at their packed size),
    plus a gradient and two AdamW moments (fp32) per trainable element (the rank-0 figure of the run's start
    event)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += tensor_bytes(local) + local.numel() * (12 if p.requires_grad else 0)
    return total


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW without weight decay on norms and biases (1-D parameters).

    Fused (one kernel over all parameters) where torch has it for the device: on CPU it also saves the
    per-parameter dispatch that makes the default loop slow on FSDP2's DTensor parameters.
    """
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=fused or None)


def build_schedule(optimizer, cfg: Config) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay (or constant), on the optimizer that steps (an engine's, if it wraps)."""
    o = cfg.optim
    fn = partial(lr_lambda, warmup=o.warmup_steps, total=cfg.train.steps, schedule=o.schedule,
                 min_ratio=o.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), else None."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return None


class Phases:
    """Seconds spent in each named phase since the previous call (the first since construction)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()
        age = _process_age_s()
        if age is not None:  # interpreter start, imports, the CLI: everything before build_trainer
            self.times["process_start"] = round(age, 3)

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = round(now - self._last, 3)
        self._last = now


def data_cache_dir(cfg: Config) -> str | None:
    """Where data files' tokens are cached (`data.cache_dir`), or None (bundled tasks, or `none`)."""
    if cfg.data.task or cfg.data.cache_dir == "none":
        return None
    return cfg.data.cache_dir or str(Path(cfg.run_dir) / "data_cache")


def datasets(cfg: Config, tokenizer, env: DistEnv):
    """The training and evaluation rows. With a token cache and several ranks, the first rank of each node builds
    a missing entry while the others wait (one all-gather of errors, so a bad file fails every rank with its line),
    then every rank maps it."""
    cache = data_cache_dir(cfg)
    if cache is not None and env.world_size > 1:
        error = None
        if env.local_rank == 0:
            try:
                build_datasets(cfg.data, tokenizer, cfg.train.seed, cache)
            except ConfigError as e:
                error = str(e)
        errors = [None] * env.world_size
        dist.all_gather_object(errors, error)
        if any(errors):
            raise ConfigError(next(e for e in errors if e))
    return build_datasets(cfg.data, tokenizer, cfg.train.seed, cache)


def build_trainer(cfg: Config, env: DistEnv | None = None) -> Trainer:
    """Everything a run needs, built and (when a checkpoint exists) restored; call `.fit()` to train."""
    env = env or DistEnv.from_environ()
    phases = Phases()  # seconds per start-up phase, in the start event: where a slow start goes
    if cfg.train.deterministic and env.device.type == "cuda":
        # CPU kernels are already deterministic for a fixed thread count; on CPU the switch would only add
        # fills of every uninitialised tensor (measured: ~180 ms/step under FSDP2)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.use_deterministic_algorithms(True, warn_only=True)
    env.init_process_group(cfg.parallel.timeout_s)
    phases("process_group")
    check_run_dir(cfg.run_dir)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    vocab = vocab_size(cfg, tokenizer)
    source = check_init_from_config(cfg, vocab)  # an HF config.json mismatch before any data or model is built
    plan = make_plan(cfg, env.world_size, vocab)  # the layout `meshtune validate` and `launch` checked
    mesh = ParallelMesh(plan.dims, env.device.type, env.rank)
    seed = cfg.train.seed
    torch.manual_seed(seed)  # the same initial weights on every rank

    phases("checks")
    train_ds, eval_ds = datasets(cfg, tokenizer, env)
    phases("data")
    sampler = StepSampler(len(train_ds), cfg.train.global_batch_size, cfg.train.micro_batch_size,
                          mesh.dp_rank, mesh.dp_size, seed, cfg.data.shuffle)
    assert sampler.accum_steps == plan.accum, (sampler.accum_steps, plan.accum)
    meta = cfg.model.init_device == "meta"
    recipes = build_recipes(cfg.recipe)
    model = build_model(cfg.model, vocab, device="meta" if meta else env.device)
    base_keys = set(model.state_dict())
    model = apply_recipes(model, recipes)  # module swaps before parallelize: adapters shard with their layers
    store_frozen(model, frozen_dtype(cfg.train.frozen_dtype, cfg.train.dtype, env.device))  # before sharding
    for recipe in recipes:
        recipe.setup(model, mesh, env.device, ArtifactLoader())  # state beside the model: a distillation teacher
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}  # the whole model, before any cut
    trainable, total = count_parameters(model)
    param_dtype = torch.bfloat16 if use_bf16(cfg.train.dtype, env.device) else None
    phases("model")
    pipeline = None
    if (pp_mesh := mesh.get("pp")) is not None:
        model, pipeline = build_pipeline(model, cfg, plan, mesh, env.device, param_dtype, pp_mesh, recipes)
    else:
        model = parallelize(model, mesh, cfg.parallel, env.device, param_dtype, recipes=recipes,
                            wrap_ddp=cfg.parallel.engine != "deepspeed")  # DeepSpeed wraps the model itself
    if meta:
        for part in pipeline.parts if pipeline else [model]:
            part = unwrap(part)
            # FSDP2 CPU offload wants its shards materialised in CPU memory; the buffers then go to the device
            part.to_empty(device="cpu" if cfg.parallel.cpu_offload else env.device)
            if source is None:
                part.init_weights()
            else:  # every base weight comes from init_from (check_fits): random values would be overwritten
                part.init_buffers()
            if cfg.parallel.cpu_offload:
                for module in part.modules():
                    for name, buf in module.named_buffers(recurse=False):
                        setattr(module, name, buf.to(env.device))
            for recipe in recipes:
                recipe.init_weights(part)
        if pipeline is not None and source is None:
            pipeline.sync_tied_weights()  # each stage drew its own: the head takes the embedding's values
    for recipe in recipes:
        recipe.after_parallelize(unwrap(model))
    phases("parallelize")
    if source is not None:  # base weights: only the recipes' own tensors may be missing from them
        load_weights(model, source, shapes, shapes.keys() - base_keys, key="init_from")
        phases("init_from")
    checkpointer = Checkpointer(cfg.run_dir, env.rank, cfg.checkpoint.keep_last, model_meta={"vocab_size": vocab},
                                grace_s=env.grace_s)
    checkpointer.remove_stale()
    resume = cfg.checkpoint.resume
    path = checkpointer.latest() if resume == "auto" else None if resume == "never" else Path(resume)
    if path is not None:
        check_saved_by(path, cfg.parallel.engine)  # another engine's files: refused before the engine starts
    optimizer = build_optimizer(model, cfg)
    copies = pipeline.tied_copies() if pipeline is not None else ()  # counted once in the gradient norm
    model, optimizer, engine = build_engine(cfg, mesh, env.device, model, optimizer, plan.accum, copies)
    scheduler = build_schedule(optimizer, cfg)  # after the engine: fairscale's OSS replaces the AdamW
    phases("engine")
    step = 0
    if path is not None:
        state = engine.load(checkpointer, path)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        step = state["step"]
        if env.is_main:
            print(f"meshtune: resumed from {path} at step {step}", flush=True)
        checkpointer.warn_if_slow(state.get("save_s"))
        phases("resume")
    if env.is_main:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "config.yaml").write_text(dump_yaml(cfg))
    metrics = Metrics(cfg.metrics, cfg.run_dir, env.is_main, cfg.train.steps, config_dict=to_dict(cfg),
                      start_step=step)
    # one line per start (a resume adds another): `meshtune report` reads the counts and wall time from it
    metrics.log({"step": step, "event": "start", "trainable_params": trainable, "total_params": total,
                 "world_size": env.world_size, "state_bytes": model_state_bytes(model), "startup_s": phases.times})
    return Trainer(cfg, mesh, env.device, model, optimizer, scheduler, train_ds, eval_ds, sampler,
                   checkpointer, metrics, step=step, pipeline=pipeline, recipes=recipes, engine=engine, plan=plan)


def build_pipeline(model, cfg: Config, plan: Plan, mesh: ParallelMesh, device, param_dtype, pp_mesh, recipes=()):
    """Cut `model` into this rank's pipeline stages (`plan.stage_layers`), parallelise each, and wrap them in
    a schedule. Returns a module viewing this rank's stages under the model's own parameter names, and the
    Pipeline."""
    n = plan.num_stages
    ids = plan.stages_of(mesh.coordinate["pp"])
    chunk = cfg.train.loss_chunk_size
    parts = [parallelize(stage_module(model, list(plan.stage_layers[i]), i == 0, i == n - 1, bool(chunk)), mesh,
                         cfg.parallel, device, param_dtype, recipes=recipes) for i in ids]
    pipeline = Pipeline(parts, ids, n, cfg.parallel, plan.accum, pp_mesh.get_group(), device, cfg.model.dim,
                        tied=cfg.model.tie_embeddings, loss_chunk=chunk)
    return parts_view([unwrap(part) for part in parts]), pipeline


def train(cfg: Config, env: DistEnv | None = None) -> dict:
    """Build and run; returns the trainer's summary (final step, metric history, last evaluation)."""
    return build_trainer(cfg, env).fit()
