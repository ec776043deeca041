"""QLoRA: LoRA on a frozen base stored as 4-bit NormalFloat (Dettmers et al. 2023, arXiv:2305.14314).

    meshtune train finetune/qlora init_from=runs/tiny/model.safetensors       # recipe.name: qlora
    meshtune export runs/finetune-qlora --format merged                       # or peft / hf / adapter

The transform is LoRA's (`LoRARecipe.apply`, configured by `recipe.lora`), after which every `LoRALinear`'s
base weight is replaced by torchao's `NF4Tensor` (`to_nf4`: blocks of `recipe.qlora.block_size` weights
share an absmax scale; the scales are themselves int8-quantized in groups of `scaler_block_size`, around their
mean: "double quantization") and the module becomes a `QLoRALinear`, the same module whose base path runs
torchao's `linear_nf4`: the weight is dequantized to the input's dtype for the matmul, and backward keeps only
the NF4 weight (never a full-precision copy). A and B are LoRA's and train in the compute dtype.

With `recipe.qlora.quantize_embeddings` (the default) the frozen token embedding and output head are NF4 too,
tied or not (`meshtune.recipes.qlora.nf4`: a lookup dequantizes the looked-up rows, the head a chunk of rows
at a time); a LoRA-adapted head is a QLoRALinear like the projections.

Memory: a weight costs 4 bits, plus an int8 scale per block and an fp32 factor per group of scales: 0.129x of
fp32 at the defaults (64, 256), which the run's model-state figure and `meshtune validate` count (the inner
tensors' bytes, `meshtune.runtime.precision.tensor_bytes`).

Loading. `apply` quantizes whatever the base weights hold then (the seeded init, or nothing on meta); an
`init_from` load copies full-precision weights into the NF4 parameters, where torchao's NF4 `copy_` quantizes
them. Under FSDP2 each rank quantizes the rows it holds with the whole weight's block-scale mean, gathered over
its shard group (`meshtune.artifacts.shards.quantize_rows`), so its NF4 bytes are those rows of the one-process
quantization, bitwise. FSDP2 shards the NF4 parameter by rows (torchao splits its codes
and scales) and all-gathers the NF4 bytes (`NF4Tensor.fsdp_pre_all_gather`: uint8 codes, int8 scales, fp32
group factors; `fsdp_post_all_gather` rebuilds the NF4 tensor). Checkpoints hold the NF4 parts as plain tensors
(`meshtune.artifacts.packed`), so they resume bitwise and reshard. Tensor parallelism and DDP are refused at
config time (`check_plan`); pipeline stages are deep copies (`QLoRALinear.__deepcopy__`).

Export: `merge_state` dequantizes the NF4 weights (fp32) and folds B A in, so merged / hf exports are
full-precision models; the adapter / peft exports are LoRA's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshtune.artifacts.packed import is_nf4, local_tensor
from meshtune.config import ConfigError
from meshtune.recipes.lora.recipe import LoRALinear, LoRARecipe, lora_modules
from meshtune.recipes.qlora.nf4 import NF4Module, nf4_api, nf4_linear_bytes, quantize_frozen_ends, quantize_weight


class QLoRALinear(NF4Module, LoRALinear):
    """A `LoRALinear` whose frozen base weight is an NF4Tensor. Made from one by `quantize` (in place)."""

    @classmethod
    @torch.no_grad()
    def quantize(cls, module: LoRALinear, block_size: int, scaler_block_size: int) -> QLoRALinear:
        """Turn `module` into a QLoRALinear in place: the same module object, children and parameter names,
        its base weight replaced by `to_nf4(weight)` (on meta too)."""
        quantize_weight(module, block_size, scaler_block_size)  # a bias (Qwen2's q/k/v) stays as it is
        module.__class__ = cls
        return module

    def dequantized_bytes(self, tokens: int) -> int:
        """Bytes one call of `linear_nf4` (forward, or backward's x gradient) allocates at once to dequantize the
        whole weight (the gathered one under FSDP2): torchao's `get_original_weight` holds both nibbles' code
        indices as int64 (8 B per weight in all), their looked-up values, the scaled values and the stacked
        result in the weight's dtype (3 x its element size per weight); `tokens` does not matter."""
        if self.merged or not is_nf4(self.weight):
            return 0
        return nf4_linear_bytes(self.weight.numel(), local_tensor(self.weight).dtype.itemsize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # a plain full-precision weight with B A inside
            return F.linear(x, self.weight, self.bias)
        out = nf4_api()[2](x, self.weight)  # dequantized in x's dtype; autograd keeps the NF4 weight only
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


class QLoRARecipe(LoRARecipe):
    """LoRA's transform and exports (`recipe.lora`), then the adapted layers' base weights as NF4, and the frozen
    embedding and head (`recipe.qlora.quantize_embeddings`)."""

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
        if q.quantize_embeddings:  # the frozen embedding and head (one NF4 Parameter when tied): nf4.py
            quantize_frozen_ends(model, q.block_size, q.scaler_block_size)
        return model

    def after_parallelize(self, model: nn.Module) -> None:
        """Each FSDP2 shard of an NF4 weight keeps the whole weight's block count (torchao's split copies it);
        set it to the shard's own, or torchao's `copy_` of a loaded full-precision shard (which compares the
        counts) never finds its quantization the same and recurses without end."""
        for p in model.parameters():  # the projections', the embedding's and the head's
            w = local_tensor(p)
            if is_nf4(w):
                w.n_blocks = w.quantized_scalers.numel()

    def merge_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Dequantize the NF4 base weights (fp32), then fold B A in as LoRA does."""
        return super().merge_state(dequantized(state))


def dequantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every NF4 tensor replaced by its full-precision value (the quantized one, dequantized)."""
    return {k: (v.get_original_weight() if is_nf4(v) else v) for k, v in state.items()}
