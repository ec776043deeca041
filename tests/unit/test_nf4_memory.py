"""The planner's NF4 dequantization bytes (recipes/qlora: `nf4_linear_bytes`, `dequantize_rows_bytes`, the modules'
`dequantized_bytes`) against the bytes torch's CPU allocator holds while one call runs (meshtune.counted_memory),
within 10%; and the counter itself."""

import pytest
import torch
from torch import nn

from meshtune.counted_memory import UNRECORDED, _with_unrecorded_frees, counting
from meshtune.recipes.lora.recipe import LoRALinear
from meshtune.recipes.qlora.nf4 import NF4Embedding, NF4Head, dequantize_rows_bytes, nf4_api, nf4_linear_bytes
from meshtune.recipes.qlora.recipe import QLoRALinear

NF4Tensor, to_nf4, linear_nf4 = nf4_api()


def counted_peak(fn) -> int:
    """The most bytes `fn()` allocates that are live at once (its inputs were allocated before)."""
    with counting() as counted:
        out = fn()
    del out
    return counted.peak()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 1024), (1024, 256), (384, 640)])
def test_linear_nf4_dequantization_bytes_match_counted(shape, dtype):
    """torchao's `linear_nf4` dequantizes the whole weight in forward and again for backward's x gradient: the peak
    of either is `(8 + 3 elem) N` for N weights (int64 code indices, looked-up and scaled values, the result), and
    QLoRALinear reports it for its weight."""
    w = to_nf4(torch.randn(*shape, dtype=dtype), 64, 32)
    x = torch.randn(1, 4, shape[1], dtype=dtype, requires_grad=True)
    n, elem = w.numel(), dtype.itemsize
    predicted = nf4_linear_bytes(n, elem)
    forward = counted_peak(lambda: linear_nf4(x, w))  # the output comes after the dequantization's peak
    y = linear_nf4(x, w)
    grad = torch.ones_like(y)
    backward = counted_peak(lambda: torch.autograd.grad(y, x, grad, retain_graph=True))
    for counted in (forward, backward):
        assert abs(counted - predicted) / predicted < 0.10, (counted, predicted)
    module = QLoRALinear.quantize(LoRALinear(shape[1], shape[0], rank=4, alpha=8.0), 64, 32)
    assert module.dequantized_bytes(tokens=4) == nf4_linear_bytes(n, 4)  # built from fp32 weights


@pytest.mark.parametrize("rows_per_chunk", [64, 100])
def test_nf4_head_chunk_bytes_match_counted(rows_per_chunk):
    """The NF4 head dequantizes `rows_per_chunk` rows at a time, forward and backward: at a later chunk's peak it
    holds that chunk's `dequantize_rows` beside the whole output (the logits, or x's gradient)."""
    vocab, dim, tokens = 512, 256, 8
    head = nn.Linear(dim, vocab, bias=False)
    head.weight = nn.Parameter(to_nf4(torch.randn(vocab, dim), 64, 4), requires_grad=False)
    head.__class__, head.rows_per_chunk = NF4Head, rows_per_chunk
    x = torch.randn(1, tokens, dim, requires_grad=True)
    predicted = head.dequantized_bytes(tokens)
    assert predicted == dequantize_rows_bytes(rows_per_chunk, dim, 4)
    forward = counted_peak(lambda: head(x)) - 4 * tokens * vocab
    y = head(x)
    grad = torch.ones_like(y)
    backward = counted_peak(lambda: torch.autograd.grad(y, x, grad, retain_graph=True)) - 4 * x.numel()
    for counted in (forward, backward):
        assert abs(counted - predicted) / predicted < 0.10, (counted, predicted)


def test_nf4_embedding_lookup_bytes_match_counted():
    vocab, dim, tokens = 512, 256, 64
    emb = nn.Embedding(vocab, dim)
    emb.weight = nn.Parameter(to_nf4(torch.randn(vocab, dim), 64, 4), requires_grad=False)
    emb.__class__ = NF4Embedding
    ids = torch.randint(0, vocab, (1, tokens))
    predicted = emb.dequantized_bytes(tokens)
    counted = counted_peak(lambda: emb(ids))  # at the lookup, before the output exists
    assert abs(counted - predicted) / predicted < 0.10, (counted, predicted)


def test_counting_peaks_windows_and_frees_it_did_not_see():
    with counting() as counted:
        a = torch.empty(1000)  # 4000 B
        with torch.profiler.record_function("inside"):
            b = torch.empty(500)
            del b
        c = torch.empty(2000)
        del c
    assert counted.peak() == 12000 and counted.peak(counted.spans("inside")) == 6000
    assert counted.held_at(counted.peak_index()[1])[0]["bytes"] == 12000
    del a
    # an address allocated again while still live was freed where the profiler could not see it
    events = _with_unrecorded_frees([(1, 100, 7, "x"), (2, 50, 7, "y"), (3, -50, 7, "y")])
    assert [e[1] for e in events] == [100, -100, 50, -50] and events[1][3] == UNRECORDED
