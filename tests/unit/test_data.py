"""Unit tests for meshtune.data: tokenizers, tasks, datasets, files, the sampler and exact match."""

from __future__ import annotations

import json

import pytest
import torch

from meshtune.config import ConfigError, DataConfig
from meshtune.data import (
    TASKS,
    ByteTokenizer,
    HFTokenizer,
    PackedDataset,
    SFTDataset,
    StepSampler,
    build_datasets,
    build_tokenizer,
    collate,
    encode_example,
    eval_batches,
    exact_match,
    generate,
    load_jsonl,
)

# ---- tokenizers ---------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_non_ascii():
    tok = build_tokenizer("byte")
    text = "héllo, wörld ✓ 日本"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    # Special tokens are skipped on decode; broken UTF-8 is replaced, not raised.
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    assert tok.decode([0xC3]) == "\ufffd"
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 259)


def _save_word_level(tmp_path, specials):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", *specials])
    tok.train_from_iterator(["the cat sat", "the dog ran", "a cat ran"], trainer=trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer_from_built_file(tmp_path):
    path = _save_word_level(tmp_path, ["<s>", "</s>", "<pad>"])
    tok = build_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode("the cat ran")
    assert len(ids) == 3 and {tok.bos_id, tok.eos_id, tok.pad_id}.isdisjoint(ids)
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "the cat ran"
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    assert tok.vocab_size == 4 + 6  # 4 specials + 6 words


def test_hf_tokenizer_pad_falls_back_to_eos(tmp_path):
    tok = HFTokenizer(_save_word_level(tmp_path, ["<|endoftext|>"]))
    assert tok.pad_id == tok.eos_id == tok.bos_id


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"data.tokenizer: .*missing.json"):
        build_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not a tokenizer")
    with pytest.raises(ConfigError, match=r"data.tokenizer: .*bad.json"):
        build_tokenizer(str(bad))
    with pytest.raises(ConfigError, match="end-of-sequence"):
        HFTokenizer(_save_word_level(tmp_path, ["<pad>"]))


# ---- tasks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tasks_are_deterministic_correct_and_short(task):
    a, b = generate(task, 200, seed=3), generate(task, 200, seed=3)
    assert a == b and a != generate(task, 200, seed=4)
    tok = ByteTokenizer()
    for e in a:
        assert TASKS[task].solve(e["prompt"]) == e["response"] and e["prompt"].endswith("\n")
        assert 2 + len(tok.encode(e["prompt"] + e["response"])) <= 48 + 1


def test_add_answers_are_sums():
    for e in generate("add", 100, seed=0):
        a, b = e["prompt"].removeprefix("add: ").strip().split("+")
        assert 0 <= int(a) <= 999 and 0 <= int(b) <= 999 and int(e["response"]) == int(a) + int(b)
    assert generate("reverse", 1, seed=0)[0]["response"] == generate("reverse", 1, seed=0)[0]["prompt"][9:-1][::-1]


def test_arrange_is_sort_under_a_new_prompt_word():
    # the PEFT fine-tuning task: the same answers as `sort` for the same payload, only the prompt word differs
    for e in generate("arrange", 100, seed=0):
        payload = e["prompt"].removeprefix("arrange: ").removesuffix("\n")
        assert e["response"] == TASKS["sort"].solve(f"sort: {payload}\n") == "".join(sorted(payload))
        assert len(payload) >= 4 and set(payload) <= set("abcdefghijklmnopqrstuvwxyz0123456789")


def test_unknown_task():
    with pytest.raises(ConfigError, match=r"data.task: .*add, arrange, reverse, rsort, sort"):
        generate("copy", 1, seed=0)


# ---- datasets -----------------------------------------------------------------------------------------


def test_label_masking():
    tok = ByteTokenizer()
    inp, lab = encode_example("ab\n", "xy", tok, seq_len=10)
    # tokens: bos a b \n x y eos (7) -> 6 inputs, 6 labels, then 4 padding.
    assert inp == [tok.bos_id, 97, 98, 10, 120, 121] + [tok.pad_id] * 4
    # labels predicting a, b, \n are prompt tokens; x, y and eos are scored; padding is -100.
    assert lab == [-100, -100, -100, 120, 121, tok.eos_id] + [-100] * 4


