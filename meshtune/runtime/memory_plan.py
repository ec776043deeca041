"""Per-rank bytes of one micro-batch's activations and logits, with each memory lever on or off.

No torch import: `meshtune validate` and the benchmark share these formulas, and tests check them against bytes
counted with torch.autograd.graph.saved_tensors_hooks (tests/unit/test_memory_plan.py).

Activations a block keeps for backward, per token, counted on this decoder in fp32 (scaled by the element size
for 16-bit; rotary and norms compute in fp32, so bf16 is an estimate):
    none           5 dim + 5 q + 4 ffn + heads + 2    (q = heads x head_dim; k and v are stored repeated to q)
    full           dim                                (the block's input; backward recomputes one block at once)
    selective_op   3 dim + 2 q + 2 kv + 2 ffn + heads (the outputs of the matmuls and of attention, and the input)
With model.attn_softcap (Gemma 2) attention runs as explicit matmuls and keeps 8 bytes per score (heads x seq per
token): the soft-capped scores and the fp32 softmax in fp32; in bf16 the capped scores (2), the fp32 softmax (4)
and its bf16 copy (2). Under selective_op the scores matmul's output (one element per score).
Logits: without chunking the loss keeps fp32 log-probabilities (4 B T V bytes) for backward, and backward adds
their gradient and the logits' (`logits_bytes`); chunked, the same for B x chunk x V, one chunk at a time (in
backward, where the chunk's logits are recomputed). bench/bench_memory.py measures these peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshtune.config import ConfigError


@dataclass(frozen=True)
class Shapes:
    """What the formulas need from the model config (per tensor-parallel rank where tp splits it)."""

    dim: int
    q: int  # heads x head_dim
    kv: int  # kv heads x head_dim
    ffn: int
    heads: int
    vocab: int
    scores: int = 0  # model.attn_softcap: heads x seq attention scores per token (explicit attention, no SDPA)


def block_elems_per_token(s: Shapes, mode: str, elem: int = 4) -> float:
    """Elements (of `elem` bytes) one block keeps for backward per token: mode `none`, `full` or `selective_op`."""
    if mode == "full":
        return s.dim
    if mode == "selective_op":
        return 3 * s.dim + 2 * s.q + 2 * s.kv + 2 * s.ffn + s.heads + s.scores
    return 5 * s.dim + 5 * s.q + 4 * s.ffn + s.heads + 2 + 8 / elem * s.scores


def activation_bytes(s: Shapes, tokens: int, layers: list[int], elem: int, checkpointing: bool = False,
                     every: int = 1, mode: str = "full", offload: bool = False) -> float:
    """Bytes the blocks `layers` (global indices) keep for backward over `tokens` tokens; with checkpointing, one
    checkpointed block's full activations are added (live while it is recomputed). With `offload`
    (parallel.activation_offload) what blocks save lives in CPU memory: the device holds one block's at a time."""
    none = block_elems_per_token(s, "none", elem)
    if offload:
        return none * tokens * elem if layers else 0.0
    total, recompute = 0.0, 0.0
    for i in layers:
        if checkpointing and i % every == 0:
            total += block_elems_per_token(s, mode, elem)
            recompute = none
        else:
            total += none
    return (total + recompute) * tokens * elem


def logits_bytes(s: Shapes, batch: int, seq: int, elem: int, chunk: int = 0,
                 head_trains: bool = True, vocab_shards: int = 1, softcap: bool = False) -> dict[str, float]:
    """Bytes of the loss for one micro-batch of `batch` x `seq` tokens; `chunk` = train.loss_chunk_size (0 = off).

    'kept': the fp32 log-probabilities kept for backward at once. 'peak': the most the loss holds, in backward:
    kept + their gradient (fp32) + the logits' gradient (element size) + the head weight's gradient before it is
    accumulated (when the head trains), + the logits themselves when unchunked (the trainer holds them for the
    recipes; a chunk's are freed once its log-probabilities exist). 'held': those unchunked logits, which stay
    live through the blocks' backward. `vocab_shards` > 1: parallel.vocab_parallel over that many ranks: each
    scores its 1 / vocab_shards of the vocabulary for every rank's tokens (as many logits as one unsplit rank's),
    inside the loss, so none are held; the head's gradient is its shard's. `softcap` (model.logit_softcap): the
    tanh's output is kept too, and backward adds its gradient."""
    positions = min(chunk, seq) if chunk else seq
    n = batch * positions * s.vocab
    kept = 4.0 * n + (elem * n if softcap else 0.0)
    head_grad = 4.0 * s.vocab * s.dim / vocab_shards if head_trains else 0.0
    held = 0.0 if chunk or vocab_shards > 1 else elem * n
    capped = elem * n if softcap else 0.0  # the gradient through the tanh
    return {"kept": kept, "peak": kept + 4.0 * n + elem * n + capped + held + head_grad, "held": held}


def step_moments(root: float, blocks: list[float], activations: float, logits: dict[str, float],
                 dequantized: float = 0.0, reduced: float = 0.0, block_activations: float = 0.0) -> dict[str, float]:
    """Bytes beyond the model state at a step's busiest moments; the step's peak is the largest.

        root gather  the root FSDP2 unit (embeddings, norm, head) and its all-gather output, while it is copied
                     out at the start of forward (nothing else is gathered yet)
        block        the root, `blocks`: what is gathered at once around a block's compute (two blocks: one
                     computing, the next one's all-gather output; parallel.fsdp_unit=linear: two projections,
                     three while a checkpointed block is recomputed, with their blocks' norms), the activations,
                     the largest dequantization of one call (`dequantized`: QLoRA's NF4 weights), the logits the
                     trainer holds through backward, and in backward the previous unit's gradient reduce-scatter
                     still in flight: its input and its all-to-all receive buffer (2 x `reduced`)
        reduce       a unit's reduce-scatter, after its backward (its parameters resharded, its own activations
                     freed: `block_activations`): the root, the next block's all-gather output, the other
                     activations, the held logits, and 3 x `reduced`: the unit's unsharded gradients and the
                     reduce-scatter input they are copied into, beside the previous unit's receive buffer, whose
                     sum is still pending (runtime/gloo_fsdp.py)
        loss         the root, a block (the last one stays gathered), the activations and the loss's peak

    `root`, `blocks` (the largest unit first where a moment holds one) and `reduced` (a unit's unsharded fp32
    gradients, the largest) are bytes per unit, unsharded (0 without FSDP2); `logits` is `logits_bytes`'s dict
    (zeros on a rank without the head)."""
    b = sorted(blocks, reverse=True) + [0.0, 0.0]
    return {"root gather": 2.0 * root,
            "block": root + sum(b) + activations + dequantized + logits["held"] + 2.0 * reduced,
            "reduce": root + b[0] + max(activations - block_activations, 0.0) + logits["held"] + 3.0 * reduced,
            "loss": root + b[0] + activations + logits["peak"]}


def parse_bytes(text: str) -> float:
    """'80GiB', '80GB', '512MiB', '1e9' -> bytes.

    Raises:
        ConfigError: for a size it cannot read.
    """
    units = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20,
             "gib": 2**30, "tib": 2**40}
    t = text.strip().lower()
    number = t.rstrip("kmgtib")
    unit = t[len(number):]
    if unit not in units:
        raise ConfigError(f"--device-memory: cannot read {text!r}; write e.g. 80GiB, 24GB or 512MiB")
    try:
        return float(number) * units[unit]
    except ValueError:
        raise ConfigError(f"--device-memory: cannot read {text!r}; write e.g. 80GiB, 24GB or 512MiB") from None
