"""parallel.vocab_parallel: the embedding and head split by vocabulary rows over dp_shard, against the single-process
reference from the same seed (real gloo ranks), checkpoints across layouts, and the layouts it refuses."""

import pytest

from tests.distributed.cases import (
    full,
    full_grads,
    full_params,
    layout,
    max_diff,
    reference_trainer,
    step_losses,
    tiny_config,
)

TOL = 1e-5
VP = [*layout(1, 2, 4), "parallel.vocab_parallel=true"]
LORA = ["recipe.name=lora", "recipe.lora.rank=4"]
SOFTCAPPED = ["model.family=gemma2", "model.logit_softcap=0.5", "model.tie_embeddings=true"]  # Gemma 2's logits


def trained_grads(model) -> dict:
    """Gathered gradients of the parameters that have one (LoRA freezes the base)."""
    from meshtune.runtime.data_parallel import unwrap

    return {n: full(p.grad).detach().clone() for n, p in unwrap(model).named_parameters(remove_duplicate=False)
            if p.grad is not None}


def vp_vs_reference(run_dir, extra, steps):
    """First step's loss and gradients, then `steps` more steps' losses and a final evaluation, under vocab_parallel
    and in one process."""
    from torch.distributed.tensor import DTensor

    from meshtune.runtime.run import build_trainer

    cfg = tiny_config(run_dir, *VP, *extra)
    ref = reference_trainer(cfg)
    trainer = build_trainer(cfg)
    emb = trainer.model.tok_embeddings.weight
    out = {"emb_local_rows": emb.to_local().shape[0] if isinstance(emb, DTensor) else None,
           "vocab": emb.shape[0], "tied": trainer.model.output.weight is emb}
    ref_loss, ref_tokens = ref.forward_backward(ref.next_micro_batches())
    loss, tokens = trainer.forward_backward(trainer.next_micro_batches())
    grads, ref_grads = trained_grads(trainer.model), trained_grads(ref.model)
    out.update(loss=trainer.mean_loss(loss, tokens), ref_loss=ref.mean_loss(ref_loss, ref_tokens),
               grad_diff=max_diff(grads, ref_grads), n_grads=len(grads),
               emb_grad_norm=float(grads["tok_embeddings.weight"].norm()) if "tok_embeddings.weight" in grads else None,
               norm=trainer.engine.step(), ref_norm=ref.engine.step())
    for t in (trainer, ref):
        t.scheduler.step()
        t.engine.zero_grad()
        t.step += 1
    out.update(losses=step_losses(trainer, steps), ref_losses=step_losses(ref, steps),
               param_diff=max_diff(full_params(trainer.model), full_params(ref.model)),
               eval=trainer.evaluate(), ref_eval=ref.evaluate())
    out.update(logits_vs_reference(trainer, ref))
    out["local_table"] = float(emb.to_local().double().sum()) if isinstance(emb, DTensor) else None
    return out


def logits_vs_reference(trainer, ref) -> dict:
    """The split head's whole logits (its forward outside the trainer) and its cross-shard argmax, on one evaluation
    batch of this rank, against the single-process model's."""
    import torch

    from meshtune.data import collate
    from meshtune.runtime.vocab_parallel import VocabParallelLogits

    tokens = collate([trainer.eval_ds[i] for i in range(3 * trainer.mesh.dp_rank, 3 * trainer.mesh.dp_rank + 3)])
    tokens = tokens["input_ids"]
    with torch.no_grad():
        want = ref.model(tokens)
        got = trainer.model(tokens)
        split = VocabParallelLogits(trainer.model(tokens, hidden_only=True), trainer.model.output, trainer.vocab_shard)
        argmax = split.argmax(dim=-1)
    return {"logit_diff": float((got - want).abs().max()), "logits_shape": tuple(got.shape),
            "argmax_equal": bool((argmax == want.argmax(dim=-1)).all())}


@pytest.mark.parametrize("extra", [[], ["model.tie_embeddings=true"], LORA, [*LORA, "model.tie_embeddings=true"],
                                   ["model.tie_embeddings=true", "train.loss_chunk_size=5"],
                                   [*LORA, "train.loss_chunk_size=5"], SOFTCAPPED,
                                   [*SOFTCAPPED, "train.loss_chunk_size=5"]],
                         ids=["full", "full-tied", "lora", "lora-tied", "full-tied-chunked", "lora-chunked",
                              "softcapped", "softcapped-chunked"])
