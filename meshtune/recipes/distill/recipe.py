"""White-box knowledge distillation (Hinton et al. 2015): a frozen teacher runs beside the student.

    recipe.name: distill          (or stacked: prune+distill, lora+distill)
    recipe.distill: {teacher: runs/big, alpha: 0.5, temperature: 2.0, kl: forward, hidden: 0.0}

Each micro-batch the teacher (eval mode, no_grad) runs on the same input ids and the loss becomes, summed over
the tokens with a label like the task loss,

    alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T) [+ hidden * MSE]

with p^T = softmax(logits / T); `kl: reverse` swaps the KL's arguments. T^2 keeps the soft term's gradient
scale independent of T. With `hidden` > 0 the student's final hidden state (the input of its output head) is
mapped to the teacher's width by a learned projection `distill_proj` and matched to the teacher's (mean squared
error per token). The projection trains with the student, is saved in its checkpoints (so runs resume) and is
dropped from merged exports: it serves training only.

The teacher is laid out on its own (`recipe.distill.teacher_shard`): a full copy per rank, or FSDP2-sharded
over the data-parallel ranks whatever the student's layout (a DDP student with a sharded teacher is the case
that saves memory). Every dp rank runs the same number of micro-batches, so the teacher's collectives match.
With `train.loss_chunk_size` both models return hidden states and the KL is summed chunk by chunk, each
chunk's student and teacher logits recomputed in backward (runtime/chunked_loss.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from meshtune.config import ConfigError
from meshtune.data import IGNORE_INDEX, model_args
from meshtune.models.decoder import softcap_logits
from meshtune.recipes.base import Recipe
from meshtune.runtime.chunked_loss import ChunkedLogits

PROJ = "distill_proj"  # the projection's module name on the student (a top-level child of the decoder)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float,
            kl: str = "forward") -> torch.Tensor:
    """T^2 * sum over the masked tokens of KL(teacher_T || student_T) (`forward`) or KL(student_T || teacher_T)
    (`reverse`), computed in fp32. logits (B, T, V), mask (B, T) bool."""
    s = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)  # (N, V)
    t = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
    # kl_div(input, target) = sum target * (log target - input): target is the distribution the KL is "from"
    div = F.kl_div(s, t, log_target=True, reduction="sum") if kl == "forward" else \
        F.kl_div(t, s, log_target=True, reduction="sum")
    return temperature * temperature * div


class DistillRecipe(Recipe):
    """Adds the distillation term to the task loss; trains every student parameter (plus the projection)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.kd = cfg.distill
        self.teacher: nn.Module | None = None  # loaded in setup
        self.device = torch.device("cpu")
        self._hidden: dict[str, torch.Tensor | None] = {"student": None, "teacher": None}
        self._hooks = []

    def _teacher(self, model: nn.Module, loader):
        """The teacher's artifact (metadata only), checked against the student's vocabulary."""
        key = "recipe.distill.teacher"
        src = loader.find(self.kd.teacher, key=key)
        if src.vocab_size != model.vocab_size:
            raise ConfigError(f"{key}: {self.kd.teacher} has a vocabulary of {src.vocab_size} tokens, the student "
                              f"{model.vocab_size}; white-box distillation needs the same tokenizer and "
                              "model.vocab_size (or use `meshtune distill-data` for black-box KD)")
        return src

    def _add_projection(self, model: nn.Module, teacher_dim: int) -> nn.Linear:
        weight = model.output.weight
        proj = nn.Linear(model.cfg.dim, teacher_dim, bias=False, device=weight.device, dtype=weight.dtype)
        model.add_module(PROJ, proj)
        return proj

    def preflight(self, model: nn.Module, loader) -> None:
        src = self._teacher(model, loader)
        if self.kd.hidden > 0:
            self._add_projection(model, src.model_cfg.dim)

    def setup(self, model: nn.Module, mesh, device: torch.device, loader) -> None:
        """Load the frozen teacher on `device` (replicated, or FSDP2-sharded over the mesh's dp axis), check its
        vocabulary against the student's, and add the hidden-state projection if asked (training only: an
        exported or served student needs neither)."""
        src = self._teacher(model, loader)
        if self.kd.hidden > 0:
            proj = self._add_projection(model, src.model_cfg.dim)
            if proj.weight.device.type != "meta":
                self.init_weights(model)
            # the projection runs inside the student's forward, so DDP and FSDP2 see it like any parameter
            self._hooks.append(model.norm.register_forward_hook(self._student_hook(proj)))
        mode = self.kd.teacher_shard
        shard = mode == "fsdp" or (mode == "auto" and mesh.dims.dp_shard > 1)
        self.device = device
        self.teacher = loader.load_model(src, device, mesh.get("dp") if shard else None,
                                         key="recipe.distill.teacher")
        if self.kd.hidden > 0:
            self._hooks.append(self.teacher.norm.register_forward_hook(self._teacher_hook))

    def init_weights(self, model: nn.Module) -> None:
        proj = getattr(model, PROJ, None)
        if proj is not None:
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)

    def _student_hook(self, proj: nn.Module):
        def hook(module, args, out):
            if module.training:
                self._hidden["student"] = proj(out)
        return hook

    def _teacher_hook(self, module, args, out):
        self._hidden["teacher"] = out

    def trainable(self, name: str, param: nn.Parameter) -> bool | None:
        return True if PROJ in name.split(".") else None

    def loss(self, task_loss: torch.Tensor, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError("DistillRecipe.loss before setup(): build the trainer with build_trainer")
        mask = batch["labels"].to(logits.device) != IGNORE_INDEX
        chunked = isinstance(logits, ChunkedLogits)  # train.loss_chunk_size: the teacher's head is chunked too
        # the teacher computes in the student's precision (bf16 when the trainer autocasts the student)
        def autocast():
            return torch.autocast(self.device.type, dtype=logits.dtype, enabled=logits.dtype == torch.bfloat16)
        with torch.no_grad(), autocast():
            teacher_logits = self.teacher(*model_args(batch, self.device), hidden_only=chunked)
        kd = self.kd
        total = kd.alpha * task_loss
        if kd.alpha < 1 and chunked:
            total = total + (1 - kd.alpha) * logits.sum_over_chunks(self._chunk_kd(autocast), teacher_logits, mask)
        elif kd.alpha < 1:
            total = total + (1 - kd.alpha) * kd_loss(logits, teacher_logits, mask, kd.temperature, kd.kl)
        if kd.hidden > 0:
            student, teacher = self._hidden["student"], self._hidden["teacher"]
            self._hidden = {"student": None, "teacher": None}
            mse = F.mse_loss(student[mask].float(), teacher[mask].float(), reduction="none").mean(-1).sum()
            total = total + kd.hidden * mse
        return total

    def _chunk_kd(self, autocast):
        """The KL of one chunk, given the student's chunk logits and the teacher's chunk hidden states: the
        teacher's head runs here too (again in backward), so neither model's full logits exist at once."""
        weight, cap = self.teacher.output.weight, self.teacher.cfg.logit_softcap
        if isinstance(weight, DTensor):  # an FSDP2-sharded teacher: its frozen head, gathered once per batch
            weight = weight.full_tensor()

        def kd_chunk(student: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), autocast():
                teacher = softcap_logits(F.linear(teacher_hidden, weight), cap)  # the teacher's own head
            return kd_loss(student, teacher, mask, self.kd.temperature, self.kd.kl)
        return kd_chunk

    def merge_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if PROJ not in k.split(".")}
