"""Batched generation from a trained model, loaded from any artifact (`meshtune.artifacts`).

    model, tokenizer, art = load_for_generation("runs/tiny")          # frozen, eval mode
    outs = generate(model, tokenizer, ["sort: b3a\\n"], max_tokens=16)  # greedy
    template = chat_template_of(art, tokenizer)                         # the run's or the tokenizer's, or None
    outs = generate(model, tokenizer, [chat_prompt(tokenizer, template, messages)])  # stops at end of turn

Used by `meshtune serve` and `meshtune distill-data --teacher`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from meshtune.config import ConfigError


def load_for_generation(spec: str, tokenizer: str | None = None, key: str = "CHECKPOINT"):
    """(model, tokenizer, artifact) for generating from `spec`: any artifact `meshtune.artifacts.find` reads,
    frozen, on the GPU when there is one; `tokenizer` overrides the one the artifact names.

    Raises:
        ConfigError: naming `key` (or --tokenizer) for a missing or unreadable model, or a tokenizer larger
            than the model's vocabulary.
    """
    from meshtune.artifacts import find, load_model
    from meshtune.data import build_tokenizer

    art = find(spec, key=key)
    tok = build_tokenizer(tokenizer or art.tokenizer)
    if tok.vocab_size > art.vocab_size:
        where = "--tokenizer" if tokenizer else key
        raise ConfigError(f"{where}: the tokenizer has {tok.vocab_size} tokens but the model's vocabulary only "
                          f"{art.vocab_size}; give the tokenizer the model was trained with")
    device = torch.device("cuda" if torch.cuda.is_available() and art.kind != "quantized" else "cpu")
    return load_model(art, device, key=key), tok, art


@dataclass
class Completion:
    """One generated continuation: its text, why it ended (`stop` or `length`) and token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def chat_template_of(art, tokenizer, override: str | None = None):
    """The chat template to render conversations for `art` with: `override` (a file or the text), else the run's
    `data.chat_template`, else the tokenizer folder's own; None when there is none."""
    from meshtune.config import read_yaml
    from meshtune.data.chat import ChatTemplate, load_template

    spec = override
    config = art.run_dir / "config.yaml" if art.run_dir is not None else None
    if not spec and config is not None and config.is_file():
        spec = (read_yaml(config).get("data") or {}).get("chat_template")
    if spec:
        text, source = load_template(spec)
    elif tokenizer.chat_template:
        text, source = tokenizer.chat_template, f"the tokenizer {getattr(tokenizer, 'path', '')}"
    else:
        return None
    return ChatTemplate(text, tokenizer.special_tokens, source)


def chat_prompt(tokenizer, template, messages: list[dict]) -> list[int]:
    """Token ids of a conversation rendered with the assistant's turn opened (`add_generation_prompt`)."""
    return tokenizer.encode_offsets(template.render(messages, add_generation_prompt=True))[0]


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str | list[int]], max_tokens: int = 16,
             temperature: float = 0.0, stop: list[str] | tuple[str, ...] = (), seed: int | None = None
             ) -> list[Completion]:
    """Continue each prompt by up to `max_tokens` tokens. A text prompt is encoded as in training (`bos` +
    text); a list of ids (e.g. `chat_prompt`) is used as it is.

    All prompts run as one right-padded batch: a causal decoder's logits at a position never see later
    positions, so padding on the right changes nothing. temperature 0 = greedy (argmax), else sampling from
    softmax(logits / temperature) (seeded by `seed`). A sequence ends at one of the tokenizer's stop tokens
    (EOS, and the end-of-turn tokens of generation_config.json), at a `stop` string (cut before it), after
    `max_tokens` or at model.max_seq_len.

    Raises:
        ValueError: a prompt longer than the model's context, or an empty one.
    """
    device = next(model.parameters()).device
    limit = model.cfg.max_seq_len
    seqs = [list(p) if isinstance(p, list) else [*tokenizer.bos, *tokenizer.encode(p)] for p in prompts]
    stops = set(tokenizer.stop_ids)
    for p, s in zip(prompts, seqs, strict=True):
        shown = tokenizer.decode(p) if isinstance(p, list) else p
        if len(s) >= limit:
            raise ValueError(f"prompt {shown[:40]!r} has {len(s)} tokens: no room left in the model's {limit}-token "
                             "context")
        if not s:
            raise ValueError("a prompt is empty and this tokenizer adds no BOS: give it some text")
    n_prompt = [len(s) for s in seqs]
    done: list[Completion | None] = [None] * len(prompts)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for _ in range(max_tokens):
        active = [i for i, d in enumerate(done) if d is None]
        if not active:
            break
        width = max(len(seqs[i]) for i in active)
        x = torch.full((len(active), width), tokenizer.pad_id, dtype=torch.long)
        for row, i in enumerate(active):
            x[row, : len(seqs[i])] = torch.tensor(seqs[i])
        logits = model(x.to(device))
        last = logits[torch.arange(len(active)), torch.tensor([len(seqs[i]) - 1 for i in active])].float().cpu()
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=gen).squeeze(1)
        else:
            nxt = last.argmax(-1)
        for row, i in enumerate(active):
            tok = int(nxt[row])
            if tok in stops:
                done[i] = _finish(tokenizer, seqs[i], n_prompt[i], "stop", stop)
                continue
            seqs[i].append(tok)
            text = tokenizer.decode(seqs[i][n_prompt[i]:])
            if any(s and s in text for s in stop):
                done[i] = _finish(tokenizer, seqs[i], n_prompt[i], "stop", stop)
            elif len(seqs[i]) >= limit:
                done[i] = _finish(tokenizer, seqs[i], n_prompt[i], "length", stop)
    return [d or _finish(tokenizer, seqs[i], n_prompt[i], "length", stop) for i, d in enumerate(done)]


def _finish(tokenizer, seq: list[int], n_prompt: int, reason: str, stop) -> Completion:
    text = tokenizer.decode(seq[n_prompt:])
    cuts = [text.find(s) for s in stop if s and s in text]
    if cuts:
        text, reason = text[: min(cuts)], "stop"
    return Completion(text, reason, n_prompt, len(seq) - n_prompt)
