"""torchao's fake quantization in plain torch ops, and a fake-quantized linear that saves int8 codes.

Why not call torchao's fake quantizers in the training step: autograd through them keeps their float
intermediates for backward (the fake-quantized input, 4 bytes an element, plus a clamp mask) in every layer
and micro-batch, and they fake-quantize the weight again in every forward. Here the same numbers are
computed with plain torch ops (`act_codes`, `weight_codes`: bit-identical to torchao's IntxFakeQuantizer
for the configs meshtune uses: int8 per-token asymmetric activations, symmetric per-group / per-channel
int4 or int8 weights; tests compare them), and `QuantLinear` saves the input's int8 codes, scales and zero
points (plus 1-byte clamp flags for the rare input tokens whose codes clamp) and dequantizes again in
backward (a few elementwise passes next to three matmuls); the weight's side is the per-step cache
(meshtune.recipes.qat: the float fake-quantized weight where it trains, int8 codes where it is frozen) and
the indices of its clamped codes. On a GPU, `act_codes` syncs once per input (`.any()`).

Straight-through gradients, as torchao's: the gradient of the float input is the gradient of the
fake-quantized value where the rounded value was not clamped (torchao's `_Round` passes the gradient
through, `torch.clamp` zeroes it outside [qmin, qmax]), zero where it was. torchao's chain multiplies by the
scale and then by 1 / scale; this applies the mask only, so gradients agree to float rounding (~1e-7 rel.).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a torchao IntxFakeQuantizeConfig asks for, in the cases meshtune prepares."""

    qmin: int
    qmax: int
    group_size: int  # 0: one scale per row (PerAxis(0)) or per token
    symmetric: bool
    eps: float


def spec_of(config) -> Spec:
    """The Spec of a torchao IntxFakeQuantizeConfig; raises ValueError for what these ops do not reproduce."""
    from torchao.quantization.granularity import PerAxis, PerGroup, PerToken
    from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, MappingType

    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[config.dtype]
    g = config.granularity
    symmetric = config.mapping_type == MappingType.SYMMETRIC
    ok = (config.scale_precision in (None, torch.float32) and not config.range_learning and config.is_dynamic
          and config.zero_point_domain.name == "INT"
          and (isinstance(g, PerToken) and not symmetric and config.mapping_type == MappingType.ASYMMETRIC
               or isinstance(g, PerGroup | PerAxis) and symmetric))
    if not ok or (isinstance(g, PerAxis) and g.axis != 0):
        raise ValueError(f"meshtune's fake quantization does not reproduce {config}")
    eps = torch.finfo(torch.float32).smallest_normal if config.eps is None else config.eps
    return Spec(qmin, qmax, g.group_size if isinstance(g, PerGroup) else 0, symmetric, eps)


def act_codes(x: torch.Tensor, s: Spec) -> tuple:
    """Per-token asymmetric quantization of x (..., K), as torchao's choose_qparams_affine + fake quantize:
    (fake-quantized x, int8 codes, scale (M, 1), zero point (M, 1, float), clamp mask or None).

    The codes round(x / scale) + zp are monotone in x, so the codes of a row's min and max tell whether any
    element of it was clamped; they seldom are (the scale spans the row), and then there is no mask to keep
    (None: all elements pass the gradient) and the fake-quantized value is round(x / scale) * scale, which
    equals torchao's (q - zp) * scale exactly (small integers are exact in float)."""
    rows = x.detach().reshape(-1, x.shape[-1])
    lo_x, hi_x = rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True)  # aminmax(dim=-1): ~10x slower on CPU
    lo, hi = lo_x.clamp(max=0), hi_x.clamp(min=0)
    scale = ((hi - lo) / float(s.qmax - s.qmin)).clamp(min=s.eps)
    zp = (s.qmin - torch.round(lo / scale)).clamp(s.qmin, s.qmax)
    inv = 1.0 / scale
    r = torch.mul(rows, inv).round_()
    clamped = bool(((torch.round(lo_x * inv) + zp < s.qmin) | (torch.round(hi_x * inv) + zp > s.qmax)).any())
    if not clamped:
        codes = torch.add(r, zp).to(torch.int8)
        return r.mul_(scale).view(x.shape), codes, scale, zp, None
    v = r.add_(zp)
    q = v.clamp(s.qmin, s.qmax)
    mask = q == v
    del v, r
    codes = q.to(torch.int8)
    fq = q.sub_(zp).mul_(scale)
    return fq.view(x.shape), codes, scale, zp, mask.view(x.shape)


def act_dequant(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, shape) -> torch.Tensor:
    # cast first: int8 - float with broadcasting takes a slow mixed-dtype path on CPU (~15x); same values
    return codes.to(scale.dtype).sub_(zp).mul_(scale).view(shape)


def weight_codes(w: torch.Tensor, s: Spec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric per-group (per-row for group 0) quantization of a 2-D weight, as torchao's
    get_group_qparams_symmetric + fake quantize: (int8 codes (N, K/g, g), scale (N, K/g, 1), clamped: the
    codes that were clamped, where the straight-through gradient is zero)."""
    n, k = w.shape
    g = s.group_size or k
    groups = w.detach().reshape(n, k // g, g)
    scale = (groups.abs().amax(-1, keepdim=True) / (float(s.qmax - s.qmin) / 2)).clamp(min=s.eps)
    v = torch.mul(groups, 1.0 / scale).round_()
    q = v.clamp(s.qmin, s.qmax)
    return q.to(torch.int8), scale, q != v


def weight_dequant(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.to(scale.dtype).mul_(scale).view(codes.shape[0], -1)


class QuantInput(torch.autograd.Function):
    """x -> its fake-quantized value (computed by the caller); backward: the gradient where not clamped.

    One node per distinct input: the layers reading it (wq, wk, wv) add their gradients before the mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return fq

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad if mask is None else grad * mask, None, None


class QuantLinear(torch.autograd.Function):
    """F.linear(fake-quantized x, fake-quantized W, bias) saving int8 codes of x instead of its float value.

    Inputs: xq = the fake-quantized input (QuantInput's output) and its codes / scale / zero point; weight (the
    parameter, for its gradient); w_fq = its fake-quantized value and what backward keeps of it: w_codes and
    w_scale (dequantized again there), or w_codes None to keep w_fq itself (a per-step cache every micro-batch
    shares); w_clamped = flat indices of the weight codes that were clamped (None when the weight takes no
    gradient); bias. Backward: grad xq = g W_fq, grad W = g^T x_fq, zero where clamped."""

    @staticmethod
    def forward(ctx, xq, weight, bias, x_codes, x_scale, x_zp, w_fq, w_codes, w_scale, w_clamped):
        out = torch.nn.functional.linear(xq, w_fq, bias)
        ctx.x_shape = xq.shape
        ctx.save_for_backward(x_codes, x_scale, x_zp, w_fq if w_codes is None else w_codes, w_scale, w_clamped)
        return out

    @staticmethod
    def backward(ctx, grad):
        x_codes, x_scale, x_zp, w, w_scale, w_clamped = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g2 = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if need_x:
            w_fq = w if w.is_floating_point() else weight_dequant(w, w_scale)
            gx = (g2 @ w_fq).view(ctx.x_shape)
        if need_w:
            x = act_dequant(x_codes, x_scale, x_zp, (g2.shape[0], -1))
            gw = g2.t() @ x
            gw.view(-1).index_fill_(0, w_clamped, 0)  # the straight-through mask: few codes clamp (a group's max)
        if need_b:
            gb = g2.sum(0)
        return gx, gw, gb, None, None, None, None, None, None, None
