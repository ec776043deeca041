"""Typed run configuration: a YAML file -> a tree of dataclasses, with dotted `key=value` overrides.

    cfg = load_config("meshtune/configs/pretrain/tiny.yaml", ["optim.lr=1e-3", "train.steps=20"])

Each field's docstring (the string literal under it) is its documentation: `meshtune train --help` prints
them, so the help text and the code cannot disagree. Every user mistake (unknown key, wrong type,
impossible value, missing file) raises `ConfigError` with a one-line message that names the key and the
fix; the CLI prints it and exits with code 2. This module must not import torch.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A user error in a config file or override; the message names the key and the fix."""


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


@dataclass
class DataConfig:
    """Tokenizer and datasets."""

    tokenizer: str = "byte"
    """`byte` for the built-in byte-level tokenizer, or the path of a Hugging Face `tokenizer.json` file."""
    task: str = ""
    """Bundled synthetic task with checkable answers (reverse, sort, rsort, add, arrange); this or data.train_path."""
    train_path: str = ""
    """A local training file: JSONL with `prompt`/`response` or `text` fields, or plain text (.txt)."""
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
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""
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
    eval_every: int = 50
    """Evaluate every this many steps (and at the end); 0 = only at the end."""
    eval_batches: int = 4
    """Micro-batches per rank used by one evaluation; 0 = the whole evaluation split."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
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


RECIPE_NAMES = ("lora", "adapters", "prefix", "prune", "distill", "qat")
"""Recipes `recipe.name` may name; meshtune.recipes registers exactly these (a test keeps them equal)."""


@dataclass
class LoRAConfig:
    """LoRA (Hu et al. 2021): a trainable low-rank update B A added to frozen linear layers."""

    rank: int = 8
    """Rank r of the update B A (B: out x r, A: r x in)."""
    alpha: float = 16.0
    """The update is scaled by recipe.lora.alpha / recipe.lora.rank."""
    dropout: float = 0.0
    """Dropout on the input of the LoRA path only (the frozen path sees the clean input)."""
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    """Linear layers to adapt: patterns matched against the end of module names (`wq`, `attention.wq`,
    `layers.0.*.w1`, fnmatch globs); each pattern must match at least one linear layer."""


@dataclass
class AdapterConfig:
    """Bottleneck adapters (Houlsby et al. 2019) after the attention and/or MLP output of every block."""

    bottleneck: int = 16
    """Hidden size of each adapter (down-project dim -> bottleneck -> up-project to dim)."""
    where: Literal["both", "attention", "mlp"] = "both"
    """Where adapters go: after attention, after the MLP, or both (Houlsby)."""


@dataclass
class PrefixConfig:
    """Prefix tuning (Li & Liang 2021): trainable key/value positions prepended in every attention layer."""

    length: int = 8
    """Prefix positions per layer; 0 = no prefix (the base model exactly); at most model.max_seq_len."""
    reparam_hidden: int = 0
    """0 = train the prefixes directly; > 0 = train them through an MLP of this hidden size (Li & Liang's
    reparameterisation), folded into plain prefixes at export."""


@dataclass
class PruneConfig:
    """Sparse pruning: magnitude (Zhu & Gupta 2017), semi-structured 2:4, or structured (heads, MLP channels)."""

    method: Literal["magnitude", "semi_structured", "structured"] = "magnitude"
    """`magnitude`: zero the smallest weights (unstructured); `semi_structured`: 2:4 sparsity, in every 4
    consecutive input weights keep the 2 largest; `structured`: remove whole attention heads (key/value
    groups) and MLP channels by importance (the same number per layer; export --format shrunk cuts them out)."""
    scope: Literal["global", "layer"] = "global"
    """Magnitude pruning ranks all target weights together (`global`) or each layer on its own (`layer`)."""
    sparsity: float = 0.5
    """Final fraction pruned, in [0, 1): of the target weights (magnitude), of the heads and of the MLP channels
    of every layer (structured); semi_structured (2:4) is always 0.5."""
    start_step: int = 0
    """Optimizer step at which the ramp starts (sparsity 0 there; one-shot pruning computes its masks then)."""
    end_step: int = 0
    """Step at which the cubic ramp reaches recipe.prune.sparsity; <= start_step = one shot at start_step."""
    frequency: int = 10
    """Masks are recomputed every this many steps between start_step and end_step (and re-applied after
    every optimizer step)."""
    importance: Literal["norm", "taylor"] = "norm"
    """Structured only, how heads and channels are ranked: `norm` = the squared norm of the weights that read or
    write the group; `taylor` = the first-order estimate of the loss change when the group is removed, (sum of
    gradient x weight over its weights)^2, averaged over the steps since the last mask update (Molchanov et al.
    2019; where the weights hold no `.grad`, e.g. under DeepSpeed ZeRO, it falls back to norm)."""
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    """Linear layers to prune (magnitude, 2:4): patterns matched against the end of module names (fnmatch)."""


@dataclass
class DistillConfig:
    """Knowledge distillation (Hinton et al. 2015) from a frozen teacher that runs beside the student."""

    teacher: str = ""
    """The teacher: a meshtune run dir (its config.yaml and newest checkpoint), a step_N checkpoint folder, a
    .safetensors file from `meshtune export --format merged`, or a Hugging Face Llama directory. Its
    vocabulary must equal the student's."""
    alpha: float = 0.5
    """Weight of the task loss; the distillation term gets 1 - alpha (alpha=1: plain training)."""
    temperature: float = 2.0
    """Softmax temperature T of both distributions; the KL term is scaled by T^2 (Hinton et al.)."""
    kl: Literal["forward", "reverse"] = "forward"
    """`forward` = KL(teacher || student) (mean-seeking, Hinton); `reverse` = KL(student || teacher)
    (mode-seeking, MiniLLM)."""
    hidden: float = 0.0
    """Weight of hidden-state matching: squared error between the teacher's final hidden state and the
    student's, mapped to the teacher's width by a learned projection (trained, not exported); 0 = off."""
    teacher_shard: Literal["auto", "replicate", "fsdp"] = "auto"
    """How the teacher is laid out: `replicate` = a full copy per rank; `fsdp` = FSDP2-sharded over the
    data-parallel ranks (gathered block by block in its forward; a full copy when there is one dp rank);
    `auto` = fsdp when the student is sharded (parallel.dp_shard > 1)."""


