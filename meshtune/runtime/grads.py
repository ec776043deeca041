"""Gradient plumbing: skip sync on inner micro-batches, the loss normalised by global tokens, clipping.

Why normalise by the *global* count of valid tokens: with a per-micro-batch mean, a step's gradient depends
on how the batch was cut into ranks and micro-batches (padding makes counts unequal). Dividing every
micro-batch's summed loss by the step's token count over all data-parallel ranks makes N ranks x k
accumulation steps produce exactly the gradient of one large batch. DDP and FSDP *average* gradients over
the dp ranks, so each rank's loss is also multiplied by the dp degree to turn that average into a sum.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from meshtune.data.datasets import IGNORE_INDEX  # the one definition: labels the loss skips
from meshtune.runtime.chunked_loss import ChunkedLogits
from meshtune.runtime.vocab_parallel import VocabParallelLogits


@contextlib.contextmanager
def maybe_no_sync(model: torch.nn.Module, skip_sync: bool):
    """Run backward without the data-parallel gradient reduction (inner accumulation micro-batches)."""
    if not skip_sync:
        yield
        return
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def count_tokens(labels: list[torch.Tensor], dp_group=None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Valid (non-ignored) label tokens in this step's micro-batches, summed over the dp group.

    `device` must be one the group's backend can reduce on (NCCL: the rank's GPU)."""
    n = sum(int((lab != IGNORE_INDEX).sum()) for lab in labels)
    total = torch.tensor(float(n), dtype=torch.float64, device=device)
    if dp_group is not None:
        dist.all_reduce(total, group=dp_group)
    return total


def summed_loss(logits: torch.Tensor | ChunkedLogits | VocabParallelLogits, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies over valid labels, computed in fp32. logits (B, T, V), labels (B, T);
    ChunkedLogits (train.loss_chunk_size) sum chunk by chunk, never holding the whole logits; VocabParallelLogits
    (parallel.vocab_parallel) hold 1 / dp_shard of the vocabulary per rank."""
    if isinstance(logits, ChunkedLogits):
        return logits.sum_over_chunks(summed_loss, labels)
    if isinstance(logits, VocabParallelLogits):
        return logits.summed_loss(labels)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def eval_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[summed token loss, valid tokens, exactly-matched sequences, evaluated sequences] of one batch (fp64)."""
    from meshtune.data import exact_match

    correct, valid = exact_match(logits, labels)
    return torch.stack([summed_loss(logits, labels).detach().double(), (labels != IGNORE_INDEX).sum().double(),
                        (correct & valid).sum().double(), valid.sum().double()])


def grad_norm(params: list[torch.nn.Parameter], pp_group=None, copies=()) -> torch.Tensor:
    """The global L2 norm of gradients over every parallel axis.

    DTensor gradients (FSDP shards, TP shards, or both) are grouped by mesh and placements: each group's
    norm is one DTensor whose `full_tensor()` reduces exactly over the axes it is sharded on (replicated
    axes are not double counted). Pipeline stages hold disjoint parameters, so their squares are summed;
    `copies` (a tied head's copy of the embedding on the last stage) are left out, counted once.
    """
    skip = {id(p) for p in copies}
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None and id(p) not in skip:
            g = p.grad
            key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
            groups.setdefault(key, []).append(g)
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float, pp_group=None, copies=()) -> float:
    """Clip gradients in place to `max_norm` (0 = measure only); return the norm before clipping."""
    norm = float(grad_norm(params, pp_group, copies))
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for p in params:  # one tensor at a time: grads may live on different meshes
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm
