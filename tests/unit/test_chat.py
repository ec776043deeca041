"""Chat templates against transformers' apply_chat_template, tokenizer config files, conversation files and their
bad input."""

from __future__ import annotations

import json

import pytest

from meshtune.config import ConfigError, DataConfig
from meshtune.data import ChatDataset, build_datasets, build_tokenizer, load_records
from meshtune.data.chat import ChatTemplate, encode_chat
from tests.chat_tokenizers import CONVERSATIONS, STYLES, no_system, write_tokenizer

transformers = pytest.importorskip("transformers")


def _conversations(style: str) -> list[list[dict]]:
    return [c if style in ("llama3", "chatml") else no_system(c) for c in CONVERSATIONS]


@pytest.fixture(scope="module", params=sorted(STYLES))
def style(request, tmp_path_factory):
    folder = write_tokenizer(tmp_path_factory.mktemp("tok"), request.param)
    return request.param, folder, build_tokenizer(str(folder)), transformers.AutoTokenizer.from_pretrained(folder)


def test_special_tokens_come_from_the_config_files(style):
    name, _, tok, hf = style
    assert tok.eos_id == hf.eos_token_id
    assert tok.pad_id == (hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id)
    assert tok.bos == hf("hi").input_ids[: len(tok.bos)] and tok.add_bos == STYLES[name]["add_bos"]
    assert (hf.bos_token_id is None) == (not STYLES[name]["specials"]["bos_token"])
    assert [tok.decode_token(i) for i in tok.stop_ids] == [hf.eos_token, *[
        t for t in STYLES[name]["stops"] if t != hf.eos_token]]


def test_render_and_tokens_match_apply_chat_template(style):
    name, _, tok, hf = style
    template = ChatTemplate(tok.chat_template, tok.special_tokens, "test")
    for conv in _conversations(name):
        assert template.render(conv) == hf.apply_chat_template(conv, tokenize=False)
        assert template.render(conv[:-1], add_generation_prompt=True) == hf.apply_chat_template(
            conv[:-1], tokenize=False, add_generation_prompt=True)
        ids, _ = encode_chat(conv, tok, template)
        theirs = hf.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        assert ids == theirs


@pytest.mark.parametrize("marked", [False, True], ids=["prefixes", "generation-tags"])
def test_assistant_mask_matches_return_assistant_tokens_mask(style, marked):
    """The release template has no generation tags: meshtune's mask from rendered prefixes must equal transformers'
    mask on a template that renders the same text with the tags; with the tags both read them."""
    name, _, tok, hf = style
    marked_template = STYLES[name]["marked"]
    template = ChatTemplate(marked_template if marked else tok.chat_template, tok.special_tokens, "test")
    for conv in _conversations(name):
        ids, mask = encode_chat(conv, tok, template)
        out = hf.apply_chat_template(conv, chat_template=marked_template, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert out["input_ids"] == ids
        assert [int(m) for m in mask] == out["assistant_masks"] and any(mask)
        targets = [i for i, m in zip(ids, mask, strict=True) if m]
        assert set(tok.stop_ids) & set(targets)  # every turn's end-of-turn token is learned


def test_train_on_last_and_all(style):
    name, _, tok, _ = style
    template = ChatTemplate(tok.chat_template, tok.special_tokens, "test")
    conv = _conversations(name)[0]
    _, every = encode_chat(conv, tok, template, "assistant")
    ids, last = encode_chat(conv, tok, template, "last")
    _, everything = encode_chat(conv, tok, template, "all")
    assert all(everything) and sum(last) < sum(every)
    first_last = last.index(True)
    assert last[first_last:] == every[first_last:] and not any(last[:first_last])
    assert tok.decode([i for i, m in zip(ids, last, strict=True) if m]).strip() == conv[-1]["content"].strip()


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_chat_dataset_from_messages_and_sharegpt(tmp_path, style):
    name, folder, tok, hf = style
    convs = _conversations(name)
    sharegpt = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                                    "value": m["content"]} for m in c]} for c in convs]
    a = load_records(_write_jsonl(tmp_path / "m.jsonl", [{"messages": c} for c in convs]))
    b = load_records(_write_jsonl(tmp_path / "s.jsonl", sharegpt))
    assert a == b
    ds = ChatDataset(a, tok, ChatTemplate(tok.chat_template, tok.special_tokens, "t"), seq_len=256)
    for row, conv in enumerate(convs):
        ids = hf.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        n = len(ids) - 1
        assert ds.input_ids[row, :n].tolist() == ids[:-1] and ds.labels[row, n - 1].item() == ids[-1]


