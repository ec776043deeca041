"""NF4 storage for QLoRA's frozen modules beyond the block projections: the token embedding and the output head.

A Llama-3.2-1B's tied 128K x 2048 embedding is 0.22x of the whole fp32 model; left in fp32 beside an NF4 base
it is most of the model state. `NF4Embedding` and `NF4Head` store it as torchao's NF4Tensor (`to_nf4` at the
projections' block_size, with scale groups kept within a row, `row_scaler_block_size`; FSDP2 shards and
all-gathers it as NF4 like the projections; `recipe.qlora.quantize_embeddings`), and never build the whole
dequantized matrix:

    NF4Embedding   a lookup dequantizes only the looked-up rows (`dequantize_rows`; `block_size` must divide
                   the row width, so a row's codes and block scales are its own), bitwise equal to rows of
                   torchao's `get_original_weight()`; the output is in the weight's dtype (fp32), as a plain
                   fp32 embedding's; under bf16 compute FSDP2 (or autocast) casts it at the first block.
    NF4Head        logits = x W^T computed `rows_per_chunk` vocabulary rows at a time: each chunk is
                   dequantized, multiplied and freed, and backward (x's gradient only: W is frozen) dequantizes
                   the chunks again. Transient memory: one chunk (2^22 weights: 16 MiB in fp32, ~40 MiB with
                   its code indices and products) instead of the whole matrix (1 GiB at 128K x 2048). With a tied
                   embedding it holds the same Parameter.

The cost is compute: every forward dequantizes the rows it reads (the head: all of them, twice per step with
backward, three times under `train.loss_chunk_size`, whose backward recomputes the head). The error is NF4's:
half the widest code gap times the block absmax per weight (tests/unit/test_qlora.py), on every logit's weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from meshtune.artifacts.packed import is_nf4, local_tensor
from meshtune.quiet import quiet_torchao

HEAD_CHUNK_WEIGHTS = 2**22  # weights of the output head dequantized at once (16 MiB in fp32)


def nf4_api():
    """torchao's (NF4Tensor, to_nf4, linear_nf4), its import messages silenced."""
    quiet_torchao()
    from torchao.quantization import NF4Tensor, to_nf4
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

    return NF4Tensor, to_nf4, linear_nf4


