"""The token cache: a data file is tokenized once, mapped by later runs, and tokenized again when the data, the
tokenizer files or the chat template change."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from meshtune.config import DataConfig
from meshtune.data import build_datasets, build_tokenizer
from meshtune.data.store import TokenStore
from tests.chat_tokenizers import CONVERSATIONS, write_tokenizer


def _rows(ds):
    return [ds[i] for i in range(len(ds))]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


@pytest.fixture
def chat_data(tmp_path):
    folder = write_tokenizer(tmp_path, "chatml")
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 10))
    cfg = DataConfig(task="", train_path=str(path), tokenizer=str(folder), seq_len=96, num_eval=3, packing=True)
    return cfg, folder, path, tmp_path / "cache"


def test_second_run_maps_the_cache_without_tokenizing(chat_data, monkeypatch):
    cfg, folder, _, cache = chat_data
    tok = build_tokenizer(str(folder))
    train, ev = build_datasets(cfg, tok, seed=0, cache_dir=str(cache))
    assert train.store.built and train.store is ev.store and train.store.path is not None
    memory, _ = build_datasets(cfg, tok, seed=0)  # the same rows without a cache
    assert _same(_rows(train), _rows(memory))
    again = build_tokenizer(str(folder))
    monkeypatch.setattr(again, "encode_offsets", lambda *a: pytest.fail("tokenized again"))
    train2, ev2 = build_datasets(cfg, again, seed=0, cache_dir=str(cache))
    assert not train2.store.built and _same(_rows(train2), _rows(train)) and _same(_rows(ev2), _rows(ev))
    assert len(list(cache.iterdir())) == 1


@pytest.mark.parametrize("change", ["template", "tokenizer", "data", "seq_len"])
def test_cache_is_invalidated_by_what_the_tokens_depend_on(chat_data, change):
    cfg, folder, path, cache = chat_data
    first, _ = build_datasets(cfg, build_tokenizer(str(folder)), seed=0, cache_dir=str(cache))
    if change == "template":
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = config["chat_template"].replace("You are Qwen", "You are Q")
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    elif change == "tokenizer":
        gen = json.loads((folder / "generation_config.json").read_text())
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": gen["eos_token_id"][:1]}))
    elif change == "data":
        path.write_text(path.read_text() + json.dumps({"messages": CONVERSATIONS[1]}) + "\n")
    else:
        cfg = DataConfig(**{**cfg.__dict__, "seq_len": 64})
    second, _ = build_datasets(cfg, build_tokenizer(str(folder)), seed=0, cache_dir=str(cache))
    assert second.store.built and second.store.path != first.store.path
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2
    if change == "template":
        assert not np.array_equal(first.store.tokens, second.store.tokens)


def test_a_half_written_entry_is_never_read(chat_data):
    cfg, folder, _, cache = chat_data
    tok = build_tokenizer(str(folder))
    train, _ = build_datasets(cfg, tok, seed=0, cache_dir=str(cache))
    entry, rows = train.store.path, _rows(train)
    del train  # its pages map the files damaged below
    (entry / "meta.json").unlink()  # a damaged entry (meta.json is written last, before the rename)
    (entry / "tokens.bin").write_bytes(b"junk")
    train2, _ = build_datasets(cfg, tok, seed=0, cache_dir=str(cache))
    assert train2.store.built and (entry / "meta.json").is_file() and _same(_rows(train2), rows)


def test_store_round_trip(tmp_path):
    pairs = [([1, 2, 3], [2, 3, -100]), ([4], [5]), ([], [])]
    store = TokenStore.build(pairs)
    store.save(tmp_path)
    back = TokenStore.open(tmp_path)
    assert len(back) == 3 and back.lengths.tolist() == [3, 1, 0]
    assert [list(map(int, back.example(i)[0])) for i in range(3)] == [[1, 2, 3], [4], []]
    assert list(map(int, back.example(0)[1])) == [2, 3, -100]
