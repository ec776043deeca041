"""Vocabulary-parallel embedding and output head over the FSDP2 (dp_shard) axis: `parallel.vocab_parallel: true`
(under HSDP every dp_replicate replica holds the same split, its gradient averaged over them).

Why. Under FSDP2 the root unit holds the embedding (and the tied head) and gathers it whole for the step: on a
Llama-3.2-1B-shaped model the 128256 x 2048 table is 0.23x of the fp32 model, gathered (0.23x) beside its
all-gather buffer while it is copied out (0.23x more), on every rank. Here the table stays split by vocabulary
rows (a Shard(0) DTensor over the dp_shard mesh, outside `fully_shard`) and is never gathered; the activations
move instead (Megatron's vocabulary-parallel embedding and cross-entropy, with the data-parallel ranks playing
the tensor-parallel ones: every rank works on every rank's tokens for its own rows):

    embedding   token ids (B, T) all-gathered over dp_shard -> this rank's rows looked up (zeros for ids it
                does not own) -> reduce-scatter (sum) back to this rank's (B, T, dim). Backward: all-gather.
    head + loss final hidden states all-gathered -> logits over this rank's rows only (dp B, T, V / dp) ->
                cross-entropy with an all-reduced max, sum of exponentials and target logit (never the full-
                vocabulary logits) -> this rank's rows' losses. Backward: the per-token loss gradients all-reduced
                (each rank's rows train every rank's vocabulary shard), the hidden-state gradient reduce-scattered.

Gradient scale. The trainer backprops (summed token loss x dp / global tokens) on every rank and FSDP2 averages
gradients over dp; a vocabulary shard's gradient is already the sum over its dp_shard group's tokens, so it is
multiplied by 1 / dp_shard here instead (on its way into `.grad`) and, under HSDP, averaged over the dp_replicate
replicas once a step's micro-batches are in (`sync_replicas`), giving exactly the single-process gradient.

    shard = apply_vocab_parallel(model, fsdp_mesh, compute_dtype)   # before fully_shard(..., ignored_params=...)
    logits = VocabParallelLogits(model(tokens, hidden_only=True), shard)
    loss = logits.summed_loss(labels); preds = logits.argmax(dim=-1)

Only public c10d collectives, inside autograd Functions; no private torch API.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from meshtune.config import ConfigError
from meshtune.data.datasets import IGNORE_INDEX
from meshtune.models.decoder import softcap_logits
from meshtune.runtime.chunked_loss import HiddenLogits, recomputed


def shard_rows(vocab: int, shards: int, rank: int) -> tuple[int, int]:
    """(first row, row count) of `rank`'s Shard(0) piece of a `vocab`-row table (torch.chunk sizes, as DTensor)."""
    per = -(-vocab // shards)
    start = min(vocab, rank * per)
    return start, max(0, min(per, vocab - start))


@dataclass(frozen=True)
class VocabShard:
    """This rank's share of the vocabulary and the group that holds the rest.

    Attributes:
        group: the dp_shard process group.
        rank: this rank in `group`.
        size: ranks in `group` (dp_shard).
        start: first vocabulary row this rank holds.
        rows: rows this rank holds.
        vocab: the whole vocabulary.
        compute_dtype: the dtype the table is cast to for compute (FSDP2's param_dtype), None = its own.
        softcap: model.logit_softcap (Gemma 2), applied to each rank's logit columns (elementwise), 0 = off.
        replicas: under HSDP, the dp_replicate group holding the same split (None without replicas).
    """

    group: dist.ProcessGroup
    rank: int
    size: int
    start: int
    rows: int
    vocab: int
    compute_dtype: torch.dtype | None = None
    softcap: float = 0.0
    replicas: dist.ProcessGroup | None = None


def apply_vocab_parallel(model: nn.Module, mesh, compute_dtype: torch.dtype | None = None,
                         softcap: float = 0.0) -> set[nn.Parameter]:
    """Split the embedding and output head of `model` by vocabulary rows over FSDP2's `mesh`: its last dimension
    (dp_shard); under HSDP (a 2-D (dp_replicate, dp_shard) mesh) every replica holds the same split, its gradient
    averaged over the replicas by `sync_replicas`. Return the parameters FSDP2 must leave alone
    (`fully_shard(..., ignored_params=...)`). Works on meta and materialised models; a tied head keeps sharing the
    embedding's Parameter.

    Raises:
        ConfigError: naming parallel.vocab_parallel when a recipe replaced the embedding or head modules.
    """
    emb, head = model.tok_embeddings, model.output
    for module, kind in ((emb, nn.Embedding), (head, nn.Linear)):
        if type(module) is not kind:
            raise ConfigError(f"parallel.vocab_parallel: the model's {type(module).__name__} embedding/head is not a "
                              f"plain {kind.__name__} (a recipe wraps it); set parallel.vocab_parallel=false")
    vocab = emb.weight.shape[0]
    last = mesh.ndim - 1
    rank, size = mesh.get_local_rank(last), mesh.size(last)
    start, rows = shard_rows(vocab, size, rank)
    replicas = mesh.get_group(0) if mesh.ndim == 2 else None
    shard = VocabShard(mesh.get_group(last), rank, size, start, rows, vocab, compute_dtype, softcap, replicas)
    placements = [Replicate(), Shard(0)] if mesh.ndim == 2 else [Shard(0)]
    tied = head.weight is emb.weight
    made: dict[int, nn.Parameter] = {}
    for module in (emb, head):
        w = module.weight
        if id(w) not in made:
            local = w.detach()[start:start + rows].clone()  # (rows, dim); on meta, a shaped nothing
            dt = DTensor.from_local(local, mesh, placements, run_check=False, shape=w.shape, stride=w.stride())
            made[id(w)] = nn.Parameter(dt, requires_grad=w.requires_grad)
        module.weight = made[id(w)]
    assert not tied or head.weight is emb.weight
    emb.forward = functools.partial(_embed, emb, shard)
    head.forward = functools.partial(_full_logits, head, shard)
    head.vocab_shard = shard  # the trainer builds VocabParallelLogits from it
    return set(made.values())


def sync_replicas(model: nn.Module, shard: VocabShard) -> None:
    """Under HSDP: average the split table's gradients over the replicas (dp_replicate), as FSDP2 does for the
    parameters it manages, once all of a step's micro-batches are accumulated. Nothing without replicas."""
    if shard.replicas is None:
        return
    for p in {id(m.weight): m.weight for m in (model.tok_embeddings, model.output)}.values():
        if p.grad is not None:
            dist.all_reduce(p.grad.to_local(), op=dist.ReduceOp.AVG, group=shard.replicas)


def vocab_shard_of(model: nn.Module) -> VocabShard | None:
    """The VocabShard of a model whose head `apply_vocab_parallel` split, else None."""
    head = getattr(model, "output", None)
    return getattr(head, "vocab_shard", None)


# ---- autograd-aware collectives over the dp_shard group ---------------------------------------------------------

class _GatherRows(torch.autograd.Function):
    """Forward: all-gather along dim 0 (rank-major). Backward: reduce-scatter (sum) of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_gather(x.contiguous(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter(grad.contiguous(), ctx.group), None


class _ScatterRows(torch.autograd.Function):
    """Forward: reduce-scatter (sum) along dim 0. Backward: all-gather of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter(x.contiguous(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather(grad.contiguous(), ctx.group), None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `factor` (the vocabulary shard's 1 / dp, see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """Rank-major concatenation of every rank's `x` along dim 0."""
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    # torch 2.13 renamed all_gather_into_tensor (deprecated there); older releases in our range know only that name
    gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
    gather(out, x, group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks of rank-major chunk `rank` (an all-to-all and a local sum: gloo's fastest, gloo_fsdp.py)."""
    n = dist.get_world_size(group)
    received = torch.empty_like(x)
    dist.all_to_all_single(received, x, group=group)
    return received.view(n, -1, *x.shape[1:]).sum(dim=0)


def _local_weight(weight: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """This rank's (rows, dim) table in compute dtype, its gradient scaled by 1 / dp."""
    w = weight.to_local() if isinstance(weight, DTensor) else weight
    if shard.compute_dtype is not None:
        w = w.to(shard.compute_dtype)
    return _ScaleGrad.apply(w, 1.0 / shard.size) if w.requires_grad else w


def _padded_gather(x: torch.Tensor, shard: VocabShard, fill=0) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """All-gather `x` (B, T, ...) over the group, each rank's padded to the largest (B, T) (evaluation's last batch
    may be short). Returns (gathered (size x B', T', ...), this rank's (B, T), the padded (B', T'))."""
    own = (x.shape[0], x.shape[1])
    sizes = _all_gather(torch.tensor([own], dtype=torch.int64, device=x.device), shard.group)
    big = (int(sizes[:, 0].max()), int(sizes[:, 1].max()))
    if big != own:
        pad = x.new_full((*big, *x.shape[2:]), fill)
        pad[: own[0], : own[1]] = x
        x = pad  # a copy: the gradient flows back through the slice assignment
    return _GatherRows.apply(x, shard.group), own, big


def _embed(module: nn.Embedding, shard: VocabShard, tokens: torch.Tensor) -> torch.Tensor:
    """tok_embeddings.forward: (B, T) ids -> (B, T, dim), looking up only this rank's rows."""
    ids, own, big = _padded_gather(tokens, shard)  # (size x B', T')
    local = ids - shard.start
    mine = (local >= 0) & (local < shard.rows)
    w = _local_weight(module.weight, shard)
    h = nn.functional.embedding(local.clamp(0, max(shard.rows - 1, 0)), w) if shard.rows else \
        w.new_zeros((*ids.shape, w.shape[1]))
    h = h * mine.unsqueeze(-1).to(h.dtype)  # rows other ranks own: zeros, filled in by their sum
    h = _ScatterRows.apply(h, shard.group)  # (B', T', dim): every rank's contribution to this rank's tokens
    return h[: own[0], : own[1]]


def _full_logits(module: nn.Linear, shard: VocabShard, hidden: torch.Tensor) -> torch.Tensor:
    """output.forward for callers outside the trainer: the whole (B, T, V) logits (gathered along the vocabulary)."""
    return VocabParallelLogits(hidden, module, shard).full(softcap=False)  # the model soft-caps what a head returns


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy from logits split by vocabulary columns over `shard.group`.

    forward(logits (N, rows) fp32, targets (N,) global ids) -> (N,) losses, equal on every rank (0 where ignored).
    Backward all-reduces the loss gradient first: each rank's objective has its own rows only, but every rank's
    shard of the head needs every row's gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, shard: VocabShard) -> torch.Tensor:
        group = shard.group
        peak = logits.max(dim=-1).values if shard.rows else logits.new_full(logits.shape[:1], -float("inf"))
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - peak.unsqueeze(-1)
        exp = shifted.exp()
        sums = exp.sum(dim=-1)
        local = targets - shard.start
        mine = (local >= 0) & (local < shard.rows)
        local = local.clamp(0, max(shard.rows - 1, 0))
        if shard.rows:
            target = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1) * mine
        else:
            target = sums.new_zeros(sums.shape)
        both = torch.stack([sums, target])
        dist.all_reduce(both, group=group)
        valid = targets != IGNORE_INDEX
        loss = (both[0].log() - both[1]) * valid
        ctx.shard = shard
        ctx.save_for_backward(exp.div_(both[0].unsqueeze(-1)), local, mine & valid, valid)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, local, hit, valid = ctx.saved_tensors
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.shard.group)
        grad = grad * valid
        out = softmax * grad.unsqueeze(-1)
        if ctx.shard.rows:
            out.scatter_add_(-1, local.unsqueeze(-1), -(grad * hit).unsqueeze(-1))
        return out, None, None


class VocabParallelLogits(HiddenLogits):
    """Stand-in for the (B, T, V) logits of a vocabulary-parallel head (like chunked_loss.ChunkedLogits): the loss
    and the argmax come out right on every rank while no rank builds the full-vocabulary logits.

    Every rank computes its vocabulary rows for every rank's tokens, so its logits are (dp x B, T, V / dp): as many
    as one rank's unsplit (B, T, V). With `chunk_size` (train.loss_chunk_size) the loss runs on that many sequence
    positions at a time, each chunk's logits recomputed in backward (chunked_loss.py's scheme; the chunk's
    all-reduces run again there, in the same order on every rank).

    Attributes:
        hidden: this rank's final hidden states (B, T, dim).
        head: the output module (its weight a Shard(0) DTensor over the vocabulary).
        shard: the VocabShard.
        chunk_size: sequence positions per loss chunk, 0 = the whole sequence at once.
    """

    def __init__(self, hidden: torch.Tensor, head: nn.Module, shard: VocabShard, chunk_size: int = 0):
        self.hidden, self.head, self.shard, self.chunk_size = hidden, head, shard, chunk_size

    def _local(self, labels: torch.Tensor | None = None, softcap: bool = True):
        """(local logits (size x B' x T', rows), soft-capped unless `softcap` is False, gathered labels or None,
        own (B, T), padded (B', T'))."""
        h, own, big = _padded_gather(self.hidden, self.shard)
        logits = self._scores(h, _local_weight(self.head.weight, self.shard), softcap)  # (size x B', T', rows)
        gathered = None
        if labels is not None:
            gathered = _padded_gather(labels, self.shard, fill=IGNORE_INDEX)[0]
        return logits, gathered, own, big

    def _own(self, per_row: torch.Tensor, own, big) -> torch.Tensor:
        """This rank's (B, T) slice of a (size x B', T') tensor."""
        return per_row.view(self.shard.size, *big, *per_row.shape[2:])[self.shard.rank, : own[0], : own[1]]

    def summed_loss(self, labels: torch.Tensor) -> torch.Tensor:
        """Sum of this rank's token cross-entropies over valid labels (fp32), as grads.summed_loss."""
        if self.chunk_size:
            return self._chunked_loss(labels)
        logits, targets, own, big = self._local(labels)
        losses = _VocabParallelCrossEntropy.apply(logits.flatten(0, 1).float(), targets.flatten(), self.shard)
        return self._own(losses.view(targets.shape), own, big).sum()

    def _chunked_loss(self, labels: torch.Tensor) -> torch.Tensor:
        """summed_loss, `chunk_size` positions of every rank's tokens at a time, each chunk under checkpoint."""
        h, own, big = _padded_gather(self.hidden, self.shard)  # (size x B', T', dim)
        targets = _padded_gather(labels, self.shard, fill=IGNORE_INDEX)[0]
        w = _local_weight(self.head.weight, self.shard)
        mine = torch.zeros((self.shard.size, *big), dtype=torch.float32, device=h.device)
        mine[self.shard.rank, : own[0], : own[1]] = 1.0  # this rank's positions: the others' are their own sums
        mine = mine.flatten(0, 1)
        total = None
        for start in range(0, big[1], self.chunk_size):
            part = [t[:, start:start + self.chunk_size] for t in (h, targets, mine)]
            loss = recomputed(self._chunk_loss, w, *part)
            total = loss if total is None else total + loss
        return total

    def _scores(self, h: torch.Tensor, w: torch.Tensor, softcap: bool = True) -> torch.Tensor:
        """This rank's logit columns (..., rows) of gathered hidden states `h` with its table `w`, soft-capped
        (model.logit_softcap) unless `softcap` is False."""
        logits = nn.functional.linear(h.to(w.dtype), w)
        return softcap_logits(logits, self.shard.softcap) if softcap else logits

    def _chunk_loss(self, w: torch.Tensor, h: torch.Tensor, targets: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
        logits = self._scores(h, w)  # (size x B', c, rows): only inside this call
        losses = _VocabParallelCrossEntropy.apply(logits.flatten(0, 1).float(), targets.flatten(), self.shard)
        return (losses.view(targets.shape) * mine).sum()

    def argmax(self, dim: int = -1) -> torch.Tensor:
        """The global argmax over the vocabulary at this rank's (B, T) positions (the first, as torch.argmax)."""
        assert dim in (-1, 2), dim
        with torch.no_grad():
            if not self.chunk_size:
                logits, _, own, big = self._local()
                return self._own(self._argmax(logits), own, big)
            h, own, big = _padded_gather(self.hidden, self.shard)
            w = _local_weight(self.head.weight, self.shard)
            index = torch.cat([self._argmax(self._scores(h[:, start:start + self.chunk_size], w))
                               for start in range(0, big[1], self.chunk_size)], dim=1)
        return self._own(index, own, big)

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The global vocabulary index of the largest logit (the first, as torch.argmax) from every rank's columns
        `logits` (..., rows)."""
        if self.shard.rows:
            best, where = logits.float().max(dim=-1)
        else:
            best = logits.new_full(logits.shape[:-1], -float("inf"), dtype=torch.float32)
            where = torch.zeros_like(best, dtype=torch.int64)
        top = best.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.shard.group)
        index = torch.where(best == top, where + self.shard.start, self.shard.vocab)
        dist.all_reduce(index, op=dist.ReduceOp.MIN, group=self.shard.group)
        return index

    def full(self, softcap: bool = True) -> torch.Tensor:
        """The whole (B, T, V) logits of this rank's positions (tests, callers outside the trainer); `softcap`
        False: the head's own, before model.logit_softcap."""
        with torch.no_grad():
            logits, _, own, big = self._local(softcap=softcap)
            per = -(-self.shard.vocab // self.shard.size)  # every rank's column count, padded to the first's
            cols = logits.new_zeros((per, *logits.shape[:-1]))
            cols[: logits.shape[-1]] = logits.movedim(-1, 0)
            parts = _all_gather(cols, self.shard.group)  # (size x per, size x B', T')
        return self._own(parts[: self.shard.vocab].movedim(0, -1), own, big)
