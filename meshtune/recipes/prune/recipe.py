"""Sparse pruning (`recipe.name: prune`): magnitude, semi-structured 2:4 and structured (heads, MLP channels).

    recipe: {name: prune, prune: {method: magnitude, scope: global, sparsity: 0.5, start_step: 0,
                                  end_step: 100, frequency: 10}}

Masks are recomputed on a cubic schedule (Zhu & Gupta 2017: s_t = s_f (1 - (1 - (t - t0) / (t1 - t0))^3)) at
steps t0, t0 + frequency, ... and t1, and multiplied into the weights after EVERY optimizer step, so pruned
weights stay exactly zero. Each pruned linear layer holds its mask as a persistent bool buffer `weight_mask`
(torch.nn.utils.prune's name) and the model a step counter `prune_step`: both are in the model's state dict,
so DCP checkpoints them and a resumed run continues with the same masks and schedule.

Distributed: masks are computed from FULL weights (`DTensor.full_tensor()`, identical on every rank, so global
magnitude ranking and head importance see the whole model and match a single process) and then stored as a
DTensor with the weight's mesh and placements, so under FSDP2 or tensor parallelism each rank keeps and
applies only its shard of the mask. Magnitude masks use torch.nn.utils.prune.L1Unstructured (global: over the
concatenated weights); 2:4 keeps the 2 largest of every 4 consecutive input weights (the masks of
torch.ao.pruning.WeightNormSparsifier((1, 4), zeros_per_block=2), which cannot handle DTensors).

Structured pruning removes, in every block, the same number of key/value head groups (a kv head with its
query heads) and of MLP hidden channels, the least important; `meshtune.recipes.prune.export.shrink_state`
then cuts them out into a smaller dense model. Importance (`recipe.prune.importance`) is by default the
squared norm of all weights that read or write the group; `taylor` ranks by the first-order estimate of the
loss change of removing it (Molchanov et al. 2019), (sum of gradient x weight over those weights)^2, averaged
over the optimizer steps since the last mask update (kept on the recipe, not checkpointed: a resumed run
restarts the average). On the tiny `sort` model both met the targets and neither was clearly better (gaps to
dense -0.4 norm, -1.1 taylor, at the noise level; bench/bench_prune.py). Groups already pruned rank last, so a
ramp only ever removes more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from meshtune.config import ConfigError
from meshtune.models.families import DECODER
from meshtune.recipes.base import Recipe
from meshtune.recipes.targets import matches_any

if TYPE_CHECKING:
    from meshtune.recipes.prune import PruneConfig

MASK = "weight_mask"
STEP = "prune_step"
# the decoder's module names, from the model spec (every family shares the decoder)
ATTN = tuple(DECODER.leaf(n) for n in DECODER.attention)  # q, k, v, o
MLP = tuple(DECODER.leaf(n) for n in DECODER.mlp)  # gate, up, down


def cubic_sparsity(step: int, p: PruneConfig) -> float:
    """The scheduled sparsity after `step` optimizer steps: 0 before start_step, the cubic ramp, then final."""
    if step < p.start_step:
        return 0.0
    if p.end_step <= p.start_step or step >= p.end_step:
        return p.sparsity
    return p.sparsity * (1 - (1 - (step - p.start_step) / (p.end_step - p.start_step)) ** 3)


def is_update_step(step: int, p: PruneConfig) -> bool:
    """Whether masks are recomputed after optimizer step `step` (1-based): start_step, every frequency steps,
    and end_step (one shot at max(start_step, 1) when end_step <= start_step)."""
    last = max(p.start_step, p.end_step, 1)
    if step == last:
        return True
    return max(p.start_step, 1) <= step < last and (step - p.start_step) % p.frequency == 0


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`mask` (full, the same on every rank) laid out like `weight`: a DTensor with its mesh and placements."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(weight, DTensor) and not isinstance(mask, DTensor):
        # every rank holds the same full mask: each keeps its own shard, no communication
        return distribute_tensor(mask.to(weight.device), weight.device_mesh, weight.placements, src_data_rank=None)
    return mask


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Bool masks zeroing exactly round(sparsity * n) of the smallest |w|: over all weights together (global)
    or round(sparsity * n_i) within each (layer), with torch.nn.utils.prune.L1Unstructured."""
    from torch.nn.utils.prune import L1Unstructured

    if scope == "layer":
        return {k: L1Unstructured(amount=sparsity).compute_mask(w, torch.ones_like(w)).bool()
                for k, w in weights.items()}
    flat = torch.cat([w.detach().reshape(-1) for w in weights.values()])
    k = round(sparsity * flat.numel())
    mask = L1Unstructured(amount=k).compute_mask(flat, torch.ones_like(flat)).bool()
    out, i = {}, 0
    for name, w in weights.items():
        out[name] = mask[i:i + w.numel()].view(w.shape)
        i += w.numel()
    return out