def test_truncation_and_sft_dataset():
    tok = ByteTokenizer()
    inp, lab = encode_example("abc", "defgh", tok, seq_len=5)
    # bos a b c d e | f g h eos are cut: the response is truncated and eos never fits.
    assert inp == [tok.bos_id, 97, 98, 99, 100] and lab == [-100, -100, -100, 100, 101]
    ds = SFTDataset([{"prompt": "abc", "response": "defgh"}, {"prompt": "a", "response": "b"}], tok, 5)
    assert len(ds) == 2 and ds.num_truncated == 1
    batch = collate([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 5) and batch["labels"].dtype == torch.long


def test_packing_text():
    tok = ByteTokenizer()
    ds = PackedDataset(["abcd", "efg"], tok, seq_len=4)
    stream = [97, 98, 99, 100, tok.eos_id, 101, 102, 103, tok.eos_id]  # 9 tokens -> 8 predictions
    assert len(ds) == 2
    assert ds[0]["input_ids"].tolist() == stream[0:4] and ds[0]["labels"].tolist() == stream[1:5]
    assert ds[1]["input_ids"].tolist() == stream[4:8] and ds[1]["labels"].tolist() == stream[5:9]
    tail = PackedDataset(["abcdef"], tok, seq_len=4)[1]  # 7 tokens: second chunk has 2 real predictions
    assert tail["labels"].tolist() == [102, tok.eos_id, -100, -100]
    assert tail["input_ids"].tolist() == [101, 102, tok.pad_id, tok.pad_id]


def test_build_datasets_from_task_is_disjoint():
    cfg = DataConfig(task="add", num_train=300, num_eval=50, seq_len=48)
    train, ev = build_datasets(cfg, ByteTokenizer(), seed=1)
    assert len(train) == 300 and len(ev) == 50
    assert {e["prompt"] for e in train.examples}.isdisjoint(e["prompt"] for e in ev.examples)
    again, _ = build_datasets(cfg, ByteTokenizer(), seed=1)
    assert torch.equal(train.input_ids, again.input_ids)


def test_build_datasets_needs_exactly_one_source(tmp_path):
    with pytest.raises(ConfigError, match=r"data.task / data.train_path: both"):
        build_datasets(DataConfig(task="add", train_path="x.jsonl"), ByteTokenizer(), seed=0)
    with pytest.raises(ConfigError, match=r"neither"):
        build_datasets(DataConfig(task=""), ByteTokenizer(), seed=0)


def test_build_datasets_from_files(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}\n", "response": f"a{i}"}) + "\n" for i in range(10)))
    train, ev = build_datasets(DataConfig(task="", train_path=str(path), num_eval=3), ByteTokenizer(), seed=0)
    tok = ByteTokenizer()
    answers = [tok.decode(ev[i]["labels"][ev[i]["labels"] != -100]) for i in range(len(ev))]
    assert len(train) == 7 and answers == ["a7", "a8", "a9"]
    with pytest.raises(ConfigError, match=r"data.train_path: .*train.jsonl has 10 examples"):
        build_datasets(DataConfig(task="", train_path=str(path), num_eval=10), ByteTokenizer(), seed=0)
    txt = tmp_path / "book.txt"
    txt.write_text("x" * 100)
    cfg = DataConfig(task="", train_path=str(txt), eval_path=str(path), seq_len=10)
    train, ev = build_datasets(cfg, ByteTokenizer(), seed=0)
    assert len(train) == 10 and len(ev) == 10 and (train.labels != -100).sum() == 100
    with pytest.raises(ConfigError, match=r"data.eval_path: .*nope.jsonl"):
        cfg = DataConfig(task="", train_path=str(txt), eval_path=str(tmp_path / "nope.jsonl"))
        build_datasets(cfg, ByteTokenizer(), seed=0)


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"prompt": "a", "response": "b",}', "invalid JSON"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"prompt": "a"}', '"prompt" and "response"'),
        ('{"text": 5}', '"text" must be a string'),
        ('{"text": "a"}', "one kind per file"),
    ],
)
def test_malformed_jsonl_line_names_file_and_line(tmp_path, line, reason):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n\n' + line + "\n")
    with pytest.raises(ConfigError) as info:
        load_jsonl(path)
    msg = str(info.value)
    assert msg.startswith(f"data.train_path: {path} line 3: ") and reason in msg and "\n" not in msg


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ConfigError, match=r"data.eval_path: .*absent.jsonl: no such file"):
        load_jsonl(tmp_path / "absent.jsonl", "data.eval_path")
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(ConfigError, match="is empty"):
        load_jsonl(tmp_path / "empty.jsonl")