def test_build_datasets_reads_conversations_with_the_folders_template(tmp_path, style):
    name, folder, tok, _ = style
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in _conversations(name)] * 3)
    cfg = DataConfig(task="", train_path=str(path), tokenizer=str(folder), seq_len=128, num_eval=2)
    train, ev = build_datasets(cfg, tok, seed=0)
    assert len(train) == 7 and len(ev) == 2
    packed, _ = build_datasets(DataConfig(**{**cfg.__dict__, "packing": True}), tok, seed=0)
    assert len(packed) < len(train) and (packed.labels != -100).sum() == (train.labels != -100).sum()


def test_parquet_and_saved_datasets(tmp_path, style):
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa

    name, _, _, _ = style
    convs = [{"messages": c} for c in _conversations(name)]
    pq.write_table(pa.Table.from_pylist(convs), tmp_path / "chat.parquet")
    assert load_records(tmp_path / "chat.parquet") == convs
    datasets.Dataset.from_list(convs).save_to_disk(str(tmp_path / "saved"))
    assert load_records(tmp_path / "saved") == convs
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "a"}]), tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match=r"data.train_path: .*bad.parquet has columns question, answer; it needs "
                                          r"messages"):
        load_records(tmp_path / "bad.parquet")


@pytest.mark.parametrize("record,match", [
    ({"messages": [{"role": "user", "content": "hi"}]}, r"line 2: the conversation has no assistant turn"),
    ({"messages": [{"role": "narrator", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     r"line 2: turn 1 has unknown role 'narrator'; use one of system, user, assistant, tool"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"line 2: turn 1 has unknown from 'bot'"),
    ({"messages": [{"role": "assistant", "content": ["a", "b"]}]}, r'line 2: turn 1 "content" must be a string'),
    ({"prompt": "a", "response": "b"}, r"line 2: prompt/response pairs, but line 1 is conversations"),
])
def test_bad_conversation_files_name_the_line(tmp_path, record, match):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(ConfigError, match=match) as e:
        load_records(path)
    assert "\n" not in str(e.value)


def test_a_template_that_raises_names_the_conversation(tmp_path):
    folder = write_tokenizer(tmp_path, "mistral")
    tok = build_tokenizer(str(folder))
    path = _write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[1]}, {"messages": CONVERSATIONS[0]}])
    cfg = DataConfig(task="", train_path=str(path), tokenizer=str(folder), num_eval=0)
    with pytest.raises(ConfigError, match=r"data.train_path: conversation 2: the chat template \(data.tokenizer .*\) "
                                          r"refused it: Conversation roles must alternate"):
        build_datasets(cfg, tok, seed=0)


def test_templates_that_cannot_mask_are_refused(tmp_path):
    folder = write_tokenizer(tmp_path, "chatml")
    tok = build_tokenizer(str(folder))
    conv = CONVERSATIONS[0]
    # drops earlier assistant turns once a later one exists (like reasoning templates): not prefix-preserving
    drops = ("{% for m in messages %}{% if m.role != 'assistant' or loop.last %}{{ '<|im_start|>' + m.role + '\\n' + "
             "m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
             "{{ '<|im_start|>assistant\\n' }}{% endif %}")
    with pytest.raises(ConfigError, match=r"not prefix-preserving: the conversation rendered up to assistant turn 1"):
        encode_chat(conv, tok, ChatTemplate(drops, tok.special_tokens, "data.chat_template"))
    outside = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}{% if m.role == 'assistant' %}"
               "{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}"
               "{{ '<|im_end|>\\n' }}{% endfor %}")
    with pytest.raises(ConfigError, match=r"assistant turn 1 .* leaves the end-of-turn token out of the loss"):
        encode_chat(conv, tok, ChatTemplate(outside, tok.special_tokens, "data.chat_template"))
    with pytest.raises(ConfigError, match=r"data.chat_template: the chat template does not compile \(line 1"):
        ChatTemplate("{% for m in messages %}", {}, "data.chat_template")


def test_the_sandbox_blocks_python_internals(tmp_path):
    folder = write_tokenizer(tmp_path, "chatml")
    tok = build_tokenizer(str(folder))
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ConfigError, match="refused it|failed"):
        ChatTemplate(evil, {}, "data.chat_template").render(CONVERSATIONS[1])
    with pytest.raises(ConfigError, match="cannot set the attribute '_x'"):
        ChatTemplate("{% set ns = namespace(_x=1) %}", {}, "t").render(CONVERSATIONS[1])
    assert tok.chat_template  # the folder's own template was read


def test_conversations_without_a_template_say_how(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[1]}] * 3)
    cfg = DataConfig(task="", train_path=str(path), num_eval=1)
    with pytest.raises(ConfigError, match=r"holds conversations but data.tokenizer=byte has no chat template"):
        build_datasets(cfg, build_tokenizer("byte"), seed=0)


def test_bad_special_token_in_config_names_the_file(tmp_path):
    folder = write_tokenizer(tmp_path, "llama3")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|nope|>"}))
    with pytest.raises(ConfigError, match=r"tokenizer_config.json: eos_token '<\|nope\|>' is not in the vocabulary"):
        build_tokenizer(str(folder))
