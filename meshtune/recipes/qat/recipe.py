"""Quantization-aware training with torchao's QAT API (`recipe.name: qat`, or `lora+qat`).

    meshtune train finetune/qat init_from=runs/tiny/model.safetensors    # recipe.name: qat
    meshtune export runs/finetune-qat --format quantized                 # real int8/int4 weights

Schemes (`recipe.qat.scheme`), both torchao `Int8DynamicActivationIntxWeightConfig`, which runs on CPU:
    int8-int4   int8 dynamic per-token activations (asymmetric) + int4 symmetric weights, one scale per
                `recipe.qat.group_size` input features (PerGroup; 0 = per output channel, PerAxis(0));
    int8-int8   the same with int8 weights.
`apply` (before parallelize) runs torchao's prepare step (`quantize_(model, QATConfig(base, step="prepare"))`
on the targeted linears) and swaps each resulting `FakeQuantizedLinear` for `QATLinear`: the same module and
fake quantizers (kept for torchao's convert step), but training runs `meshtune.recipes.qat.ops`: the same
numbers as torchao's quantizers (bit-identical forward, tested) computed with plain torch ops, and a
`QuantLinear` autograd function that saves the inputs' int8 codes + scales for backward and dequantizes there
again, instead of autograd keeping torchao's float operands. Weights are quantized ONCE per optimizer step
(the float fake-quantized weight where it trains, int8 codes + scales where it is frozen, and the indices of
the clamped codes; reused by every micro-batch); `after_optimizer_step` drops the caches, and a cache also
stops matching when the weight changes in place (its version counter moves).
Activations are dynamic: quantized in every forward, once per input tensor (wq, wk and wv share the codes
and one straight-through node). Under FSDP2 the forward sees the gathered full weight; a cache would keep a
full-size copy of every layer on every rank, so layers whose parameter is a DTensor between steps are
quantized in every forward instead.

LoRA (`lora+qat`): a targeted `LoRALinear` becomes `QATLoRALinear`: the frozen base weight (and the input of
the base path) is fake-quantized, the LoRA path B A x stays in fp32 and trains. Convert merges B A into W
first, then quantizes the merged weight (`convert`).

`convert` = torchao's convert step (`QATConfig(base, step="convert")`): real quantized weights
(IntxUnpackedToInt8Tensor; int4 values one per int8 byte in memory, packed two to a byte on disk by
`meshtune.export.quantized`). `ptq` quantizes a plain model with the same base config (post-training
quantization, the baseline QAT must beat).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from meshtune.config import ConfigError
from meshtune.quiet import quiet_torchao
from meshtune.recipes.base import Recipe
from meshtune.recipes.lora.recipe import LoRALinear
from meshtune.recipes.targets import matches

if TYPE_CHECKING:
    from meshtune.recipes.qat import QuantConfig
from meshtune.recipes.qat.ops import QuantInput, QuantLinear, Spec, act_codes, spec_of, weight_codes, weight_dequant

WEIGHT_BITS = {"int8-int4": 4, "int8-int8": 8}


def base_config(c: QuantConfig):
    """The torchao PTQ config a scheme stands for (QAT derives its fake quantizers from it)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    if c.scheme not in WEIGHT_BITS:
        raise ConfigError(f"recipe.qat.scheme: {c.scheme!r} is not one of {', '.join(WEIGHT_BITS)}")
    dtype = getattr(torch, f"int{WEIGHT_BITS[c.scheme]}")
    granularity = PerGroup(c.group_size) if c.group_size else PerAxis(0)
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity)


