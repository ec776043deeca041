"""Packed rows on real gloo ranks: FSDP2 and TP=2 against the single-process reference, chat data from a tokenizer
folder, and a packed run resumed on another world size."""

from __future__ import annotations

import json

from tests.chat_tokenizers import CONVERSATIONS, write_tokenizer
from tests.distributed.cases import full_params, layout, max_diff, reference_trainer, step_losses, tiny_config

PACKED = ["data.packing=true", "data.seq_len=64", "model.max_seq_len=64"]


def packed_vs_reference(run_dir, overrides):
    from meshtune.runtime.run import build_trainer

    cfg = tiny_config(run_dir, *PACKED, *overrides)
    trainer = build_trainer(cfg)
    ref = reference_trainer(cfg)
    assert "positions" in trainer.next_micro_batches()[0]  # the rows really are packed
    trainer.sampler.load_state_dict(ref.sampler.state_dict())
    losses, ref_losses = step_losses(trainer, 4), step_losses(ref, 4)
    return {"losses": losses, "ref": ref_losses, "rows": len(trainer.train_ds),
            "param_diff": max_diff(full_params(trainer.model), full_params(ref.model))}


def test_packed_fsdp_and_tp_match_the_single_process_reference(rank_pool, tmp_path):
    pool = rank_pool(2)
    for name, lay in (("fsdp", layout(1, 2, 2)), ("tp", ["parallel.tp=2", "train.micro_batch_size=4"])):
        for r in pool.run(packed_vs_reference, str(tmp_path / name), lay):
            assert r["rows"] < 256  # 256 reverse examples in fewer rows of 64
            assert max(abs(a - b) for a, b in zip(r["losses"], r["ref"], strict=True)) < 1e-5, (name, r)
            assert r["param_diff"] < 1e-4, (name, r)  # as the unpacked TP tests: Adam divides tiny differences


def chat_run(run_dir, data_overrides):
    from meshtune.runtime.run import build_trainer

    cfg = tiny_config(run_dir, "data.task=", *data_overrides, "model.max_seq_len=128", "data.seq_len=128",
                      "data.num_eval=2", *layout(1, 2, 2))
    trainer = build_trainer(cfg)
    ref = reference_trainer(cfg)
    batch = trainer.next_micro_batches()[0]
    trainer.sampler.load_state_dict(ref.sampler.state_dict())
    losses, ref_losses = step_losses(trainer, 3), step_losses(ref, 3)
    return {"losses": losses, "ref": ref_losses, "targets": int((batch["labels"] != -100).sum())}


def test_chat_lora_from_a_tokenizer_folder_on_two_ranks(rank_pool, tmp_path):
    folder = write_tokenizer(tmp_path, "llama3")
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 24))
    for r in rank_pool(2).run(chat_run, str(tmp_path / "run"), [f"data.tokenizer={folder}",
                                                                f"data.train_path={path}", "data.packing=true",
                                                                "recipe.name=lora"]):
        assert r["targets"] > 0
        assert max(abs(a - b) for a, b in zip(r["losses"], r["ref"], strict=True)) < 1e-5, r


def packed_resume(run_dir):
    """Packed rows saved by 2 FSDP ranks at step 3, resumed by DDP on 2 ranks, vs straight through on FSDP."""
    from meshtune.runtime.run import build_trainer

    straight = build_trainer(tiny_config(f"{run_dir}/straight", *PACKED, *layout(1, 2, 2)))
    ref = step_losses(straight, 6)
    first = build_trainer(tiny_config(f"{run_dir}/cut", *PACKED, *layout(1, 2, 2)))
    losses = step_losses(first, 3)
    first.save()
    resumed = build_trainer(tiny_config(f"{run_dir}/cut", *PACKED, *layout(2, 1, 4), "checkpoint.resume=auto"))
    start = resumed.step
    losses += step_losses(resumed, 3)
    return {"start": start, "losses": losses, "ref": ref,
            "param_diff": max_diff(full_params(resumed.model), full_params(straight.model))}


def test_packed_resume_on_another_layout(rank_pool, tmp_path):
    for r in rank_pool(2).run(packed_resume, str(tmp_path)):
        assert r["start"] == 3
        assert max(abs(a - b) for a, b in zip(r["losses"], r["ref"], strict=True)) < 1e-5, r
        assert r["param_diff"] < 1e-5, r


def packed_save(run_dir):
    from meshtune.runtime.run import build_trainer

    straight = build_trainer(tiny_config(f"{run_dir}/straight", *PACKED, *layout(1, 2, 2)))
    ref = step_losses(straight, 6)
    first = build_trainer(tiny_config(f"{run_dir}/cut", *PACKED, *layout(1, 2, 2)))
    step_losses(first, 3)
    first.save()
    return {"ref": ref, "params": full_params(straight.model)}


def test_packed_resume_on_one_process(rank_pool, tmp_path):
    """Packed rows saved by 2 FSDP ranks at step 3; this process alone (world size 1) resumes and ends where the
    2-rank run did."""
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer

    saved = rank_pool(2).run(packed_save, str(tmp_path))[0]
    alone = build_trainer(tiny_config(str(tmp_path / "cut"), *PACKED, *layout(1, 1, 8), "checkpoint.resume=auto"),
                          DistEnv())
    assert alone.step == 3
    losses = step_losses(alone, 3)
    assert max(abs(a - b) for a, b in zip(losses, saved["ref"][3:], strict=True)) < 1e-5
    assert max_diff(full_params(alone.model), saved["params"]) < 1e-5
