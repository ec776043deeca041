"""A chat model's whole path: its HF dir (weights + tokenizer + chat template) -> `finetune/chat-lora` (bundled
conversations, packed) -> export with the template -> `serve` /v1/chat/completions and `distill-data --chat`, and
generation that stops at the template's end-of-turn token."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.chat_tokenizers import LLAMA3, write_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny Llama 3-style chat checkpoint and a 3-step chat-lora run from it (one process)."""
    from meshtune.cli import main

    root = tmp_path_factory.mktemp("chat")
    hf_dir = write_tokenizer(root, "llama3")
    vocab = transformers.AutoTokenizer.from_pretrained(hf_dir).__len__()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rms_norm_eps=1e-5, tie_word_embeddings=True, attn_implementation="sdpa")
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    run_dir = root / "run"
    code = main(["train", "finetune/chat-lora", f"init_from={hf_dir}", f"run_dir={run_dir}", "model.max_seq_len=128",
                 "data.seq_len=128", "data.num_train=64", "data.num_eval=4", "train.steps=3", "train.eval_every=0",
                 "train.global_batch_size=4", "train.micro_batch_size=2", "train.log_every=1", "parallel.dp_shard=1",
                 "checkpoint.every=0", "checkpoint.save_final=true", "metrics.progress=false", "optim.warmup_steps=1"])
    assert code == 0
    return hf_dir, run_dir


def test_chat_lora_trains_on_packed_conversations(chat_run):
    _, run_dir = chat_run
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    evals = [r for r in lines if "eval_loss" in r]
    assert evals and evals[-1]["eval_loss"] > 0


def test_export_carries_the_template_transformers_reads(chat_run, tmp_path):
    import yaml

    from meshtune.config import read_yaml
    from meshtune.export import export

    hf_dir, run_dir = chat_run
    out = tmp_path / "hf"
    export(run_dir, "hf", out, quiet=True)
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == LLAMA3
    # a run given data.chat_template exports that one: transformers reads chat_template.jinja first
    other = tmp_path / "other-run"
    shutil.copytree(run_dir, other)
    raw = read_yaml(other / "config.yaml")
    custom = LLAMA3.replace("<|start_header_id|>", "<|start_header_id|> ")
    raw["data"]["chat_template"] = custom
    (other / "config.yaml").write_text(yaml.safe_dump(raw))
    export(other, "hf", tmp_path / "hf2", quiet=True)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2").chat_template == custom


def test_serve_chat_completions(chat_run):
    from meshtune.serve import CompletionModel, RequestError

    _, run_dir = chat_run
    app = CompletionModel(str(run_dir))
    reply = app.chat({"messages": [{"role": "user", "content": "Add 12 and 30."}], "max_tokens": 5,
                      "temperature": 0})
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(reply["choices"][0]["message"]["content"], str)
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")
    with pytest.raises(RequestError, match="stream is not supported"):
        app.chat({"messages": [{"role": "user", "content": "hi"}], "stream": True})
    with pytest.raises(RequestError, match="messages must be a non-empty list"):
        app.chat({"messages": [{"role": "narrator", "content": "hi"}]})


class _Always(torch.nn.Module):
    """A 'model' that always predicts one token: generation must end there when it is a stop token."""

    def __init__(self, token: int, vocab: int):
        super().__init__()
        self.token, self.vocab = token, vocab
        self.cfg = type("Cfg", (), {"max_seq_len": 64})()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(*x.shape, self.vocab)
        out[..., self.token] = 1.0
        return out


def test_generation_stops_at_every_end_of_turn_token(tmp_path):
    from meshtune.data import build_tokenizer
    from meshtune.inference import generate

    tok = build_tokenizer(str(write_tokenizer(tmp_path, "llama3")))
    end_of_text = tok._tok.token_to_id("<|end_of_text|>")
    assert end_of_text != tok.eos_id and end_of_text in tok.stop_ids  # from generation_config.json
    for stop in tok.stop_ids:
        out = generate(_Always(stop, tok.vocab_size), tok, ["hello"], max_tokens=8)[0]
        assert out.finish_reason == "stop" and out.completion_tokens == 0
    other = tok._tok.token_to_id("a")
    assert generate(_Always(other, tok.vocab_size), tok, ["hello"], max_tokens=3)[0].finish_reason == "length"


def test_distill_data_chat_writes_conversations(chat_run, tmp_path):
    from meshtune.data import load_records
    from meshtune.distill_data import LocalTeacher, distill_data

    _, run_dir = chat_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Add 1 and 2.", "Sort: c a b"]))
    out = tmp_path / "teacher.jsonl"
    teacher = LocalTeacher(str(run_dir))
    r = distill_data(prompts, out, teacher, max_tokens=4, chat=True, log=lambda m: None)
    assert r["written"] == 2
    records = load_records(out)
    assert [m["role"] for m in records[0]["messages"]] == ["user", "assistant"]
    again = distill_data(prompts, out, teacher, max_tokens=4, chat=True, log=lambda m: None)
    assert again == {"total": 2, "skipped": 2, "written": 0}