def qat_targets(model: nn.Module, c: QuantConfig) -> list[str]:
    """Names of the linear layers `recipe.qat.targets` select (never LoRA's own A / B layers).

    Raises:
        ConfigError: naming recipe.qat.targets for a pattern matching no module or a non-linear module, or
            naming recipe.qat.group_size when it does not divide a target's in_features.
    """
    lora = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    modules = {n: m for n, m in model.named_modules() if n and n.rpartition(".")[0] not in lora}
    names = []
    for p in c.targets:
        hits = [n for n in modules if matches(n, p)]
        linear = [n for n in hits if type(modules[n]) in (nn.Linear, LoRALinear, QATLinear, QATLoRALinear)]
        if len(linear) < len(hits):
            bad = next(n for n in hits if n not in linear)
            raise ConfigError(f"recipe.qat.targets: {p!r} matches {bad} ({type(modules[bad]).__name__}), which QAT "
                              "cannot quantize; name nn.Linear layers only (e.g. wq, w1, output)")
        if not linear:
            examples = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear)})
            raise ConfigError(f"recipe.qat.targets: {p!r} matches no linear layer; use names such as "
                              f"{', '.join(examples)} (matched at the end of module names, globs allowed)")
        names += [n for n in linear if n not in names]
    for n in names:
        k = modules[n].in_features
        if c.group_size and k % c.group_size:
            raise ConfigError(f"recipe.qat.group_size: {c.group_size} does not divide in_features={k} of {n}; "
                              "choose a divisor of every targeted layer's in_features (or 0 = per channel)")
    return names


class _SharedInput:
    """The quantized last input, shared by the layers of one model that read the same tensor (wq, wk and wv;
    w1 and w3): one QuantInput node (its clamp mask, if any token clamps, saved once) and one set of int8 codes
    for all of them. Dropped when that tensor is freed, so it never keeps a finished graph alive."""

    def __init__(self):
        self.ref, self.key, self.value = None, None, None

    def __call__(self, spec: Spec, x: torch.Tensor) -> tuple:
        """(fake-quantized x, int8 codes, scale, zero point) of x."""
        need_grad = x.requires_grad and torch.is_grad_enabled()
        key = (x._version, need_grad, spec)
        if self.ref is None or self.ref() is not x or self.key != key:
            self._drop(self.ref)  # first: freeing the old value may free its input and call _drop
            fq, codes, scale, zp, mask = act_codes(x, spec)
            xq = QuantInput.apply(x, fq, mask) if need_grad else fq
            self.ref, self.key, self.value = weakref.ref(x, self._drop), key, (xq, codes, scale, zp)
        return self.value

    def _drop(self, ref: weakref.ref) -> None:
        if ref is self.ref:
            self.ref, self.key, self.value = None, None, None


