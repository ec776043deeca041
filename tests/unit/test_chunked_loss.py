"""Chunked cross-entropy (train.loss_chunk_size) against the full logits, one process, fp32."""

import pytest
import torch

from meshtune.config import ConfigError
from meshtune.runtime.data_parallel import unwrap
from meshtune.runtime.env import DistEnv
from meshtune.runtime.run import build_trainer
from meshtune.schema import load_config
from tests.distributed.cases import full, step_losses, tiny_config
from tests.distributed.test_distill_distributed import write_teacher

TOL = 1e-6


def first_step(run_dir, *overrides):
    """(mean loss, every parameter's gradient) of one forward/backward."""
    torch.manual_seed(0)
    trainer = build_trainer(tiny_config(str(run_dir), "parallel.dp_shard=1", *overrides), DistEnv())
    loss, tokens = trainer.forward_backward(trainer.next_micro_batches())
    grads = {n: full(p.grad).clone() for n, p in unwrap(trainer.model).named_parameters() if p.requires_grad}
    assert grads
    return trainer.mean_loss(loss, tokens), grads


@pytest.mark.parametrize("overrides", [
    [], ["recipe.name=lora"], ["model.tie_embeddings=true"], ["train.micro_batch_size=4"],
    ["recipe.name=distill", "recipe.distill.alpha=0.3", "recipe.distill.temperature=2"],
    ["recipe.name=lora+distill", "recipe.distill.kl=reverse", "recipe.distill.hidden=0.5"],
    ["model.family=gemma2", "model.logit_softcap=0.5", "model.attn_softcap=1.0", "model.tie_embeddings=true"],
], ids=["base", "lora", "tied", "accum2", "distill", "lora-distill-reverse-hidden", "softcapped"])
def test_chunked_loss_and_gradients_equal_full_logits(tmp_path, overrides):
    if any("distill" in o for o in overrides):
        overrides = [*overrides, f"recipe.distill.teacher={write_teacher(tmp_path / 'teacher.safetensors')}"]
    ref_loss, ref_grads = first_step(tmp_path / "full", *overrides)
    for chunk in (5, 24, 100):  # uneven chunks, one chunk, larger than the sequence
        loss, grads = first_step(tmp_path / f"c{chunk}", *overrides, f"train.loss_chunk_size={chunk}")
        assert abs(loss - ref_loss) < TOL
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            assert (g - ref_grads[name]).abs().max().item() < TOL, (chunk, name)


def test_chunked_distillation_from_a_soft_capped_teacher(tmp_path):
    """The chunked KL runs the teacher's head itself: its model.logit_softcap (Gemma 2) applies there too."""
    capped = write_teacher(tmp_path / "capped.safetensors", family="gemma2", logit_softcap=0.5)
    plain = write_teacher(tmp_path / "plain.safetensors")  # the same weights (same seed), no cap
    kd = ["recipe.name=distill", "recipe.distill.alpha=0.3", "recipe.distill.temperature=2"]
    ref_loss, ref_grads = first_step(tmp_path / "full", *kd, f"recipe.distill.teacher={capped}")
    loss, grads = first_step(tmp_path / "c5", *kd, f"recipe.distill.teacher={capped}", "train.loss_chunk_size=5")
    assert abs(loss - ref_loss) < TOL
    for name, g in grads.items():
        assert (g - ref_grads[name]).abs().max().item() < TOL, name
    _, uncapped = first_step(tmp_path / "plain", *kd, f"recipe.distill.teacher={plain}", "train.loss_chunk_size=5")
    # the cap matters: a teacher without it gives other gradients (the KL; the logged loss is the task's)
    assert max((g - uncapped[name]).abs().max().item() for name, g in grads.items()) > 1e-4


# With the key off the trainer never touches the chunked path, so training is bitwise what it was before the key
# existed (checked against losses recorded at commit 29d1b9f when it landed; hex constants are not kept here:
# they differ between CPUs, e.g. with and without AVX-512, in the last bits of the second step).
@pytest.mark.parametrize("name,overrides", [
    ("base", []), ("tied-ac", ["model.tie_embeddings=true", "parallel.activation_checkpointing=true"])])
def test_losses_unchanged_when_off(tmp_path, monkeypatch, name, overrides):
    import meshtune.runtime.trainer as trainer_module

    def refuse(*args, **kwargs):
        raise AssertionError("the chunked path ran with train.loss_chunk_size=0")

    torch.manual_seed(0)
    ref = build_trainer(tiny_config(str(tmp_path / "ref"), "parallel.dp_shard=1", *overrides), DistEnv())
    monkeypatch.setattr(trainer_module, "ChunkedLogits", refuse)
    torch.manual_seed(0)
    trainer = build_trainer(tiny_config(str(tmp_path / "off"), "parallel.dp_shard=1", *overrides), DistEnv())
    assert trainer._forward_kwargs == {}  # the model returns logits, not hidden states
    losses = step_losses(trainer, 3)  # would raise if any step built ChunkedLogits
    monkeypatch.undo()
    assert [x.hex() for x in losses] == [x.hex() for x in step_losses(ref, 3)]  # and the same seed repeats bitwise


@pytest.mark.parametrize("overrides", [[], ["model.family=gemma2", "model.logit_softcap=0.5"]],
                         ids=["plain", "softcapped"])
def test_chunked_evaluation_equals_full_logits_and_never_builds_them(tmp_path, overrides):
    """Evaluation reads the head chunk by chunk too (loss and exact match): the same figures as with the whole
    logits, while no tensor over the vocabulary spans more than one chunk of positions."""
    from torch.utils._python_dispatch import TorchDispatchMode

    def evaluated(name, *extra):
        torch.manual_seed(0)
        trainer = build_trainer(tiny_config(str(tmp_path / name), "parallel.dp_shard=1", "train.eval_batches=2",
                                            *overrides, *extra), DistEnv())
        vocab = unwrap(trainer.model).output.weight.shape[0]

        class Widest(TorchDispatchMode):
            positions = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[-1] == vocab:
                        Widest.positions = max(Widest.positions, t.shape[:-1].numel())
                return out

        with Widest():
            result = trainer.evaluate()
        return result, Widest.positions, trainer.cfg.train.micro_batch_size, trainer.cfg.data.seq_len

    full, widest_full, batch, seq = evaluated("full")
    chunked, widest, _, _ = evaluated("chunked", "train.loss_chunk_size=5")
    assert abs(chunked["eval_loss"] - full["eval_loss"]) < TOL, (chunked, full)
    assert chunked["eval_accuracy"] == full["eval_accuracy"]
    assert widest_full == batch * seq and widest == batch * 5, (widest_full, widest)


@pytest.mark.parametrize("override,match", [
    ("train.loss_chunk_size=-1", r"^train\.loss_chunk_size: must be >= 0"),
    ("parallel.sequence_parallel=true", r"^train\.loss_chunk_size: .*sequence_parallel=false"),
])
def test_bad_chunk_settings(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["data.task=sort", "parallel.tp=2", "train.loss_chunk_size=8", override])


def test_chunked_argmax_is_the_full_argmax():
    """Exact match's argmax, chunk by chunk (uneven last chunk), soft-capped or not, on logits that vary."""
    from meshtune.runtime.chunked_loss import ChunkedLogits

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False)
    hidden = torch.randn(3, 11, 16)
    for cap in (0.0, 0.5):
        want = head(hidden).argmax(dim=-1)
        got = ChunkedLogits(hidden, head, 4, cap).argmax(dim=-1)
        assert torch.equal(got, want) and want.unique().numel() > 5