def dequantize_rows(w: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    """Rows `rows` of the 2-D NF4 tensor `w` in its dtype (an index tensor of any shape, or a slice), dequantizing
    only those: `w.get_original_weight()[rows]`, bitwise, when `w.block_size` divides the row width.

    Each byte of `quantized_data` holds two consecutive weights' 4-bit codes (high nibble first); block k's scale
    is `quantized_scalers[k] / quantization_factor[k // scaler_block_size] + scaler_mean`, as torchao decodes it.
    """
    n_rows, width = w.shape
    per_row = width // w.block_size  # blocks in a row
    assert per_row * w.block_size == width and w.block_size % 2 == 0, (w.shape, w.block_size)
    codes = w.quantized_data.view(n_rows, width // 2)[rows]  # (..., width/2) two codes per byte
    scalers = w.quantized_scalers.view(n_rows, per_row)[rows]  # (..., per_row) int8
    if isinstance(rows, slice):
        first = rows.start or 0
        blocks = torch.arange(first * per_row, first * per_row + scalers.numel(), device=codes.device)
        blocks = blocks.view(scalers.shape)
    else:
        blocks = rows.unsqueeze(-1) * per_row + torch.arange(per_row, device=codes.device)
    scales = (scalers / w.quantization_factor[blocks // w.scaler_block_size]).to(w.dtype) + w.scaler_mean
    byte = torch.arange(256, device=codes.device)
    pairs = torch.stack([w.nf4[byte >> 4], w.nf4[byte & 15]], dim=-1)  # (256, 2): a byte's two code values
    values = pairs[codes.int()]  # (..., width/2, 2), in weight order
    values = values.view(*codes.shape[:-1], per_row, w.block_size // 2, 2) * scales[..., None, None]
    return values.view(*codes.shape[:-1], width)


def nf4_linear_bytes(numel: int, elem: int) -> int:
    """Bytes torchao's `get_original_weight` holds at once for a `numel`-weight NF4 tensor of element size `elem`
    (the peak of `linear_nf4`, both ways): the two nibbles' code indices as int64 (numel / 2 each), the values
    looked up from them and the same scaled (numel x elem each, both halves), and the stacked result (numel x
    elem), `(8 + 3 elem) numel` (tests/unit/test_nf4_memory.py counts it). A cast to another compute dtype comes
    after these are freed, and is smaller."""
    return (8 + 3 * elem) * numel


def dequantize_rows_bytes(rows: int, width: int, elem: int, indexed: bool = False) -> int:
    """Bytes `dequantize_rows` holds at once for `rows` rows of `width` weights of element size `elem`, at the
    lookup of the code values: the codes as int32 (2 B per weight) and the int64 copy indexing makes of them (4 B),
    beside the values looked up (`elem`); with `indexed` rows (an index tensor, not a slice) the rows' packed codes
    are gathered into a copy first (0.5 B). The scaled values come after the indices are freed (2 elem, less)."""
    return int((6 + elem + (0.5 if indexed else 0)) * rows * width)


class NF4Module:
    """Mixin for modules holding NF4Tensor parameters: `_apply` (to_empty, to) leaves them usable, and a deep copy
    (pipeline stages are cut from copies) copies their parts instead of re-quantizing."""

    def _apply(self, fn, recurse: bool = True):
        """nn.Module's `_apply`, then the NF4 parts torchao's `empty_like` leaves on meta (the scaler mean and the
        16-value table) made real: a model built on meta is materialised by `to_empty`, then loaded into."""
        out = super()._apply(fn, recurse)
        for p in self._parameters.values():
            w = local_tensor(p) if p is not None else None
            if w is None or not is_nf4(w) or w.is_meta:
                continue
            if w.nf4.is_meta:
                w.nf4 = nf4_api()[1](torch.ones(1, 64, dtype=w.dtype), 64, 1).nf4.to(w.device)
            if w.scaler_mean.is_meta:
                w.scaler_mean = torch.zeros((), dtype=w.scaler_mean.dtype, device=w.device)
        return out

    def __deepcopy__(self, memo):
        """A deep copy whose NF4 parameters are copied part by part: torchao's NF4 `clone` re-quantizes the
        dequantized weight at its default block sizes. A Parameter shared with another module (a tied head) is
        copied once, through `memo`."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_parameters":
                new._parameters = {n: (copy_nf4(p, memo) if p is not None and is_nf4(p) else copy.deepcopy(p, memo))
                                   for n, p in value.items()}
            else:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new


def copy_nf4(p: nn.Parameter, memo: dict) -> nn.Parameter:
    """A frozen Parameter holding a copy of the NF4 tensor `p` (its parts cloned, nothing re-quantized)."""
    if id(p) not in memo:
        names, ctx = p.__tensor_flatten__()
        t = type(p).__tensor_unflatten__({n: getattr(p, n).clone() for n in names}, ctx, p.shape, p.stride())
        memo[id(p)] = nn.Parameter(t, requires_grad=False)
    return memo[id(p)]


def quantize_weight(module: nn.Module, block_size: int, scaler_block_size: int) -> None:
    """`module.weight` replaced by a frozen Parameter holding `to_nf4` of it (on meta too)."""
    w = module.weight
    module.weight = nn.Parameter(nf4_api()[1](w.detach().contiguous(), block_size, scaler_block_size),
                                 requires_grad=False)


class NF4Embedding(NF4Module, nn.Embedding):
    """A frozen `nn.Embedding` whose weight is an NF4Tensor; a lookup dequantizes the looked-up rows only."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(self.weight, tokens)  # (B, T, dim) in the weight's dtype

    def dequantized_bytes(self, tokens: int) -> int:
        """Bytes a lookup of `tokens` tokens allocates at once to dequantize their rows."""
        return dequantize_rows_bytes(tokens, self.embedding_dim, local_tensor(self.weight).dtype.itemsize, True)


class NF4Head(NF4Module, nn.Linear):
    """A frozen bias-free `nn.Linear` (the output head) whose weight is an NF4Tensor, applied `rows_per_chunk`
    output rows at a time."""

    rows_per_chunk: int = 0  # 0: HEAD_CHUNK_WEIGHTS // in_features

    def chunk_rows(self) -> int:
        return self.rows_per_chunk or max(1, HEAD_CHUNK_WEIGHTS // self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ChunkedNF4Linear.apply(x, self.weight, self.chunk_rows())

    def dequantized_bytes(self, tokens: int) -> int:
        """Bytes one chunk's dequantization allocates at once (forward or backward), beside the logits."""
        rows = min(self.chunk_rows(), self.out_features)
        return dequantize_rows_bytes(rows, self.in_features, local_tensor(self.weight).dtype.itemsize)


class _ChunkedNF4Linear(torch.autograd.Function):
    """x W^T for a frozen NF4 W, dequantizing `rows` rows of W at a time in forward and again in backward;
    autograd keeps W's NF4 bytes only (torchao's `linear_nf4` dequantizes all of W at once, both ways)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.rows = rows
        n_rows = weight.shape[0]
        if n_rows <= rows:
            return x @ dequantize_rows(weight, slice(0, n_rows)).to(x.dtype).t()
        chunks = [slice(i, min(i + rows, n_rows)) for i in range(0, n_rows, rows)]
        first = x @ dequantize_rows(weight, chunks[0]).to(x.dtype).t()  # the output dtype (autocast's, if on)
        out = first.new_empty(*x.shape[:-1], n_rows)  # (..., V)
        out[..., chunks[0]] = first
        del first
        for part in chunks[1:]:
            out[..., part] = x @ dequantize_rows(weight, part).to(x.dtype).t()
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        n_rows = weight.shape[0]
        grad_x = None
        for i in range(0, n_rows, ctx.rows):
            part = slice(i, min(i + ctx.rows, n_rows))
            g = grad[..., part] @ dequantize_rows(weight, part).to(grad.dtype)
            grad_x = g if grad_x is None else grad_x.add_(g)
        return grad_x, None, None


def row_scaler_block_size(width: int, block_size: int, scaler_block_size: int) -> int:
    """The embedding's and head's double-quantization group: the largest divisor of a row's block count not above
    `scaler_block_size`, so no group crosses a row and any vocabulary splits over FSDP2 ranks by whole rows
    (Llama-3.2-1B at the defaults: 32 blocks, one group per row)."""
    per_row = width // block_size
    return max(d for d in range(1, min(per_row, scaler_block_size) + 1) if per_row % d == 0)


def quantize_frozen_ends(model: nn.Module, block_size: int, scaler_block_size: int) -> list[str]:
    """Store the model's frozen token embedding and (untied, not LoRA-adapted) output head as NF4 in place, the
    head sharing the embedding's NF4 Parameter where they were tied; returns the names of the modules swapped.
    Scale groups are whole rows or parts of one (`row_scaler_block_size`).

    Raises:
        ConfigError: naming `recipe.qlora.quantize_embeddings`, for a row width NF4 rows cannot hold.
    """
    from meshtune.config import ConfigError

    emb, head = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    tied = emb is not None and head is not None and head.weight is emb.weight
    done = []
    for name, module, cls in (("tok_embeddings", emb, NF4Embedding), ("output", head, NF4Head)):
        if module is None or type(module) not in (nn.Embedding, nn.Linear) or module.weight.requires_grad:
            continue  # absent (a pipeline stage), adapted (a QLoRALinear head) or trained by a stacked recipe
        if isinstance(module, nn.Linear) and module.bias is not None:
            continue
        rows, width = module.weight.shape
        if width % block_size or block_size % 2:
            raise ConfigError(f"recipe.qlora.quantize_embeddings: {name} rows are {width} wide, and NF4 rows need "
                              f"an even block_size dividing that (got {block_size}); pick one, or set "
                              "recipe.qlora.quantize_embeddings=false")
        if name == "output" and tied:
            module.weight = emb.weight  # the embedding's NF4 Parameter, still tied
        else:
            quantize_weight(module, block_size, row_scaler_block_size(width, block_size, scaler_block_size))
        module.__class__ = cls
        done.append(name)
    return done
