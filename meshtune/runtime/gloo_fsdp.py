"""FSDP2 collectives for CPU ranks on gloo: point-to-point all-gathers and all-to-all reduce-scatters instead of
gloo's own, and gradient reduce-scatters that overlap the backward of the next block.

Why. On CUDA, FSDP2 overlaps its collectives with compute through streams. A CPU device has none, so stock
FSDP2 on gloo runs every all-gather and reduce-scatter blocking, between two blocks' compute. And gloo's
tensor all-gather and reduce-scatter are slower than its all-to-all, which moves the same bytes (measured
on 2 ranks, 7 MB fp32: all-gather 11.0 ms, reduce-scatter 14.7 ms, all-to-all 4.7 ms, all-to-all + local
sum 7.2 ms). So here:

    all-gather      = this rank's shard sent to every peer, each peer's received straight into its slot of
                      the rank-major output (FSDP2 has already copied ours into our slot); async when FSDP2
                      prefetches (see data_parallel.prefetch_neighbours). Gloo's all-gather, and an
                      all-to-all of the shard repeated world-size times, each take a second full-size buffer
                      beside the output: 1 GiB more at the gather of a Llama-3.2-1B's tied fp32 embedding.
                      Measured on 2 ranks (256 MiB shard): point-to-point 366 ms, all-to-all 1400 ms,
                      and 0 extra bytes against 512 MiB.
    reduce-scatter  = all-to-all of the padded gradient (rank r receives every rank's chunk r) + local sum.
                      Launched async; FSDP2 has already made the sharded `.grad` a view of the output
                      buffer, so the sum can land later: when the next block's reduce-scatter is launched
                      (one in flight, like FSDP2's own buffers) and at the latest at the end of backward
                      (an autograd final callback). After `backward()` returns, gradients are complete,
                      exactly as with stock FSDP2.

The deferred sum is only correct when FSDP2 does nothing with the output between the reduce-scatter and
the end of backward but view it. The caller passes `install(overlap=True)` only when that holds
(data_parallel.apply_fsdp: a 1-D shard mesh, no mixed-precision cast, no pipelining); each call also checks
that no gradient is being accumulated into (a `.grad` that already exists, or a post-accumulate-grad hook),
and otherwise reduces synchronously.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

try:  # the ABCs that FSDPModule.set_custom_all_gather / set_custom_reduce_scatter take (torch >= 2.8)
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
except ImportError:  # older torch: keep FSDP2's own collectives
    AllGather = ReduceScatter = None


def available() -> bool:
    """Whether this torch lets FSDP2 modules take custom collectives."""
    from torch.distributed.fsdp import FSDPModule

    return AllGather is not None and hasattr(FSDPModule, "set_custom_reduce_scatter")


def _reduce_received(received: torch.Tensor, output: torch.Tensor, mean: bool) -> None:
    """`received` holds every rank's chunk for this rank, rank-major: sum (or average) them into `output`."""
    torch.sum(received.view(-1, output.numel()), dim=0, out=output)
    if mean:
        output.div_(received.numel() // output.numel())


class _Pending:
    """Reduce-scatters in flight for one model, finished in launch order."""

    def __init__(self) -> None:
        self.items: list[tuple[dist.Work, torch.Tensor, torch.Tensor, bool]] = []
        self.queued_for = None  # the autograd graph task whose end finishes them (a fresh one after a failure)

    def finish(self, keep: int = 0) -> None:
        while len(self.items) > keep:
            work, received, output, mean = self.items.pop(0)
            work.wait()
            _reduce_received(received, output, mean)

    def end_of_backward(self) -> None:
        self.queued_for = None
        self.finish()


class _Works(dist.Work):
    """Several point-to-point works as the one `Work` FSDP2 waits on."""

    def __init__(self, works: list[dist.Work]) -> None:
        super().__init__()
        self.works = works

    def wait(self, timeout=None) -> bool:
        for work in self.works:
            work.wait()
        return True


class P2PAllGather(AllGather if AllGather is not None else object):
    """All-gather with no buffer beyond FSDP2's output: `input_tensor` is this rank's slot of `output_tensor`."""

    def allocate(self, size, *, dtype, device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        rank, n = group.rank(), input_tensor.numel()
        ops = []
        for peer in range(group.size()):
            if peer != rank:  # sends and receives in rank order on every rank, so each pair matches up
                ops += [dist.P2POp(dist.isend, input_tensor, group=group, group_peer=peer),
                        dist.P2POp(dist.irecv, output_tensor[peer * n:(peer + 1) * n], group=group, group_peer=peer)]
        work = _Works(dist.batch_isend_irecv(ops) if ops else [])
        if async_op:
            return work
        work.wait()
        return None


class A2AReduceScatter(ReduceScatter if ReduceScatter is not None else object):
    """Reduce-scatter of one FSDP2 module's gradients; `params` are that module's own (sharded) parameters."""

    def __init__(self, pending: _Pending | None, params: list[nn.Parameter]) -> None:
        self.pending, self.params = pending, params

    def allocate(self, size, *, dtype, device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        if op not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):  # e.g. PREMUL_SUM: gloo's own
            return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group)
        mean = op == dist.ReduceOp.AVG
        received = torch.empty_like(input_tensor)
        defer = self.pending is not None and not any(
            p.grad is not None or getattr(p, "_post_accumulate_grad_hooks", None) for p in self.params)
        work = dist.all_to_all_single(received, input_tensor, group=group, async_op=defer)
        if not defer:  # FSDP2 reads the output right away (accumulation, hooks): reduce now
            if self.pending is not None:
                self.pending.finish()
            _reduce_received(received, output_tensor, mean)
            return None
        self.pending.items.append((work, received, output_tensor, mean))
        task = torch._C._current_graph_task_id()
        if self.pending.queued_for != task:
            torch.autograd.Variable._execution_engine.queue_callback(self.pending.end_of_backward)
            self.pending.queued_for = task
        self.pending.finish(keep=1)  # the previous block's sum: its all-to-all overlapped this block's backward
        return None


def install(model: nn.Module, units: list[nn.Module], overlap: bool, ignored=frozenset()) -> None:
    """Give every FSDP2 module of `model` (`units`: the blocks, or the projections and blocks of
    parallel.fsdp_unit=linear, a unit listed before any unit that contains it; then the root) these collectives;
    `overlap` defers gradient reduce-scatters (see the module docstring for when that is safe);
    `ignored` are root parameters FSDP2 does not manage."""
    pending = _Pending() if overlap else None
    taken = {id(p) for p in ignored}  # parameters of a unit already seen: an inner unit's are not its container's
    for module in [*units, model]:
        own = [p for p in module.parameters() if id(p) not in taken]
        taken |= {id(p) for p in own}
        module.set_custom_all_gather(P2PAllGather())
        module.set_custom_reduce_scatter(A2AReduceScatter(pending, own))
