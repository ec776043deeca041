"""Chunked cross-entropy: the output head and the loss over sequence chunks, never the full (B, T, V) logits.

A 128K vocabulary at 8K tokens is 4 GiB of fp32 logits per sequence, and backward holds their gradient too.
With `train.loss_chunk_size: c` the model returns its final hidden states (B, T, dim) (`hidden_only=True`)
and the loss runs the head on c positions at a time. Each chunk's head matmul and fp32 loss run inside
`torch.utils.checkpoint`: backward keeps only the chunk's input (a view of the hidden states, which exist
anyway) and recomputes the chunk's logits there, one chunk at a time. Peak logits memory: B x c x V (with
its fp32 copy and gradient) instead of B x T x V. Cost: the head's forward matmul runs twice (one third more
head FLOPs). The head is called as a module, so LoRA, fake-quant and tensor-parallel hooks on it still run.

    logits = ChunkedLogits(model(tokens, hidden_only=True), model.output, 512)
    loss = logits.sum_over_chunks(summed_loss, labels)    # what summed_loss(logits, labels) does for you

Recipes whose loss reads logits (distillation's KL) receive a ChunkedLogits and sum their term the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from meshtune.models.decoder import softcap_logits


def recomputed(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """fn(*args), under a non-reentrant checkpoint when autograd records (backward recomputes what it made instead
    of keeping it); called directly when nothing is differentiated (evaluation)."""
    return checkpoint(fn, *args, use_reentrant=False) if torch.is_grad_enabled() else fn(*args)


class HiddenLogits:
    """Base of the logits stand-ins (ChunkedLogits; vocab_parallel.VocabParallelLogits): they hold the head's input
    `hidden` and report its device and dtype where code asks the logits for them."""

    hidden: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype


class ChunkedLogits(HiddenLogits):
    """Stand-in for the (B, T, V) logits of `head(hidden)`, computed `chunk_size` positions at a time.

    Attributes:
        hidden: the head's input (B, T, dim).
        head: the output projection module.
        chunk_size: sequence positions per chunk.
        softcap: model.logit_softcap (Gemma 2): each chunk's logits become softcap * tanh(logits / softcap).
    """

    def __init__(self, hidden: torch.Tensor, head: nn.Module, chunk_size: int, softcap: float = 0.0):
        assert chunk_size > 0, chunk_size
        self.hidden, self.head, self.chunk_size, self.softcap = hidden, head, chunk_size, softcap

    def sum_over_chunks(self, fn: Callable[..., torch.Tensor], *aligned: torch.Tensor) -> torch.Tensor:
        """Sum over sequence chunks of `fn(logits_chunk, *aligned_chunks)`.

        Args:
            fn: a deterministic function of one chunk's logits (B, c, V) and the matching slices of `aligned`,
                returning a scalar (it runs again in backward, on the recomputed logits).
            aligned: (B, T, ...) tensors sliced along the sequence like the logits (labels, masks, a teacher's
                hidden states).
        """
        T = self.hidden.shape[1]
        total = None
        for start in range(0, T, self.chunk_size):
            parts = [t[:, start:start + self.chunk_size] for t in (self.hidden, *aligned)]
            part = recomputed(functools.partial(self._apply, fn), *parts)
            total = part if total is None else total + part
        return total

    def argmax(self, dim: int = -1) -> torch.Tensor:
        """The (B, T) argmax over the vocabulary, chunk by chunk (evaluation's exact match)."""
        assert dim in (-1, 2), dim
        with torch.no_grad():
            return torch.cat([self._logits(self.hidden[:, start:start + self.chunk_size]).argmax(dim=-1)
                              for start in range(0, self.hidden.shape[1], self.chunk_size)], dim=1)

    def _apply(self, fn: Callable[..., torch.Tensor], hidden: torch.Tensor, *aligned: torch.Tensor) -> torch.Tensor:
        return fn(self._logits(hidden), *aligned)  # (B, c, V) logits live only inside this call

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return softcap_logits(self.head(hidden), self.softcap)

    def full(self) -> torch.Tensor:
        """The whole (B, T, V) logits (evaluation, tests)."""
        return self._logits(self.hidden)
