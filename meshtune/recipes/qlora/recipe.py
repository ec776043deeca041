"""QLoRA: LoRA on a frozen base stored as 4-bit NormalFloat (Dettmers et al. 2023, arXiv:2305.14314).

    meshtune train finetune/qlora init_from=runs/tiny/model.safetensors       # recipe.name: qlora
    meshtune export runs/finetune-qlora --format merged                       # or peft / hf / adapter

The transform is LoRA's (`LoRARecipe.apply`, configured by `recipe.lora`), after which every `LoRALinear`'s
base weight is replaced by torchao's `NF4Tensor` (`to_nf4`: blocks of `recipe.qlora.block_size` weights
share an absmax scale; the scales are themselves int8-quantized in groups of `scaler_block_size`, around their
mean: "double quantization") and the module becomes a `QLoRALinear`, the same module whose base path runs
torchao's `linear_nf4`: the weight is dequantized to the input's dtype for the matmul, and backward keeps only
the NF4 weight (never a full-precision copy). A and B are LoRA's and train in the compute dtype.

Memory: a weight costs 4 bits, plus an int8 scale per block and an fp32 factor per group of scales: 0.129x of
fp32 at the defaults (64, 256), which the run's model-state figure and `meshtune validate` count (the inner
tensors' bytes, `meshtune.runtime.precision.tensor_bytes`).

Loading. `apply` quantizes whatever the base weights hold then (the seeded init, or nothing on meta); an
`init_from` load copies full-precision weights into the NF4 parameters, where torchao's NF4 `copy_` quantizes
them. Under FSDP2 each rank does so for the rows it holds (its shard's own scale mean: within one int8 step of a
block scale of the one-process quantization). FSDP2 shards the NF4 parameter by rows (torchao splits its codes
and scales) and all-gathers the NF4 bytes (`NF4Tensor.fsdp_pre_all_gather`: uint8 codes, int8 scales, fp32
group factors; `fsdp_post_all_gather` rebuilds the NF4 tensor). Checkpoints hold the NF4 parts as plain tensors
(`meshtune.artifacts.packed`), so they resume bitwise and reshard. Tensor parallelism and DDP are refused at
config time (`check_plan`); pipeline stages are deep copies (`QLoRALinear.__deepcopy__`).

Export: `merge_state` dequantizes the NF4 weights (fp32) and folds B A in, so merged / hf exports are
full-precision models; the adapter / peft exports are LoRA's.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from meshtune.artifacts.packed import is_nf4, local_tensor
from meshtune.config import ConfigError
from meshtune.quiet import quiet_torchao
from meshtune.recipes.lora.recipe import LoRALinear, LoRARecipe, lora_modules


def _nf4():
    quiet_torchao()
    from torchao.quantization import NF4Tensor, to_nf4
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

    return NF4Tensor, to_nf4, linear_nf4


class QLoRALinear(LoRALinear):
    """A `LoRALinear` whose frozen base weight is an NF4Tensor. Made from one by `quantize` (in place)."""

    @classmethod
    @torch.no_grad()
    def quantize(cls, module: LoRALinear, block_size: int, scaler_block_size: int) -> QLoRALinear:
        """Turn `module` into a QLoRALinear in place: the same module object, children and parameter names,
        its base weight replaced by `to_nf4(weight)` (on meta too)."""
        _, to_nf4, _ = _nf4()
        w = module.weight  # a bias (Qwen2's q/k/v) stays as it is
        module.weight = nn.Parameter(to_nf4(w.detach().contiguous(), block_size, scaler_block_size),
                                     requires_grad=False)
        module.__class__ = cls
        return module

    def _apply(self, fn, recurse: bool = True):
        """nn.Module's `_apply` (to_empty, to), then the NF4 parts torchao's `empty_like` leaves on meta (the
        scaler mean and the 16-value table) made real: a model built on meta is materialised by `to_empty`,
        and its weights are then loaded into these tensors."""
        out = super()._apply(fn, recurse)
        w = local_tensor(self.weight)
        if is_nf4(w) and not w.is_meta:
            _, to_nf4, _ = _nf4()
            if w.nf4.is_meta:
                w.nf4 = to_nf4(torch.ones(1, 64, dtype=w.dtype), 64, 1).nf4.to(w.device)
            if w.scaler_mean.is_meta:
                w.scaler_mean = torch.zeros((), dtype=w.scaler_mean.dtype, device=w.device)
        return out

    def __deepcopy__(self, memo):
        """A deep copy (pipeline stages are cut from copies) whose NF4 weight is copied part by part: torchao's
        NF4 `clone` re-quantizes the dequantized weight at its default block sizes."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_parameters":
                new._parameters = {n: (_copy_nf4(p, memo) if p is not None and is_nf4(p) else copy.deepcopy(p, memo))
                                   for n, p in value.items()}
            else:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # a plain full-precision weight with B A inside
            return F.linear(x, self.weight, self.bias)
        _, _, linear_nf4 = _nf4()
        out = linear_nf4(x, self.weight)  # dequantized in x's dtype; autograd keeps the NF4 weight only
        if self.bias is not None:
            out = out + self.bias
        return out + self.lora_b(self.lora_a(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Replace the NF4 weight by its dequantized full-precision value + scaling * B A (no way back)."""
        if not self.merged:
            w = self.weight.get_original_weight() if is_nf4(self.weight) else self.weight
            self.weight = nn.Parameter(w.float() + self.delta_weight().float(), requires_grad=False)
            self.merged = True

    def unmerge(self) -> None:
        raise ValueError("a merged QLoRA layer holds full-precision weights; rebuild it to get the NF4 base back")


def _copy_nf4(p: nn.Parameter, memo: dict) -> nn.Parameter:
    """A frozen Parameter holding a copy of the NF4 tensor `p` (its parts cloned, nothing re-quantized)."""
    if id(p) not in memo:
        names, ctx = p.__tensor_flatten__()
        t = type(p).__tensor_unflatten__({n: getattr(p, n).clone() for n in names}, ctx, p.shape, p.stride())
        memo[id(p)] = nn.Parameter(t, requires_grad=False)
    return memo[id(p)]


class QLoRARecipe(LoRARecipe):
    """LoRA's transform and exports (`recipe.lora`), then the adapted layers' base weights as NF4."""

    def apply(self, model: nn.Module) -> nn.Module:
        model = super().apply(model)
        q = self.cfg.qlora
        for name, m in lora_modules(model):
            n = m.weight.numel()
            if n % (q.block_size * q.scaler_block_size):
                raise ConfigError(f"recipe.qlora.block_size: {name} has {n} weights, not a multiple of block_size "
                                  f"* scaler_block_size = {q.block_size}*{q.scaler_block_size}; pick sizes whose "
                                  "product divides it, or drop it from recipe.lora.targets")
            QLoRALinear.quantize(m, q.block_size, q.scaler_block_size)
        return model

    def after_parallelize(self, model: nn.Module) -> None:
        """Each FSDP2 shard of an NF4 weight keeps the whole weight's block count (torchao's split copies it);
        set it to the shard's own, or torchao's `copy_` of a loaded full-precision shard (which compares the
        counts) never finds its quantization the same and recurses without end."""
        for _, m in lora_modules(model):
            w = local_tensor(m.weight)
            if is_nf4(w):
                w.n_blocks = w.quantized_scalers.numel()

    def merge_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Dequantize the NF4 base weights (fp32), then fold B A in as LoRA does."""
        return super().merge_state(dequantized(state))


def dequantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every NF4 tensor replaced by its full-precision value (the quantized one, dequantized)."""
    return {k: (v.get_original_weight() if is_nf4(v) else v) for k, v in state.items()}
