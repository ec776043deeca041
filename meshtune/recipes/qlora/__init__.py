"""QLoRA (Dettmers et al. 2023): LoRA on a frozen base stored as NF4; config section, checks and declaration.
The layers are in recipe.py. The adapter's settings (rank, alpha, dropout, targets) are `recipe.lora`'s."""

from __future__ import annotations

from dataclasses import dataclass

from meshtune.config import ConfigError
from meshtune.models.families import DECODER
from meshtune.models.sizes import ffn_hidden_dim, head_dim
from meshtune.recipes.registry import RecipeSpec, forward_to, is_active, names_of
from meshtune.recipes.targets import matches_any

# recipes that rewrite or fake-quantize the base weights (or are LoRA itself): they cannot share them with NF4
_EXCLUSIVE = ("lora", "qat", "prune")


@dataclass
class QLoRAConfig:
    """QLoRA: the base weights of the `recipe.lora.targets` layers stored as 4-bit NormalFloat (torchao NF4,
    double-quantized block scales); the LoRA adapter (`recipe.lora.*`) trains in the compute dtype."""

    block_size: int = 64
    """Weights per NF4 block sharing one absmax scale (torchao's default 64); must divide each targeted
    weight's element count."""
    scaler_block_size: int = 256
    """Block scales per int8 double-quantization group (torchao's default 256); each targeted weight's element
    count must be a multiple of block_size * scaler_block_size."""
    quantize_embeddings: bool = True
    """Store the frozen token embedding and output head (one matrix when model.tie_embeddings) as NF4 too, in
    blocks of block_size and scale groups of at most scaler_block_size that never cross a row (any vocabulary
    then splits over FSDP2 ranks by rows); needs an even block_size dividing model.dim. A 128K-vocabulary
    embedding is a fifth of a 1B model. False keeps both in full precision, as the QLoRA paper and bitsandbytes
    do: with NF4, every logit comes from a head whose weights are each off by up to half a code gap times
    their block's absmax."""


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def target_shapes(m, targets: list[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of each block projection `targets` select, from model.* alone (no torch)."""
    n, hd, kv = DECODER, head_dim(m), m.n_kv_heads or m.n_heads
    hidden = ffn_hidden_dim(m)
    shapes = {n.q: (m.n_heads * hd, m.dim), n.k: (kv * hd, m.dim), n.v: (kv * hd, m.dim),
              n.o: (m.dim, m.n_heads * hd), n.gate: (hidden, m.dim), n.up: (hidden, m.dim), n.down: (m.dim, hidden)}
    return {n.leaf(k): s for k, s in shapes.items() if matches_any(n.leaf(k), targets)}


def check(cfg) -> None:
    q = cfg.recipe.qlora
    _need(q.block_size > 0, f"recipe.qlora.block_size: must be positive, got {q.block_size}")
    _need(q.scaler_block_size > 0, f"recipe.qlora.scaler_block_size: must be positive, got {q.scaler_block_size}")
    if not is_active(cfg, "qlora"):
        return
    other = [n for n in names_of(cfg.recipe) if n in _EXCLUSIVE]
    _need(not other, f"recipe.name: qlora cannot be stacked with {'+'.join(other)} (qlora is LoRA on an NF4 base "
          f"and {other[0] if other else ''} changes the base weights); name one of them")
    _need(cfg.model.init_device != "meta" or bool(cfg.init_from), "model.init_device: meta with qlora needs "
          "init_from (NF4 weights are quantized from loaded weights, not initialised); set init_from or "
          "model.init_device=auto")
    group = q.block_size * q.scaler_block_size
    for name, (rows, cols) in target_shapes(cfg.model, cfg.recipe.lora.targets).items():
        _need(rows * cols % group == 0, f"recipe.qlora.block_size: {name} has {rows}x{cols} weights, not a multiple "
              f"of block_size * scaler_block_size = {q.block_size}*{q.scaler_block_size}; pick sizes whose product "
              f"divides {rows * cols} (e.g. recipe.qlora.scaler_block_size=1) or drop {name} from recipe.lora.targets")
    _need(not q.quantize_embeddings or (cfg.model.dim % q.block_size == 0 and q.block_size % 2 == 0),
          f"recipe.qlora.quantize_embeddings: the NF4 embedding's rows are model.dim={cfg.model.dim} wide, which "
          f"needs an even block_size dividing it (got {q.block_size}); pick one, or set "
          "recipe.qlora.quantize_embeddings=false to keep the embedding and head in full precision")


def check_plan(cfg, plan) -> None:
    """NF4 weights shard whole rows and whole scale groups under FSDP2; no tensor-parallel sharding (torchao's NF4
    has no DTensor colwise/rowwise support); no DDP (its start-up broadcast re-quantizes NF4 weights)."""
    d = plan.dims
    _need(d.tp == 1, f"recipe.name: qlora stores base weights as NF4, which torchao cannot split for tensor "
          f"parallelism; set parallel.tp=1 (got {d.tp}; FSDP2, DDP and pipeline parallelism are supported)")
    _need(plan.engine == "native", f"parallel.engine: qlora's NF4 weights run on the native engine only, got "
          f"{plan.engine}; set parallel.engine=native (its FSDP2 shards them as NF4)")
    _need(d.dp_mode != "ddp", f"parallel.dp_replicate: qlora runs data parallelism through FSDP2, not DDP (DDP's "
          f"start-up broadcast re-quantizes the NF4 weights); set parallel.dp_shard={d.dp_replicate} "
          "parallel.dp_replicate=1")
    shard = d.dp_shard
    q = cfg.recipe.qlora
    group = q.block_size * q.scaler_block_size
    for name, (rows, cols) in target_shapes(cfg.model, cfg.recipe.lora.targets).items():
        _need(rows % shard == 0 and (rows * cols // group) % shard == 0,
              f"parallel.dp_shard: FSDP2 splits each NF4 weight into {shard} equal row shards of whole "
              f"scale groups, and {name} ({rows}x{cols}, {rows * cols // group} groups of {group}) does not "
              f"split evenly; pick a dp_shard dividing both, or a smaller recipe.qlora.scaler_block_size")
    v = plan.vocab_size  # the embedding's scale groups never cross a row (nf4.row_scaler_block_size)
    _need(not (q.quantize_embeddings and v) or v % shard == 0, f"parallel.dp_shard: FSDP2 splits the NF4 embedding "
          f"into {shard} equal row shards, and its {v} rows (model.vocab_size) do not split evenly; pick a dp_shard "
          "dividing them, a model.vocab_size that it divides, or recipe.qlora.quantize_embeddings=false")


def _implementation():
    from meshtune.recipes.qlora.recipe import QLoRARecipe

    return QLoRARecipe


SPEC = RecipeSpec("qlora", QLoRAConfig, "Settings of the `qlora` recipe (the adapter's are recipe.lora's).",
                  _implementation, check=check, check_plan=check_plan, mergeable=True,
                  export_formats=lambda c: ("adapter", "peft"))
__getattr__ = forward_to("meshtune.recipes.qlora.recipe")