class _WeightCache:
    """Mixin for linear layers with torchao fake quantizers: quantize the weight once per optimizer step and
    run the layer as `QuantLinear` (int8 codes saved for backward, see meshtune.recipes.qat.ops)."""

    activation_fake_quantizer: nn.Module
    weight_fake_quantizer: nn.Module

    def _init_cache(self, act_fq: nn.Module, weight_fq: nn.Module, shared: _SharedInput) -> None:
        self.activation_fake_quantizer, self.weight_fake_quantizer = act_fq, weight_fq
        self._specs = (spec_of(act_fq.config), spec_of(weight_fq.config))
        self._shared_input = shared
        self.cache_weight = True  # switched off for FSDP-sharded weights (see the module docstring)
        self._fq_cache: tuple | None = None

    def invalidate(self) -> None:
        self._fq_cache = None

    def quantized_weight(self) -> tuple:
        """(fake-quantized weight, int8 codes and scales for backward to keep or (None, None) to keep the
        fake-quantized weight, flat indices of the clamped codes or None without gradient), from the cache while
        the weight is unchanged (same storage and version).

        A trained weight's cache is its float fake-quantized value: its state is already 16 bytes a parameter
        (weight, gradient, AdamW moments), the cache adds 4, and no micro-batch dequantizes again. A frozen
        weight (LoRA's base) caches int8 codes (a float copy would double it) and dequantizes per use; so does
        a weight that is not cached (FSDP2), whose backward keeps the codes rather than a float copy."""
        w = self.weight
        need_grad = w.requires_grad and torch.is_grad_enabled()
        key = (w.data_ptr(), w._version, w.shape)
        cached = self._fq_cache
        if cached is not None and cached[0] == key and (cached[4] is not None or not need_grad):
            w_fq, codes, scale, clamped = cached[1:]
            return (w_fq if w_fq is not None else weight_dequant(codes, scale)), codes, scale, clamped
        codes, scale, mask = weight_codes(w, self._specs[1])
        clamped = mask.flatten().nonzero().squeeze(1) if need_grad else None
        w_fq = weight_dequant(codes, scale)
        if self.cache_weight:
            keep_float = w.requires_grad
            self._fq_cache = (key, w_fq if keep_float else None, None if keep_float else codes,
                              None if keep_float else scale, clamped)
            if keep_float:
                return w_fq, None, None, clamped
        return w_fq, codes, scale, clamped

    def fake_quantized_weight(self) -> torch.Tensor:
        """torchao's fake quantization of the current weight (no gradient)."""
        return self.quantized_weight()[0]

    def quantized_linear(self, x: torch.Tensor) -> torch.Tensor:
        xq, x_codes, x_scale, x_zp = self._shared_input(self._specs[0], x)
        w_fq, w_codes, w_scale, w_clamped = self.quantized_weight()
        grad = torch.is_grad_enabled() and (xq.requires_grad or self.weight.requires_grad
                                            or self.bias is not None and self.bias.requires_grad)
        if not grad:
            return F.linear(xq, w_fq, self.bias)
        return QuantLinear.apply(xq, self.weight, self.bias, x_codes, x_scale, x_zp, w_fq, w_codes, w_scale,
                                 w_clamped)


class QATLinear(nn.Linear, _WeightCache):
    """torchao's FakeQuantizedLinear computation with the weight fake-quantized once per optimizer step.

    (An nn.Linear subclass so that importing meshtune.recipes does not import torchao, ~5 s.)"""

    @classmethod
    def from_linear(cls, m: nn.Linear, act_fq, weight_fq, shared: _SharedInput) -> QATLinear:
        new = cls(m.in_features, m.out_features, m.bias is not None, device="meta", dtype=m.weight.dtype)
        new.weight, new.bias = m.weight, m.bias  # the same Parameters: names and sharding unchanged
        new._init_cache(act_fq, weight_fq, shared)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized_linear(x)

    def to_fake_quantized_linear(self):
        """torchao's FakeQuantizedLinear with the same weight and quantizers (what its convert step takes)."""
        from torchao.quantization.qat import FakeQuantizedLinear

        new = FakeQuantizedLinear(self.in_features, self.out_features, self.bias is not None, device="meta",
                                  dtype=self.weight.dtype)
        new.weight, new.bias = self.weight, self.bias
        new.activation_fake_quantizer, new.weight_fake_quantizer = (self.activation_fake_quantizer,
                                                                    self.weight_fake_quantizer)
        return new


class QATLoRALinear(LoRALinear, _WeightCache):
    """LoRALinear whose frozen base path is fake-quantized; the LoRA path B A x stays in full precision."""

    @classmethod
    def from_lora(cls, m: LoRALinear, act_fq, weight_fq, shared: _SharedInput) -> QATLoRALinear:
        m.__class__ = cls  # the same module object: LoRA parameters, names and hooks stay as they are
        m._init_cache(act_fq, weight_fq, shared)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quantized_linear(x)
        if self.merged:
            return out
        return out.add_(self.lora_b(self.lora_a(self.lora_dropout(x)) * self.scaling))

    def to_qat_linear(self) -> QATLinear:
        """Merge B A into the weight and drop the LoRA layers: a QATLinear torchao's convert step understands."""
        self.merge()
        return QATLinear.from_linear(self, self.activation_fake_quantizer, self.weight_fake_quantizer,
                                     self._shared_input)