# ---- sampler ------------------------------------------------------------------------------------------


def _global_step(samplers):
    """The samples of one optimizer step over all ranks, in rank then micro-batch order."""
    out = []
    for s in samplers:
        micro = s.next_step()
        assert len(micro) == s.accum_steps and all(len(m) == s.micro_batch_size for m in micro)
        out += [i for m in micro for i in m]
    return out


@pytest.mark.parametrize("dp, micro", [(1, 4), (2, 2), (2, 4), (4, 1), (4, 2)])
def test_sampler_layout_independent(dp, micro):
    ref = StepSampler(100, 16, 16, 0, 1, seed=7)
    ranks = [StepSampler(100, 16, micro, r, dp, seed=7) for r in range(dp)]
    assert ranks[0].accum_steps == 16 // (micro * dp)
    for _ in range(13):  # crosses the epoch boundary (6 steps per epoch)
        assert _global_step(ranks) == ref.next_step()[0]


def test_sampler_epoch_no_repeats_and_rollover():
    s = StepSampler(50, 8, 4, 0, 1, seed=0)
    epoch0 = [i for _ in range(s.steps_per_epoch) for m in s.next_step() for i in m]
    assert len(epoch0) == len(set(epoch0)) == 48 and s.epoch == 0
    first = [i for m in s.next_step() for i in m]
    assert s.epoch == 1 and s.state_dict() == {"epoch": 1, "consumed": 8, "seed": 0}
    assert first != epoch0[:8]  # a fresh permutation per epoch
    assert StepSampler(50, 8, 4, 0, 1, seed=0, shuffle=False).next_step() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_sampler_resume_under_other_dp_size():
    uninterrupted = StepSampler(64, 8, 8, 0, 1, seed=3)
    expected = [uninterrupted.next_step()[0] for _ in range(20)]
    before = [StepSampler(64, 8, 2, r, 2, seed=3) for r in range(2)]
    got = [_global_step(before) for _ in range(11)]
    state = before[1].state_dict()
    after = [StepSampler(64, 8, 1, r, 4, seed=3) for r in range(4)]
    for s in after:
        s.load_state_dict(state)
    got += [_global_step(after) for _ in range(9)]
    assert got == expected
    with pytest.raises(ConfigError, match="train.seed"):
        StepSampler(64, 8, 8, 0, 1, seed=4).load_state_dict(state)


def test_sampler_validation():
    with pytest.raises(ConfigError, match=r"train.global_batch_size=32 .*micro_batch_size=8 .*degree 3"):
        StepSampler(100, 32, 8, 0, 3, seed=0)
    with pytest.raises(ConfigError, match=r"10 samples, fewer than train.global_batch_size=32"):
        StepSampler(10, 32, 8, 0, 1, seed=0)


@pytest.mark.parametrize("n, micro, dp", [(10, 3, 2), (7, 4, 4), (1, 2, 3), (12, 2, 3)])
def test_eval_batches_cover_once_with_equal_counts(n, micro, dp):
    per_rank = [eval_batches(n, micro, r, dp) for r in range(dp)]
    assert len({len(b) for b in per_rank}) == 1
    flat = sorted(i for b in per_rank for m in b for i in m)
    assert flat == list(range(n)) and all(len(m) <= micro for b in per_rank for m in b)


# ---- exact match --------------------------------------------------------------------------------------


def test_exact_match():
    labels = torch.tensor([[-100, 2, 3], [-100, 2, 3], [-100, -100, -100], [1, -100, 0]])
    pred = torch.tensor([[0, 2, 3], [0, 2, 1], [0, 0, 0], [1, 4, 0]])  # wrong only where masked in row 0, 3
    logits = torch.nn.functional.one_hot(pred, 5).float()
    correct, evaluated = exact_match(logits, labels)
    assert correct.tolist() == [True, False, False, True]
    assert evaluated.tolist() == [True, True, False, True]