def test_vocab_parallel_matches_single_process(rank_pool, tmp_path, extra):
    check_vs_reference(rank_pool(2).run(vp_vs_reference, str(tmp_path), extra, 4), extra)


@pytest.mark.parametrize("extra", [["model.tie_embeddings=true"], [*LORA, "train.loss_chunk_size=5"]],
                         ids=["full-tied", "lora-chunked"])
def test_vocab_parallel_under_hsdp_matches_single_process(rank_pool, tmp_path, extra):
    """dp_replicate=2 x dp_shard=2: each replica holds the same vocabulary split; its gradient is averaged over the
    replicas (sync_replicas), the split kept equal on both."""
    results = rank_pool(4).run(vp_vs_reference, str(tmp_path), [*layout(2, 2, 2), *extra], 4)
    check_vs_reference(results, extra)
    assert results[0]["local_table"] == results[2]["local_table"]  # rank 2: replica 1's first shard
    assert results[1]["local_table"] == results[3]["local_table"]
    assert results[0]["local_table"] != results[1]["local_table"]


def check_vs_reference(results: list[dict], extra: list[str]) -> None:
    for r in results:
        assert r["emb_local_rows"] == -(-r["vocab"] // 2) or r["emb_local_rows"] == r["vocab"] // 2, r
        assert r["tied"] == ("model.tie_embeddings=true" in extra)
        assert abs(r["loss"] - r["ref_loss"]) < TOL, r
        assert r["grad_diff"] < TOL, r
        assert abs(r["norm"] - r["ref_norm"]) < TOL, r  # the split table's gradient counted once in the norm
        if r["emb_grad_norm"] is not None:
            assert r["emb_grad_norm"] > 0
        assert r["losses"][-1] < r["losses"][0] or extra == LORA, r
        assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"], strict=True)) < TOL, r
        assert r["param_diff"] < 1e-4, r
        assert abs(r["eval"]["eval_loss"] - r["ref_eval"]["eval_loss"]) < TOL, r
        assert r["eval"]["eval_accuracy"] == r["ref_eval"]["eval_accuracy"], r
        assert r["logits_shape"][-1] == r["vocab"] and r["logit_diff"] < TOL, r
        assert r["argmax_equal"], r  # a few steps in, one token wins everywhere: the ops test varies it
    assert all(r["losses"] == results[0]["losses"] for r in results)


def accumulation_vs_reference(run_dir):
    """Two accumulation micro-batches per rank, an uneven final evaluation batch."""
    from meshtune.runtime.run import build_trainer

    cfg = tiny_config(run_dir, *VP, "train.micro_batch_size=2", "model.tie_embeddings=true", "data.num_eval=13",
                      "train.micro_batch_size=2")
    ref = reference_trainer(cfg)
    trainer = build_trainer(cfg)
    ref_loss, ref_tokens = ref.forward_backward(ref.next_micro_batches())
    loss, tokens = trainer.forward_backward(trainer.next_micro_batches())
    return {"accum": trainer.sampler.accum_steps, "grad_diff": max_diff(full_grads(trainer.model),
                                                                          full_grads(ref.model)),
            "loss": trainer.mean_loss(loss, tokens), "ref_loss": ref.mean_loss(ref_loss, ref_tokens),
            "eval": trainer.evaluate(), "ref_eval": ref.evaluate()}


def test_vocab_parallel_accumulation_and_short_eval_batch(rank_pool, tmp_path):
    for r in rank_pool(2).run(accumulation_vs_reference, str(tmp_path)):
        assert r["accum"] == 2
        assert abs(r["loss"] - r["ref_loss"]) < TOL, r
        assert r["grad_diff"] < TOL, r
        assert abs(r["eval"]["eval_loss"] - r["ref_eval"]["eval_loss"]) < TOL, r
        assert r["eval"]["eval_accuracy"] == r["ref_eval"]["eval_accuracy"], r


def resume_vp(run_dir, steps, cut):
    from tests.distributed.test_checkpoint import interrupted_vs_uninterrupted

    return interrupted_vs_uninterrupted(run_dir, [*VP, "model.tie_embeddings=true"],
                                        [*VP, "model.tie_embeddings=true"], steps, cut)


def test_vocab_parallel_resume_is_bitwise_identical(rank_pool, tmp_path):
    for r in rank_pool(2).run(resume_vp, str(tmp_path), 6, 3):
        assert r["start"] == 3
        assert r["losses"] == r["ref_losses"]
        assert r["param_diff"] == 0.0


def save_vp_checkpoint(run_dir, extra):
    from meshtune.runtime.run import build_trainer

    trainer = build_trainer(tiny_config(run_dir, *VP, *extra))
    step_losses(trainer, 2)
    trainer.save()
    saved = full_params(trainer.model)
    return saved, step_losses(trainer, 2)


@pytest.mark.parametrize("world,extra", [(2, []), (2, ["model.tie_embeddings=true"]),
                                         (4, [*layout(2, 2, 2), "model.tie_embeddings=true"])],
                         ids=["untied", "tied", "hsdp-tied"])
def test_vocab_parallel_reshards_to_single_process(rank_pool, tmp_path, world, extra):
    """Saved by 2 vocabulary-parallel ranks (or 2 x 2 under HSDP); this process alone (dp_shard=1, no
    vocab_parallel) resumes it and trains on like the ranks did."""
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer

    saved, following = rank_pool(world).run(save_vp_checkpoint, str(tmp_path), extra)[0]
    extra = [e for e in extra if not e.startswith(("parallel.dp_", "train.micro_batch_size"))]
    alone = build_trainer(tiny_config(str(tmp_path), *layout(1, 1, 8), *extra, "checkpoint.resume=auto"), DistEnv())
    assert alone.step == 2
    assert max_diff(full_params(alone.model), saved) == 0.0
    losses = step_losses(alone, 2)
    assert max(abs(a - b) for a, b in zip(losses, following, strict=True)) < TOL, (losses, following)


def ops_vs_full_vocabulary(vocab, tied, chunk=0):
    """The split embedding lookup, loss, argmax and whole logits on random weights and data (an uneven split when
    `vocab` is odd), against full-vocabulary torch ops on every rank's data gathered here. With `chunk`, the loss
    over that many positions at a time; `positions`: the most positions of any tensor over this rank's vocabulary
    columns that the loss's forward and backward made (every rank's padded batch x the chunk, or x the sequence)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.utils._python_dispatch import TorchDispatchMode

    from meshtune.runtime.vocab_parallel import VocabParallelLogits, apply_vocab_parallel

    rank, world, dim = dist.get_rank(), dist.get_world_size(), 8
    model = nn.Module()
    model.tok_embeddings, model.output = nn.Embedding(vocab, dim), nn.Linear(dim, vocab, bias=False)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    full_emb, full_head = model.tok_embeddings.weight.detach().clone(), model.output.weight.detach().clone()
    shard = apply_vocab_parallel(model, init_device_mesh("cpu", (world,)), None) and model.output.vocab_shard
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch; rank 1's is shorter (B=2)
    B, T = 3 - rank, 5
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    labels[0, :2] = -100
    extra = torch.randn(B, T, dim, generator=g)  # a second input to the head, so it gets a gradient of its own
    h = model.tok_embeddings(tokens).detach()  # its backward is checked through the trainer's gradients
    emb_diff = float((h - full_emb[tokens]).abs().max())
    hidden = (h + extra).requires_grad_()
    class Widest(TorchDispatchMode):
        positions = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[-1] == shard.rows:
                    Widest.positions = max(Widest.positions, t.shape[:-1].numel())
            return out

    logits = VocabParallelLogits(hidden, model.output, shard, chunk)
    with Widest():
        loss = logits.summed_loss(labels)
        (loss * 2.0).backward()  # the trainer's dp / tokens factor, here 2
    argmax, whole = logits.argmax(dim=-1), logits.full()

    everyone = [None] * world
    dist.all_gather_object(everyone, (hidden.detach(), labels))
    ref_head = full_head.clone().requires_grad_()
    ref_total = torch.zeros(())
    for r, (hr, lr) in enumerate(everyone):
        hr = hr.clone().requires_grad_()
        lr_loss = F.cross_entropy((hr @ ref_head.T).flatten(0, 1), lr.flatten(), ignore_index=-100, reduction="sum")
        (lr_loss * 2.0).backward()
        ref_total = ref_total + lr_loss.detach()
        if r == rank:
            ref_loss, ref_hidden_grad, ref_logits = lr_loss.detach(), hr.grad, (hr @ ref_head.T).detach()
    head_grad = model.output.weight.grad.full_tensor()
    return {"emb_diff": emb_diff, "loss_diff": float((loss.detach() - ref_loss).abs()),
            "hidden_grad_diff": float((hidden.grad - ref_hidden_grad).abs().max()),
            # the shard's gradient is the sum over ranks' objectives times 1 / dp (FSDP2's average for the rest)
            "head_grad_diff": float((head_grad - ref_head.grad / world).abs().max()),
            "head_grad_norm": float(head_grad.norm()),
            "argmax_equal": bool((argmax == ref_logits.argmax(dim=-1)).all()),
            "argmax_varied": int(ref_logits.argmax(dim=-1).unique().numel()),
            "full_diff": float((whole - ref_logits).abs().max()), "local_rows": shard.rows,
            "positions": Widest.positions}


@pytest.mark.parametrize("vocab,tied,chunk", [(11, False, 0), (11, True, 0), (16, False, 0), (11, True, 2),
                                              (18, False, 3)],
                         ids=["uneven", "uneven-tied", "even", "uneven-tied-chunk2", "even-chunk3"])
def test_vocab_parallel_ops_match_full_vocabulary(rank_pool, vocab, tied, chunk):
    results = rank_pool(2).run(ops_vs_full_vocabulary, vocab, tied, chunk)
    assert [r["local_rows"] for r in results] == [-(-vocab // 2), vocab - -(-vocab // 2)]
    # both ranks' batches padded to 3 rows: 3 x 2 rows of logits per position, 5 positions or a chunk of them
    # (where the columns are as many as dim, 8, the gathered hidden states count too: the chunked cases avoid it)
    assert [r["positions"] for r in results] == [6 * (chunk or 5)] * 2, results
    for r in results:
        assert r["emb_diff"] == 0.0, r  # exactly one rank contributes each row: the sum is exact
        assert r["loss_diff"] < TOL and r["hidden_grad_diff"] < TOL and r["head_grad_diff"] < TOL, r
        assert r["head_grad_norm"] > 0
        assert r["argmax_equal"] and r["argmax_varied"] > 1, r
        assert r["full_diff"] < TOL, r


def train_and_save(run_dir, extra):
    """Two vocabulary-parallel steps and a checkpoint; returns the full (gathered) parameters."""
    from meshtune.runtime.run import build_trainer

    trainer = build_trainer(tiny_config(run_dir, *VP, "model.tie_embeddings=true", *extra))
    step_losses(trainer, 2)
    trainer.save()
    return full_params(trainer.model)


def test_vocab_parallel_checkpoint_exports_full_weights(rank_pool, tmp_path):
    """`meshtune export --format merged` of a vocabulary-parallel run holds the whole trained table, and a LoRA
    run's `--format peft` export is written from the same kind of checkpoint."""
    from safetensors.torch import load_file

    from meshtune.export import export

    params = rank_pool(2).run(train_and_save, str(tmp_path / "full"), [])[0]
    export(tmp_path / "full", "merged", tmp_path / "merged", quiet=True)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    table = merged["tok_embeddings.weight"]
    assert table.shape == params["tok_embeddings.weight"].shape and table.shape[0] == 264
    assert (table == params["tok_embeddings.weight"]).all()
    assert all((merged[k] == v).all() for k, v in params.items() if k in merged)
    rank_pool(2).run(train_and_save, str(tmp_path / "lora"), LORA)
    files = export(tmp_path / "lora", "peft", tmp_path / "peft", quiet=True)
    assert any(f.name == "adapter_model.safetensors" for f in files)