@dataclass
class QuantConfig:
    """Quantization-aware training (torchao QAT): fake-quantized linear layers in training, real int8/int4 at export."""

    scheme: Literal["int8-int4", "int8-int8"] = "int8-int4"
    """int8-int4 = int8 dynamic per-token activations + int4 symmetric weights; int8-int8 = the same with int8
    weights (torchao Int8DynamicActivationIntxWeightConfig). Also the scheme of `meshtune export --format quantized`."""
    group_size: int = 32
    """Weights share one scale per group of this many input features; must divide every targeted layer's
    in_features; 0 = one scale per output channel."""
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    """Linear layers to quantize: patterns matched against the end of module names like recipe.lora.targets
    (default: every transformer-block linear; add `output` for the head). Embeddings are not quantized."""


@dataclass
class RecipeConfig:
    """Fine-tuning and compression recipes applied to the model before it is parallelised."""

    name: str = ""
    """Recipe to apply (`lora`, `adapters`, `prefix`, `prune`, `distill`, `qat`), or several joined by `+` to
    stack them in that order; empty = plain training of every parameter."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Settings of the `lora` recipe."""
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    """Settings of the `adapters` recipe."""
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    """Settings of the `prefix` recipe."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """Settings of the `prune` recipe."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Settings of the `distill` recipe."""
    qat: QuantConfig = field(default_factory=QuantConfig)
    """Settings of the `qat` recipe (and of quantized exports)."""


