"""meshtune.recipes.qat.ops against torchao's fake quantizers: same values, same straight-through gradients,
fewer bytes saved for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meshtune.recipes.qat import QATLinear, QuantConfig, _SharedInput, fake_quantizers
from meshtune.recipes.qat.ops import act_codes, spec_of, weight_codes, weight_dequant

pytest.importorskip("torchao")

SCHEMES = [("int8-int4", 32), ("int8-int4", 0), ("int8-int8", 32), ("int8-int8", 0)]


def clamping_rows(k: int) -> torch.Tensor:
    """Two tokens whose extreme codes torchao clamps: it picks the zero point with lo / scale but quantizes with
    x * (1 / scale), and for these (found by search) the two round differently (max -> 128, min -> -129)."""
    x = torch.rand(2, k) * 0.02
    x[0, :2] = torch.tensor([-5.886145114898682, 79.8833999633789])
    x[1, :2] = torch.tensor([-8.379477500915527, 19.922069549560547])
    return x


def inputs(k: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    spread = 10 ** torch.empty(3, 7, 1).uniform_(-3, 3, generator=g)
    x = torch.randn(3, 7, k, generator=g) * spread
    x[0, 0] = 0  # an all-zero token: scale falls back to eps
    return [x, x.abs(), -x.abs(), clamping_rows(k)]


def torchao_grad(quantizer, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    quantizer(x).backward(g)
    return x.grad


@pytest.mark.parametrize("scheme,group_size", SCHEMES)
def test_activation_codes_equal_torchao(scheme, group_size):
    act, _ = fake_quantizers(nn.Linear(64, 16), QuantConfig(scheme=scheme, group_size=group_size))
    spec = spec_of(act.config)
    for x in inputs(64):
        fq, codes, scale, zp, mask = act_codes(x, spec)
        assert torch.equal(fq, act(x))  # bit-identical
        assert codes.dtype == torch.int8
        assert torch.equal((codes.float() - zp) * scale, fq.reshape(-1, 64))
        passes = torchao_grad(act, x, torch.ones_like(x)) != 0
        assert torch.equal(passes, torch.ones_like(passes) if mask is None else mask)
    assert mask is not None and (~mask).sum() == 2  # the clamping rows took the masked path


@pytest.mark.parametrize("scheme,group_size", SCHEMES)
def test_weight_codes_equal_torchao(scheme, group_size):
    _, wfq = fake_quantizers(nn.Linear(64, 48), QuantConfig(scheme=scheme, group_size=group_size))
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g) * 10 ** torch.empty(48, 1).uniform_(-3, 1, generator=g)
    w[0] = 0
    codes, scale, clamped = weight_codes(w, spec_of(wfq.config))
    assert torch.equal(weight_dequant(codes, scale), wfq(w))
    assert torch.equal(clamped.view(w.shape), torchao_grad(wfq, w, torch.ones_like(w)) == 0)
    assert clamped.any()  # the max of a group rounds past qmax about half the time


def layer_pair(scheme: str, group_size: int, bias: bool = True):
    """QATLinear and torchao's FakeQuantizedLinear with the same weights and quantizers."""
    from torchao.quantization.qat import FakeQuantizedLinear

    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=bias)
    act, wfq = fake_quantizers(lin, QuantConfig(scheme=scheme, group_size=group_size))
    ours = QATLinear.from_linear(lin, act, wfq, _SharedInput())
    ref = FakeQuantizedLinear(64, 48, bias=bias)
    ref.weight = nn.Parameter(lin.weight.detach().clone())
    ref.bias = nn.Parameter(lin.bias.detach().clone()) if bias else None
    ref.activation_fake_quantizer, ref.weight_fake_quantizer = act, wfq
    return ours, ref


@pytest.mark.parametrize("scheme,group_size", SCHEMES)
def test_quant_linear_gradients_equal_straight_through_reference(scheme, group_size):
    ours, ref = layer_pair(scheme, group_size)
    for x in inputs(64):
        g = torch.randn(*x.shape[:-1], 48)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, want = ours(xa), ref(xb)
        assert torch.equal(out, want)
        out.backward(g)
        want.backward(g)
        for a, b in ((xa.grad, xb.grad), (ours.weight.grad, ref.weight.grad), (ours.bias.grad, ref.bias.grad)):
            assert (a - b).abs().max() <= 1e-6 * b.abs().max()  # torchao multiplies by scale, then 1 / scale
            assert torch.equal(a == 0, b == 0)  # the same positions pass the gradient
        for p in (xa, xb, *ours.parameters(), *ref.parameters()):
            p.grad = None


def saved_bytes(fn) -> int:
    """Bytes of the unique storages autograd saves while running fn (parameters included)."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def test_saves_int8_codes_not_float_operands():
    """Three layers reading one input (wq, wk, wv): torchao saves its float fake-quantized input per layer and
    float weights; QATLinear saves one set of int8 input codes + scales, the per-step weight cache (float where
    the weight trains, int8 codes where it is frozen) and the indices of the clamped weight codes."""
    layers = [layer_pair("int8-int4", 32, bias=False) for _ in range(3)]
    shared = _SharedInput()
    for ours, _ in layers:
        ours._shared_input = shared
    x = torch.randn(8, 32, 64, requires_grad=True)
    ours_b = saved_bytes(lambda: sum(o(x).sum() for o, _ in layers))
    ref_b = saved_bytes(lambda: sum(r(x).sum() for _, r in layers))
    plain_b = saved_bytes(lambda: sum(F.linear(x, r.weight).sum() for _, r in layers))
    x_bytes, w_bytes, groups = x.numel() * 4, 48 * 64 * 4, 48 * 64 // 32
    x_codes = x_bytes / 4 + 8 * 32 * 8  # int8 codes, a scale and a zero point per token
    assert plain_b == x_bytes + 3 * w_bytes  # the input and the weights (parameters: no copy)
    assert ref_b >= 3 * x_bytes + 3 * w_bytes  # + a float fake-quantized input and weight per layer
    clamped = 3 * 2 * groups * 8  # int64 indices, at most two clamped codes a group (ties)
    assert ours_b <= x_codes + 3 * w_bytes + clamped
    for ours, _ in layers:  # frozen weights (LoRA's base): int8 codes + scales, no float copy, no indices
        ours.weight.requires_grad_(False)
        ours.invalidate()
    frozen_b = saved_bytes(lambda: sum(o(x).sum() for o, _ in layers))
    assert frozen_b <= x_codes + 3 * (w_bytes / 4 + groups * 4)