def nm_mask(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the n largest |w| of every m consecutive input weights (rows of `w` split into groups of m)."""
    groups = w.detach().abs().reshape(w.shape[0], -1, m)
    keep = groups.topk(n, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).view(w.shape)


def _keep_top(importance: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Bool (len,) keeping the n_keep largest (ties: lower index first)."""
    order = torch.sort(-importance, stable=True).indices
    keep = torch.zeros_like(importance, dtype=torch.bool)
    keep[order[:n_keep]] = True
    return keep


def group_sums(block: dict[str, torch.Tensor], n_kv: int) -> dict[str, torch.Tensor]:
    """Per-group sums of elementwise tensors shaped like a block's wq/wk/wv/wo/w1/w3/w2: `attn` (n_kv,) over
    the rows of a kv group's query, key and value heads and its columns of wo; `mlp` (hidden,) over a channel's
    rows of w1 and w3 and its column of w2. Either is absent when its weights are."""
    out = {}
    if all(k in block for k in ATTN):
        wq, wk, wv, wo = (block[k].float() for k in ATTN)
        out["attn"] = (wq.sum(1).view(n_kv, -1).sum(1) + wk.sum(1).view(n_kv, -1).sum(1)
                       + wv.sum(1).view(n_kv, -1).sum(1) + wo.sum(0).view(n_kv, -1).sum(1))
    if all(k in block for k in MLP):
        w1, w3, w2 = (block[k].float() for k in MLP)
        out["mlp"] = w1.sum(1) + w3.sum(1) + w2.sum(0)
    return out


def structured_masks(block: dict[str, torch.Tensor], n_kv: int, head_dim: int, sparsity: float,
                     importance: dict[str, torch.Tensor] | None = None) -> dict:
    """Masks of one block's wq/wk/wv/wo/w1/w3/w2 (full weights) removing round(sparsity * n_kv) key/value
    head groups and round(sparsity * hidden) MLP channels of least importance: `importance` ({attn: (n_kv,),
    mlp: (hidden,)}), else the squared norm of the group's weights."""
    imp = dict(group_sums({k: w.detach().float().pow(2) for k, w in block.items()}, n_kv))
    imp.update(importance or {})
    out = {}
    if "attn" in imp:
        q, k, v, o = ATTN
        q_group = block[q].shape[0] // n_kv  # rows of the query heads reading one kv head
        keep = _keep_top(imp["attn"], n_kv - round(sparsity * n_kv))
        q_rows, kv_rows = keep.repeat_interleave(q_group), keep.repeat_interleave(head_dim)
        out.update({q: q_rows[:, None].expand(block[q].shape), k: kv_rows[:, None].expand(block[k].shape),
                    v: kv_rows[:, None].expand(block[v].shape), o: q_rows[None, :].expand(block[o].shape)})
    if "mlp" in imp:
        gate, up, down = MLP
        hidden = block[gate].shape[0]
        keep = _keep_top(imp["mlp"], hidden - round(sparsity * hidden))
        out.update({gate: keep[:, None].expand(block[gate].shape), up: keep[:, None].expand(block[up].shape),
                    down: keep[None, :].expand(block[down].shape)})
    return {k: v.contiguous() for k, v in out.items()}


def _blocks(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"layers.0.attention.wq": t, ...} -> {"layers.0.attention": {"wq": t}, ...}"""
    blocks: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        parent, leaf = name.rsplit(".", 1)
        blocks.setdefault(parent, {})[leaf] = t
    return blocks


def _kv_heads(model: nn.Module, parent: str) -> tuple[int, int]:
    owner = model.get_submodule(parent)  # Attention keeps its full sizes also when TP splits it
    return getattr(owner, "n_kv_heads", 0), getattr(owner, "head_dim", 0)


class PruneRecipe(Recipe):
    """Masks chosen linear weights and keeps them masked after every optimizer step; trains every parameter."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self._taylor: dict[str, dict[str, torch.Tensor]] = {}  # block -> group -> sum of (sum g*w)^2
        self._taylor_steps = 0

    def targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The linear layers this recipe prunes, by module name."""
        p = self.cfg.prune
        names = ATTN + MLP if p.method == "structured" else None
        found = {}
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or ".layers." not in f".{name}":
                continue  # block linears only: never the embedding or the output head
            leaf = name.rsplit(".", 1)[-1]
            if (names is not None and leaf in names) or (names is None and matches_any(name, p.targets)):
                found[name] = module
        return found

    def apply(self, model: nn.Module) -> nn.Module:
        found = self.targets(model)
        if not found:
            raise ConfigError(f"recipe.prune.targets: {self.cfg.prune.targets} match no linear layer of the blocks")
        if self.cfg.prune.method == "semi_structured":
            for name, lin in found.items():
                if lin.in_features % 4:
                    raise ConfigError(f"recipe.prune.method: 2:4 needs the input size of {name} "
                                      f"({lin.in_features}) divisible by 4; drop it from recipe.prune.targets")
        for lin in found.values():
            lin.register_buffer(MASK, torch.ones_like(lin.weight, dtype=torch.bool))
        model.register_buffer(STEP, torch.zeros((), dtype=torch.int64, device=next(model.parameters()).device))
        return model

    def init_weights(self, model: nn.Module) -> None:
        for lin in self.targets(model).values():
            getattr(lin, MASK).fill_(True)
        for m in model.modules():
            if STEP in m._buffers:
                m._buffers[STEP].zero_()

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        step_buf = next(m._buffers[STEP] for m in model.modules() if STEP in m._buffers)  # under DDP: .module
        step_buf += 1
        step = int(step_buf.item())
        found = self.targets(model)
        p = self.cfg.prune
        if p.method == "structured" and p.importance == "taylor" and step <= max(p.start_step, p.end_step, 1):
            self.accumulate_taylor(model, found)
        if is_update_step(step, p):
            self.update_masks(model, found, cubic_sparsity(step, p))
        for lin in found.values():
            mask = _like(getattr(lin, MASK), lin.weight)  # a resumed run loads plain full masks: shard them once
            lin._buffers[MASK] = mask
            lin.weight.mul_(mask)
            if p.method == "structured" and lin.bias is not None:  # a removed head's q/k/v bias (Qwen2) goes too
                lin.bias.mul_(mask.any(1))

    def accumulate_taylor(self, model: nn.Module, found: dict[str, nn.Linear]) -> None:
        """Add this step's (sum of grad x masked weight)^2 per head group and MLP channel to the running sums:
        with the masks applied, groups already pruned score exactly 0."""
        prods = {}
        for name, lin in found.items():
            if lin.weight.grad is None:
                return  # no backward yet (or frozen weights): nothing to estimate from
            w = lin.weight.detach() * _like(getattr(lin, MASK).to(lin.weight.device), lin.weight)
            prods[name] = _full(w * lin.weight.grad.detach())
        for parent, block in _blocks(prods).items():
            sums = self._taylor.setdefault(parent, {})
            for group, s in group_sums(block, _kv_heads(model, parent)[0]).items():
                sums[group] = sums.get(group, 0) + s.double().pow(2)
        self._taylor_steps += 1

    def update_masks(self, model: nn.Module, found: dict[str, nn.Linear], sparsity: float) -> None:
        """Recompute every mask at `sparsity` from the full weights (and the Taylor scores since the last
        update, when there are any) and store it sharded like its weight."""
        p = self.cfg.prune
        weights = {name: _full(lin.weight.detach()) for name, lin in found.items()}
        if p.method == "magnitude":
            masks = magnitude_masks(weights, sparsity, p.scope)
        elif p.method == "semi_structured":
            masks = {name: nm_mask(w) for name, w in weights.items()}
        else:
            masks = {}
            current = _blocks({name: _full(getattr(lin, MASK)) for name, lin in found.items()})
            for parent, block in _blocks(weights).items():
                n_kv, hd = _kv_heads(model, parent)
                scores = {g: s / max(self._taylor_steps, 1) for g, s in self._taylor.get(parent, {}).items()}
                kept = group_sums({k: m.float() for k, m in current[parent].items()}, n_kv)
                # a pruned group (all its mask entries False) ranks below every kept one
                scores = {g: torch.where(kept[g] > 0, s, torch.full_like(s, -1.0)) for g, s in scores.items()}
                for leaf, mask in structured_masks(block, n_kv, hd, sparsity, scores).items():
                    masks[f"{parent}.{leaf}"] = mask
            self._taylor, self._taylor_steps = {}, 0
        for name, lin in found.items():
            lin._buffers[MASK] = _like(masks[name].to(lin.weight.device), lin.weight)

    def sparse_tensors(self, state: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> tuple[dict, dict, str]:
        """`--format sparse`: (tensors, layouts, a summary) of the pruned weights of `merged` as CSR or packed 2:4
        (meshtune.recipes.prune.export), from the masks in the run's `state`."""
        from meshtune.recipes.prune.export import sparse_tensors

        pruned = [k[: -len("_mask")] for k in state if k.endswith("." + MASK)]
        layout = "2:4" if self.cfg.prune.method == "semi_structured" else "csr"
        tensors, layouts = sparse_tensors(merged, pruned, layout)
        return tensors, layouts, f"{len(layouts)} of {len(pruned)} pruned weights stored sparse ({layout})"

    def shrink(self, state: dict[str, torch.Tensor], model_cfg):
        """`--format shrunk`: the merged `state` with pruned heads and MLP channels cut out, and its model config."""
        from meshtune.recipes.prune.export import shrink_state

        return shrink_state(state, model_cfg)

    def merge_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in state.items():
            if key.endswith("." + MASK) or key == STEP or key.endswith("." + STEP):
                continue
            owner = key.rsplit(".", 1)[0]
            mask = state.get(f"{owner}.{MASK}") if key.endswith((".weight", ".bias")) else None
            if mask is not None and key.endswith(".bias"):
                mask = mask.any(1) if self.cfg.prune.method == "structured" else None
            out[key] = value * mask if mask is not None else value
        return out
