"""Pipeline parallelism with torch.distributed.pipelining: stages at layer boundaries, schedules by name.

The decoder is split into `pp x stages_per_rank` stages of consecutive blocks (an even split, or the
config's split points). Every rank builds and initialises the whole model from the seed, then keeps only
its stages' blocks (plus the embeddings on the first stage, the norm and head on the last), so weights
equal a single-process run's. Stage s lives on pp rank s % pp ("loop" placement), except for V-shaped
schedules (ZBVZeroBubble, DualPipeV), where rank r holds stages r and 2pp-1-r.

With tied embeddings (model.tie_embeddings) the first stage's embedding and the last stage's head are two
copies of one matrix, equal at the start: after each backward their gradients are summed between the two
ranks (point to point; nothing when one rank holds both) so both copies take the same optimizer steps, and
the gradient norm counts the matrix once.

Each step the rank's micro-batches (train.micro_batch_size each; their count is the accumulation count)
are concatenated and the schedule splits them back into the same micro-batches, so the gradient equals
that of data parallelism with accumulation. Losses are summed token losses times dp / global tokens, as
everywhere in meshtune; `scale_grads=False` keeps the schedule from dividing by the micro-batch count.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from meshtune.config import ParallelConfig
from meshtune.runtime.chunked_loss import ChunkedLogits
from meshtune.runtime.grads import eval_counts, summed_loss
from meshtune.runtime.plan import stage_ids


def stage_module(model: nn.Module, layers: list[int], first: bool, last: bool,
                 head_in_loss: bool = False) -> nn.Module:
    """A copy of `model` holding only `layers` (and embeddings / head at the ends); names are unchanged.
    With `head_in_loss` (a chunked loss) the last stage keeps its head but returns hidden states."""
    stage = copy.deepcopy(model)
    if last and head_in_loss:  # the schedule calls stages without keywords
        stage.forward = functools.partial(stage.forward, hidden_only=True)
    for name in list(stage.layers):
        if int(name) not in layers:
            del stage.layers[name]
    if not first:
        stage.tok_embeddings = None
    if not last:
        stage.norm = None
        stage.output = None
    return stage


def parts_view(parts: list[nn.Module]) -> nn.Module:
    """One module over this rank's stage modules with the model's own parameter names (for the optimizer,
    checkpoints and exports): layers from every part, embeddings and head from the parts that have them."""
    view = nn.Module()
    view.layers = nn.ModuleDict()
    for part in parts:
        for name, block in part.layers.items():
            view.layers[name] = block
        for attr in ("tok_embeddings", "norm", "output"):
            if getattr(part, attr, None) is not None:
                setattr(view, attr, getattr(part, attr))
    return view


class Pipeline:
    """This rank's stages and the schedule that runs them."""

    def __init__(self, parts: list[nn.Module], ids: list[int], num_stages: int, cfg: ParallelConfig,
                 n_microbatches: int, pp_group, device: torch.device, dim: int, tied: bool = False,
                 loss_chunk: int = 0):
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

        self.parts, self.ids, self.num_stages = parts, ids, num_stages
        self.pp_group, self.pp_rank = pp_group, pp_group.rank()
        pp = pp_group.size()
        self.owner = {s: r for r in range(pp) for s in stage_ids(r, pp, len(ids), cfg.pp_schedule)}
        self.dim = dim
        self.is_first, self.is_last = 0 in ids, num_stages - 1 in ids
        self.tied = tied
        self.loss_chunk = loss_chunk  # the last stage returns hidden states; the loss applies its head in chunks
        self.scale = 1.0
        self._eval_totals: torch.Tensor | None = None
        stages = [PipelineStage(part, i, num_stages, device, group=pp_group) for part, i in zip(parts, ids,
                                                                                                  strict=True)]
        cls = get_schedule_class(cfg.pp_schedule)
        single = issubclass(cls, PipelineScheduleSingle)
        self.schedule = cls(stages[0] if single else stages, n_microbatches=n_microbatches, loss_fn=self._loss,
                            scale_grads=False)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.loss_chunk:
            from meshtune.runtime.data_parallel import unwrap

            last = unwrap(self.parts[self.ids.index(self.num_stages - 1)])
            logits = ChunkedLogits(logits, last.output, self.loss_chunk, last.cfg.logit_softcap)
        if self._eval_totals is not None:  # evaluation: count (chunk by chunk when chunked), nothing to differentiate
            self._eval_totals += eval_counts(logits, labels)
            return logits.hidden.new_zeros(()) if self.loss_chunk else logits.new_zeros(())
        return summed_loss(logits, labels) * self.scale

    def _run(self, run, micro_batches: list[dict], device: torch.device) -> list[torch.Tensor]:
        inputs = torch.cat([mb["input_ids"] for mb in micro_batches]).to(device)
        labels = torch.cat([mb["labels"] for mb in micro_batches]).to(device)
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.is_first else ()
        kwargs = {"target": labels, "losses": losses} if self.is_last else {}
        run(*args, **kwargs)
        return losses

    def _tied_pair(self) -> tuple[nn.Parameter | None, nn.Parameter | None]:
        """This rank's copies of a tied matrix: (the first stage's embedding, the last stage's head)."""
        if not self.tied:
            return None, None
        from meshtune.runtime.data_parallel import unwrap

        emb = unwrap(self.parts[self.ids.index(0)]).tok_embeddings.weight if self.is_first else None
        head = unwrap(self.parts[self.ids.index(self.num_stages - 1)]).output.weight if self.is_last else None
        return emb, head

    def tied_copies(self) -> list[nn.Parameter]:
        """The head's copy of a tied embedding, held by this rank: the gradient norm counts it once, not twice."""
        head = self._tied_pair()[1]
        return [head] if head is not None and head.requires_grad else []

    @torch.no_grad()
    def sync_tied_weights(self) -> None:
        """Make the last stage's head equal to the first stage's embedding (the first stage sends its local
        shard). Needed after stages initialise on their own (`model.init_device=meta`), where the head would
        otherwise draw its own values."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        emb, head = self._tied_pair()
        local = [None if p is None else p.to_local() if isinstance(p, DTensor) else p for p in (emb, head)]
        if emb is not None and head is not None:
            local[1].copy_(local[0])
        elif emb is not None:
            dist.send(local[0].contiguous(), group=self.pp_group, group_dst=self.owner[self.num_stages - 1])
        elif head is not None:
            got = torch.empty_like(local[1])
            dist.recv(got, group=self.pp_group, group_src=self.owner[0])
            local[1].copy_(got)

    def sync_tied_grads(self) -> None:
        """Sum the embedding's and the head's gradients of a tied matrix into both copies (a + b == b + a,
        so both ranks hold the same bits)."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        emb, head = self._tied_pair()
        held = [p for p in (emb, head) if p is not None and p.requires_grad and p.grad is not None]
        if not held:
            return
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in held]
        if len(grads) == 2:  # one rank holds both ends (V-shaped schedules)
            total = grads[0] + grads[1]
        else:
            peer = self.owner[self.num_stages - 1] if emb is not None else self.owner[0]
            theirs = torch.empty_like(grads[0])
            ops = [dist.P2POp(dist.isend, grads[0].contiguous(), group=self.pp_group, group_peer=peer),
                   dist.P2POp(dist.irecv, theirs, group=self.pp_group, group_peer=peer)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            total = grads[0] + theirs
        for g in grads:
            g.copy_(total)

    def forward_backward(self, micro_batches: list[dict], scale: float, device: torch.device) -> torch.Tensor:
        """Run the schedule on this step's micro-batches; returns the summed token loss (last stage, else 0)."""
        self.scale = scale
        losses = self._run(self.schedule.step, micro_batches, device)
        self.sync_tied_grads()
        if not losses:
            return torch.zeros((), device=device)
        return torch.stack([loss.detach() for loss in losses]).sum() / scale

    @torch.no_grad()
    def evaluate(self, micro_batches: list[dict], device: torch.device) -> torch.Tensor:
        """Forward-only pass, stage after stage with point-to-point sends (simple, and it works for every
        placement: some schedules' own forward-only mode needs a backward); returns [loss sum, tokens,
        correct, sequences], non-zero on the last stage."""
        import torch.distributed as dist

        self._eval_totals = torch.zeros(4, dtype=torch.float64, device=device)
        self.scale = 1.0
        try:
            for mb in micro_batches:
                tokens, labels = mb["input_ids"].to(device), mb["labels"].to(device)
                h = None
                for s in range(self.num_stages):
                    owner, prev = self.owner[s], self.owner.get(s - 1)
                    if owner != self.pp_rank:
                        continue
                    if s > 0 and prev != self.pp_rank:  # activations come from another rank
                        h = torch.empty(*tokens.shape, self.dim, device=device)
                        dist.recv(h, group=self.pp_group, group_src=prev)
                    h = self.parts[self.ids.index(s)](tokens if s == 0 else h)
                    if s == self.num_stages - 1:
                        self._loss(h, labels)
                    elif self.owner[s + 1] != self.pp_rank:
                        dist.send(h.float().contiguous(), group=self.pp_group, group_dst=self.owner[s + 1])
            return self._eval_totals
        finally:
            self._eval_totals = None
