"""The one training loop. Recipes change the model and hook into this loop; they never copy it.

Each optimizer step:
    micro-batches of this rank (StepSampler)  -> count valid tokens over dp (one all-reduce)
    for each micro-batch: forward -> summed token loss (recipes may reshape it) * dp / global tokens -> backward
        (the data-parallel gradient reduction runs only on the last micro-batch)
    clip the global gradient norm -> AdamW step -> recipes' after_optimizer_step -> LR schedule step
Every `train.eval_every` steps: loss and exact-match accuracy on the evaluation split; every
`checkpoint.every` steps: an atomic distributed checkpoint; every `train.log_every` steps: a metrics line.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from meshtune.data import StepSampler, collate, eval_batches, model_args
from meshtune.recipes.base import Recipe
from meshtune.runtime.checkpoint import Checkpointer
from meshtune.runtime.chunked_loss import ChunkedLogits
from meshtune.runtime.data_parallel import unwrap
from meshtune.runtime.grads import (
    IGNORE_INDEX,
    count_tokens,
    eval_counts,
    summed_loss,
)
from meshtune.runtime.mesh import ParallelMesh
from meshtune.runtime.metrics import Metrics, peak_memory_gb
from meshtune.runtime.pipeline_parallel import Pipeline
from meshtune.runtime.precision import use_bf16
from meshtune.runtime.vocab_parallel import VocabParallelLogits, sync_replicas, vocab_shard_of
from meshtune.schema import Config


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at `total` (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    """Runs `cfg.train.steps` optimizer steps of `model` on `train_ds`, resumable from checkpoints."""

    def __init__(self, cfg: Config, mesh: ParallelMesh, device: torch.device, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler, train_ds, eval_ds, sampler: StepSampler,
                 checkpointer: Checkpointer, metrics: Metrics, step: int = 0, pipeline: Pipeline | None = None,
                 recipes: Sequence[Recipe] = (), engine=None, plan=None):
        self.cfg, self.mesh, self.device = cfg, mesh, device
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_ds, self.eval_ds, self.sampler = train_ds, eval_ds, sampler
        self.checkpointer, self.metrics = checkpointer, metrics
        self.step = step
        self.pipeline = pipeline
        self.recipes = list(recipes)
        self.plan = plan  # the layout this run was built from (meshtune.runtime.plan), recorded in checkpoints
        dp, pp = mesh.get("dp"), mesh.get("pp")
        self.dp_group = dp.get_group() if dp is not None else None
        self.pp_group = pp.get_group() if pp is not None else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        if engine is None:
            from meshtune.runtime.engines.native import NativeEngine

            engine = NativeEngine(model, optimizer, cfg.optim.grad_clip, self.pp_group)
        self.engine = engine  # backward, no-sync, clip + optimizer step, checkpoints (runtime/engines)
        # FSDP2 casts parameters itself (MixedPrecisionPolicy), so do engines that own precision; else autocast
        self.autocast = use_bf16(cfg.train.dtype, device) and not mesh.uses_fsdp and not engine.owns_precision
        self.loss_chunk = cfg.train.loss_chunk_size  # chunked loss: the model returns hidden states
        self.vocab_shard = vocab_shard_of(unwrap(model))  # parallel.vocab_parallel: so does a vocabulary-split head
        self._forward_kwargs = {"hidden_only": True} if self.loss_chunk or self.vocab_shard else {}
        self.history: list[dict] = []
        self.stop_signal: int | None = None  # set from a signal handler: save and stop after this step
        self._prefetch: ThreadPoolExecutor | None = None  # assembles the next step's batches during this one
        self._pending = None  # (indices, future) of that next step

    def request_stop(self, signum: int) -> None:
        """Ask the loop to checkpoint and stop after the current step (safe to call from a signal handler)."""
        self.stop_signal = signum

    def _agree_to_stop(self) -> bool:
        """Whether any rank was asked to stop: every rank must leave the loop at the same step, and knows the
        signal (the largest number, when ranks got different ones)."""
        flag = torch.tensor([float(self.stop_signal or 0)], device=self.device)
        if self.mesh.mesh is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self.stop_signal = int(flag.item())
        return bool(flag.item())

    def _autocast(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _as_loss_reads(self, out: torch.Tensor):
        """The model's output as the loss and evaluation read it: with parallel.vocab_parallel the head runs inside
        the loss on this rank's vocabulary rows (VocabParallelLogits), with train.loss_chunk_size chunk by chunk
        (ChunkedLogits), both from the hidden states the model returned; else the logits themselves."""
        if self.vocab_shard is not None:
            return VocabParallelLogits(out, unwrap(self.model).output, self.vocab_shard, self.loss_chunk)
        if self.loss_chunk:
            model = unwrap(self.model)
            return ChunkedLogits(out, model.output, self.loss_chunk, model.cfg.logit_softcap)
        return out

    def _loss_precision(self):
        """A chunked head runs inside the loss in the forward's precision (autocast); the vocabulary-parallel one
        casts its weight itself."""
        return self._autocast() if self.loss_chunk and self.vocab_shard is None else contextlib.nullcontext()

    def forward_backward(self, micro_batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate this step's gradients; returns (this rank's summed token loss, global valid tokens)."""
        self.model.train()
        tokens = count_tokens([mb["labels"] for mb in micro_batches], self.dp_group, self.device)
        scale = self.mesh.dp_size / tokens.clamp(min=1).item()
        if self.pipeline is not None:
            return self.pipeline.forward_backward(micro_batches, scale, self.device), tokens
        loss_sum = torch.zeros((), device=self.device)
        for i, mb in enumerate(micro_batches):
            labels = mb["labels"].to(self.device, non_blocking=True)
            # DDP's no_sync must cover forward and backward; autocast only the forward
            with self.engine.accumulate(last=i == len(micro_batches) - 1):
                with self._autocast():
                    logits = self.model(*model_args(mb, self.device), **self._forward_kwargs)
                logits = self._as_loss_reads(logits)
                with self._loss_precision():
                    loss = summed_loss(logits, labels)
                    total = loss
                    for recipe in self.recipes:
                        total = recipe.loss(total, logits, mb)
                self.engine.backward(total * scale)
            loss_sum += loss.detach()
        if self.vocab_shard is not None:  # HSDP: the split table's replicas average their gradients, as FSDP2's do
            sync_replicas(unwrap(self.model), self.vocab_shard)
        return loss_sum, tokens

    def train_step(self, micro_batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step over this rank's micro-batches; returns (loss sum, global tokens, grad norm)."""
        loss_sum, tokens = self.forward_backward(micro_batches)
        norm = self.engine.step()  # clip the global gradient norm, optimizer step
        for recipe in self.recipes:
            recipe.after_optimizer_step(self.model)
        self.scheduler.step()
        self.engine.zero_grad()
        self.step += 1
        return loss_sum, tokens, norm

    def _collate(self, step: list[list[int]]) -> list[dict]:
        return [collate([self.train_ds[i] for i in idx]) for idx in step]

    def next_micro_batches(self) -> list[dict]:
        """This rank's collated micro-batches for the next optimizer step (advances the sampler).

        The step after it is assembled on a background thread meanwhile, from a copy of the sampler, so the
        sampler's state (what a checkpoint saves) only ever counts steps handed out; a prefetch whose indices are
        not the ones asked for (after a resume) is dropped."""
        step = self.sampler.next_step()
        pending, self._pending = self._pending, None
        batches = pending[1].result() if pending is not None and pending[0] == step else self._collate(step)
        ahead = copy.copy(self.sampler).next_step()
        if self._prefetch is None:
            self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshtune-data")
        self._pending = (ahead, self._prefetch.submit(self._collate, ahead))
        return batches

    def mean_loss(self, loss_sum: torch.Tensor, tokens: torch.Tensor) -> float:
        """The step's mean token loss over all dp ranks (a collective: call it on every rank)."""
        return self._reduce(loss_sum.double()).item() / max(tokens.item(), 1)

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over dp ranks, and over pipeline stages (only the last stage computes losses)."""
        for group in (self.dp_group, self.pp_group):
            if group is not None:
                dist.all_reduce(t, group=group)
        return t

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token loss and teacher-forced exact-match accuracy on the evaluation split, over all dp ranks.

        Every rank runs the same number of forwards (FSDP gathers parameters collectively), so ranks whose
        share runs out evaluate a fully masked batch that counts nothing."""
        self.model.eval()
        batches = eval_batches(len(self.eval_ds), self.cfg.train.micro_batch_size, self.mesh.dp_rank,
                               self.mesh.dp_size)
        if self.cfg.train.eval_batches:
            batches = batches[: self.cfg.train.eval_batches]
        if self.pipeline is not None:
            totals = self._pipeline_eval_counts(batches)
        else:
            totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, tokens, correct, sequences
            for idx in batches:
                batch = collate([self.eval_ds[i] for i in idx] or [self.eval_ds[0]])
                labels = batch["labels"].to(self.device)
                if not idx:
                    labels.fill_(IGNORE_INDEX)
                with self._autocast():
                    logits = self.model(*model_args(batch, self.device), **self._forward_kwargs)
                logits = self._as_loss_reads(logits)  # as in training: never the whole logits where it avoids them
                with self._loss_precision():
                    totals += eval_counts(logits, labels)
        loss, ntok, correct, nseq = self._reduce(totals).tolist()
        return {"eval_loss": loss / max(ntok, 1), "eval_accuracy": correct / max(nseq, 1)}

    def _pipeline_eval_counts(self, batches: list[list[int]]) -> torch.Tensor:
        """Evaluation through the schedule: rounds of exactly n_microbatches full-size micro-batches, the
        gaps filled with rows whose labels are all ignored."""
        n, mb = self.sampler.accum_steps, self.cfg.train.micro_batch_size
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)
        for start in range(0, len(batches), n):
            rounds = batches[start:start + n]
            rounds += [[]] * (n - len(rounds))
            micro = []
            for idx in rounds:
                batch = collate([self.eval_ds[i] for i in idx] + [self.eval_ds[0]] * (mb - len(idx)))
                batch["labels"][len(idx):] = IGNORE_INDEX
                micro.append(batch)
            totals += self.pipeline.evaluate(micro, self.device)
        return totals

    def save(self) -> None:
        meta = {"scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
                "layout": self.plan.describe() if self.plan is not None else self.mesh.describe()}
        self.engine.save(self.checkpointer, self.step, meta)

    def fit(self) -> dict:
        """Train to `train.steps` (or `train.stop_after`), evaluating, logging and checkpointing on schedule.

        Returns:
            The final step, the metric history and the last evaluation.
        """
        t, c = self.cfg.train, self.cfg.checkpoint
        tokens_per_step = t.global_batch_size * self.cfg.data.seq_len
        last_eval = None
        last_save = self.step if self.step else None  # a resumed run starts from that checkpoint
        window_start, window_steps = time.perf_counter(), 0
        end = min(t.steps, t.stop_after) if t.stop_after else t.steps
        while self.step < end:
            loss_sum, tokens, norm = self.train_step(self.next_micro_batches())
            window_steps += 1
            self.metrics.advance()
            if self.step % t.log_every == 0 or self.step == end:
                loss = self.mean_loss(loss_sum, tokens)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"step {self.step}: loss is {loss}; lower optim.lr or check the data")
                elapsed = (time.perf_counter() - window_start) / window_steps
                record = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                          "grad_norm": norm, "tokens_per_s": tokens_per_step / elapsed, "step_time_s": elapsed,
                          "mem_gb": round(peak_memory_gb(self.device), 3)}
                self.history.append(record)
                self.metrics.log(record)
                window_start, window_steps = time.perf_counter(), 0
            if t.eval_every and self.step % t.eval_every == 0:
                self._log_eval()
                last_eval = self.step
            if c.every and self.step % c.every == 0:
                self.save()
                last_save = self.step
            if self._agree_to_stop():  # preemption or a time limit: keep the work, leave together
                stopped = True
                break
        else:
            stopped = False
        if last_eval != self.step and not stopped:
            self._log_eval()
        if (c.save_final or end < t.steps or stopped) and last_save != self.step:
            self.save()
        if stopped:
            self.metrics.log({"step": self.step, "event": "stopped", "signal": self.stop_signal})
        self.metrics.close()
        if self._prefetch is not None:  # no thread outlives the run
            self._prefetch.shutdown(wait=True, cancel_futures=True)
            self._prefetch, self._pending = None, None
        evals = [r for r in self.history if "eval_loss" in r]
        return {"step": self.step, "history": self.history, "final_eval": evals[-1] if evals else None,
                "stopped": stopped}

    def _log_eval(self) -> None:
        record = {"step": self.step, **self.evaluate()}
        self.history.append(record)
        self.metrics.log(record)