def fake_quantizers(linear: nn.Linear, c: QuantConfig) -> tuple[nn.Module | None, nn.Module | None]:
    """torchao's (activation, weight) fake quantizers for `linear` from its QAT prepare step."""
    quiet_torchao()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    probe = nn.Sequential(nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta"))
    try:
        quantize_(probe, QATConfig(base_config(c), step="prepare"))
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"recipe.qat: torchao cannot prepare {c.scheme} group_size={c.group_size} for a "
                          f"{linear.in_features}->{linear.out_features} linear ({e})") from None
    return probe[0].activation_fake_quantizer, probe[0].weight_fake_quantizer


def qat_modules(model: nn.Module) -> list[tuple[str, _WeightCache]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _WeightCache)]


def prepare(model: nn.Module, c: QuantConfig) -> nn.Module:
    """Swap the targeted linears for fake-quantized ones (QATLinear / QATLoRALinear), in place."""
    shared = _SharedInput()
    for name in qat_targets(model, c):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if isinstance(old, _WeightCache):
            continue
        act_fq, weight_fq = fake_quantizers(old, c)
        if isinstance(old, LoRALinear):
            QATLoRALinear.from_lora(old, act_fq, weight_fq, shared)
        else:
            setattr(parent, child, QATLinear.from_linear(old, act_fq, weight_fq, shared))
    return model


def strip_lora(model: nn.Module, fake_quantized: bool = False) -> nn.Module:
    """Fold every LoRA update into its base weight and replace the layer by a plain linear (QAT layers: by
    torchao's FakeQuantizedLinear when `fake_quantized`, for its convert step)."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, (LoRALinear, QATLinear)):
            continue
        parent_name, _, child = name.rpartition(".")
        if isinstance(m, QATLoRALinear):
            new = m.to_qat_linear()
        elif isinstance(m, LoRALinear):
            m.merge()
            new = nn.Linear(m.in_features, m.out_features, m.bias is not None, device="meta")
            new.weight, new.bias = m.weight, m.bias
        else:
            new = m
        if fake_quantized and isinstance(new, QATLinear):
            new = new.to_fake_quantized_linear()
        if new is not m:
            setattr(model.get_submodule(parent_name), child, new)
    return model


@torch.no_grad()
def convert(model: nn.Module, c: QuantConfig) -> nn.Module:
    """torchao's convert step: the fake-quantized layers become real int8 / int4 quantized linears.

    LoRA is merged into the base weights first, so the quantized weight includes the update."""
    quiet_torchao()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    strip_lora(model, fake_quantized=True)
    quantize_(model, QATConfig(base_config(c), step="convert"))
    return model


@torch.no_grad()
def ptq(model: nn.Module, c: QuantConfig) -> nn.Module:
    """Post-training quantization of the targeted linears of a plain (unprepared) model with the same config."""
    quiet_torchao()
    from torchao.quantization import quantize_

    strip_lora(model)
    names = set(qat_targets(model, c))
    quantize_(model, base_config(c), filter_fn=lambda m, fqn: fqn in names)
    return model


class QATRecipe(Recipe):
    """Fake-quantize the targeted linears while training (torchao QAT); trains whatever would train anyway."""

    def apply(self, model: nn.Module) -> nn.Module:
        return prepare(model, self.cfg.qat)

    def after_optimizer_step(self, model: nn.Module) -> None:
        from torch.distributed.tensor import DTensor

        for _, m in qat_modules(model):
            m.invalidate()
            if isinstance(m.weight, DTensor):  # FSDP2 shard: no full-size cache per rank
                m.cache_weight = False

    def quantize(self, model: nn.Module, c: QuantConfig) -> nn.Module:
        """The trained model with real quantized weights (`--format quantized`): torchao's convert step."""
        return convert(model, c)

    def merge_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state  # fake quantizers hold no parameters: the state dict has base-model names only