@dataclass
class Config:
    """A whole run."""

    run_dir: str = ""
    """Directory for this run's config.yaml, metrics.jsonl and checkpoints/; empty = runs/<config name>."""
    init_from: str = ""
    """Start from these model weights (a .safetensors file or a checkpoint directory); empty = random init."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory))


# ---------------------------------------------------------------------------------------------------------
# Building a Config from plain data, with type checks that name the key.


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp` and convert lossless cases (int -> float, '1e-3' -> float)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}; pick one of them")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}; write it as [a, b, ...]")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}; give a value of type {_type_name(tp)}")


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(fields)}"
            raise ConfigError(f"{full}: unknown key; {hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, {} if value is None else value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _parse_override(text: str) -> tuple[list[str], Any]:
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected dotted key=value, e.g. optim.lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted `key=value` pairs (values parsed as YAML) into the nested dict `data`."""
    for text in overrides:
        path, value = _parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:  # absent, or an empty section (`model:` in YAML)
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        hint = "run `meshtune ls` to see the bundled configs" if not p.exists() else "give a YAML file"
        raise ConfigError(f"{path}: config file not found; {hint}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def resolve_config_path(name: str) -> Path:
    """A path as given, or the name of a bundled config (`pretrain/tiny` or `pretrain/tiny.yaml`)."""
    p = Path(name)
    if p.exists():
        return p
    bundled = bundled_configs_dir() / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    return bundled if bundled.exists() else p


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or the defaults when `path` is None), apply overrides, type-check and validate."""
    data = read_yaml(resolve_config_path(str(path))) if path is not None else {}
    apply_overrides(data, list(overrides))
    cfg = _build(Config, data)
    if not cfg.run_dir:
        stem = Path(str(path)).stem if path is not None else "default"
        cfg.run_dir = str(Path("runs") / stem)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks of single values and of values against each other; the world size is checked by the mesh."""
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
                       ("train.stop_after", t.stop_after)]:
        need(value >= 0, f"{key}: must be >= 0, got {value}")
    need(t.log_every > 0, f"train.log_every: must be positive, got {t.log_every}")
    need(c.keep_last >= 1, f"checkpoint.keep_last: must be >= 1 so the newest checkpoint is kept, got {c.keep_last}")
    need(o.lr > 0, f"optim.lr: must be positive, got {o.lr}")
    need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    need(0 <= o.beta1 < 1, f"optim.beta1: must be in [0, 1), got {o.beta1}")
    need(0 <= o.beta2 < 1, f"optim.beta2: must be in [0, 1), got {o.beta2}")
    need(m.head_dim >= 0 and m.head_dim % 2 == 0, f"model.head_dim: must be 0 or even, got {m.head_dim}")
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
    if c.resume not in ("auto", "never"):
        need(Path(c.resume).exists(), f"checkpoint.resume: {c.resume} does not exist; give auto, never or a "
             "checkpoint directory")
    for key, value in [("data.train_path", d.train_path), ("data.eval_path", d.eval_path),
                       ("data.tokenizer", "" if d.tokenizer == "byte" else d.tokenizer)]:
        need(not value or Path(value).is_file(), f"{key}: file {value} not found; give the path of a local file")
    if cfg.init_from:
        need(Path(cfg.init_from).exists(), f"init_from: {cfg.init_from} does not exist; give a .safetensors "
             "file or a checkpoint directory")
    r = cfg.recipe
    names = r.name.split("+") if r.name else []
    for name in names:
        need(name in RECIPE_NAMES, f"recipe.name: unknown recipe {name!r} in {r.name!r}; known: "
             f"{', '.join(RECIPE_NAMES)} (join several with +), or empty for full training")
    need(len(set(names)) == len(names), f"recipe.name: {r.name!r} names a recipe twice; name each once")
    need(r.lora.rank > 0, f"recipe.lora.rank: must be positive, got {r.lora.rank}")
    need(r.lora.alpha > 0, f"recipe.lora.alpha: must be positive, got {r.lora.alpha}")
    need(0 <= r.lora.dropout < 1, f"recipe.lora.dropout: must be in [0, 1), got {r.lora.dropout}")
    need(bool(r.lora.targets), "recipe.lora.targets: empty; name at least one linear layer, e.g. [wq, wv]")
    need(r.adapters.bottleneck > 0, f"recipe.adapters.bottleneck: must be positive, got {r.adapters.bottleneck}")
    need(r.prefix.length >= 0, f"recipe.prefix.length: must be >= 0, got {r.prefix.length}")
    need(r.prefix.length <= m.max_seq_len, f"recipe.prefix.length: {r.prefix.length} exceeds model.max_seq_len="
         f"{m.max_seq_len}; use a shorter prefix")
    need(r.prefix.reparam_hidden >= 0, f"recipe.prefix.reparam_hidden: must be >= 0, got {r.prefix.reparam_hidden}")
    if "prune" in names:
        from meshtune.recipes.prune import check_prune  # lazy: the recipe module imports this one

        check_prune(cfg)
    if "distill" in names:
        kd = r.distill
        need(bool(kd.teacher), "recipe.distill.teacher: empty; give the teacher's run dir, checkpoint, "
             ".safetensors file or Hugging Face directory")
        need(0 <= kd.alpha <= 1, f"recipe.distill.alpha: must be in [0, 1], got {kd.alpha}")
        need(kd.temperature > 0, f"recipe.distill.temperature: must be positive, got {kd.temperature}")
        need(kd.hidden >= 0, f"recipe.distill.hidden: must be >= 0, got {kd.hidden}")
    need(r.qat.group_size >= 0, f"recipe.qat.group_size: must be >= 0 (0 = per output channel), got {r.qat.group_size}")
    need(bool(r.qat.targets), "recipe.qat.targets: empty; name at least one linear layer, e.g. [wq, w1]")
    need("qat" not in names or p.tp == 1, "recipe.name: qat fake-quantizes whole weights, not tensor-parallel "
         "shards; set parallel.tp=1 (DDP and FSDP are supported)")


# ---------------------------------------------------------------------------------------------------------
# Help text from field docstrings, and the bundled configs.


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each dataclass field (its attribute docstring)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def help_text() -> str:
    """Every config key with its type, default and docstring, section by section."""
    lines = []
    top = Config()
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            continue
        lines.append(f"  {f.name} = {getattr(top, f.name)!r}\n      {field_docs(Config).get(f.name, '')}")
    def section_lines(prefix: str, sub: Any) -> None:
        lines.append(f"\n{prefix}: {(type(sub).__doc__ or '').strip()}")
        docs = field_docs(type(sub))
        hints = typing.get_type_hints(type(sub))
        nested = []
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if dataclasses.is_dataclass(value):
                nested.append((f"{prefix}.{f.name}", value))
                continue
            lines.append(f"  {prefix}.{f.name}: {_type_name(hints[f.name])} = {value!r}\n"
                         f"      {docs.get(f.name, '')}")
        for name, value in nested:  # e.g. recipe.lora.*
            section_lines(name, value)

    for section in SECTIONS:
        section_lines(section, getattr(top, section))
    return "\n".join(lines)


def bundled_configs_dir() -> Path:
    return Path(__file__).parent / "configs"


def bundled_configs() -> list[str]:
    root = bundled_configs_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def dump_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
