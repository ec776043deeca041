"""Datasets of fixed-length token rows (padded or packed), built once into a token store, and exact match.

    tok = build_tokenizer("byte")
    train_ds, eval_ds = build_datasets(cfg.data, tok, seed=cfg.train.seed, cache_dir="runs/x/data_cache")
    batch = collate([train_ds[i] for i in indices])   # input_ids, labels (and packed: positions): (B, T)

Every item has `input_ids` and `labels` (and, packed, `positions`) of exactly `data.seq_len` tokens;
`labels[t]` is the token that should follow `input_ids[:t+1]`, or -100 where no loss is taken (prompt tokens,
padding). Because the labels already carry the mask, the loss is one `cross_entropy(ignore_index=-100)` and
the trainer can normalise by the global count of `labels != -100`.

Data files are read as a stream and tokenized once into a token store (`data.store`): with a cache dir, the
store is a cache entry (read where sliced, never loaded whole) keyed by the data, the tokenizer files, the chat
template and every setting the tokens depend on, so a resumed run, a later run of the same data and every rank
on a node read the same files and do not tokenize again. Bundled tasks are generated from the seed and kept in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from torch import Tensor

from meshtune.config import ConfigError, DataConfig
from meshtune.data.files import iter_records, record_kind
from meshtune.data.rows import IGNORE_INDEX, TokenRows, collate, model_args
from meshtune.data.store import TokenStore, cache_key, cached, file_fingerprint, tokenizer_fingerprint
from meshtune.data.tasks import CHAT, generate

__all__ = ["IGNORE_INDEX", "ChatDataset", "PackedDataset", "SFTDataset", "TokenRows", "build_datasets", "collate",
           "encode_example", "exact_match", "model_args"]

# Offset between the seeds of the training and evaluation splits of a synthetic task: any fixed value
# works, this one just makes it unlikely that a user's other seed lands on it.
_EVAL_SEED_OFFSET = 1_000_003


def encode_example(prompt: str, response: str, tokenizer, seq_len: int) -> tuple[list[int], list[int]]:
    """Encodes a prompt/response pair so that only the response and EOS are predicted.

    Tokens are `bos + enc(prompt) + enc(response) + [eos]` (`bos` is empty for tokenizers that add none),
    truncated to `seq_len + 1`; inputs are `tokens[:-1]` and labels `tokens[1:]`, with labels that are prompt
    tokens set to -100, then both padded to `seq_len` (inputs with `pad_id`, labels with -100).

    Returns:
        `(input_ids, labels)`, each of length `seq_len`.
    """
    input_ids, labels = shift(*sft_tokens(prompt, response, tokenizer), seq_len)
    pad = seq_len - len(input_ids)
    return input_ids + [tokenizer.pad_id] * pad, labels + [IGNORE_INDEX] * pad


def sft_tokens(prompt: str, response: str, tokenizer) -> tuple[list[int], list[bool]]:
    """A prompt/response pair's tokens and, per token, whether it is a target (the response and EOS)."""
    prompt_ids = tokenizer.bos + tokenizer.encode(prompt)
    response_ids = tokenizer.encode(response) + [tokenizer.eos_id]
    return prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids)


def shift(tokens: list[int], target: list[bool], seq_len: int) -> tuple[list[int], list[int]]:
    """Next-token pairs of at most `seq_len`: inputs `tokens[:-1]`, labels `tokens[1:]` (-100 where not a target)."""
    tokens, target = tokens[: seq_len + 1], target[: seq_len + 1]
    labels = [t if on else IGNORE_INDEX for t, on in zip(tokens[1:], target[1:], strict=True)]
    return tokens[:-1], labels


def _truncations(pairs, seq_len: int, counter: list[int]):
    """Passes pairs through, counting those cut at seq_len (their full length was longer)."""
    for full, pair in pairs:
        counter[0] += full > seq_len + 1
        yield pair


def sft_pairs(records, tokenizer, seq_len: int) -> Iterator[tuple[int, tuple[list[int], list[int]]]]:
    """(full token count, shifted pair) of each prompt/response record."""
    for r in records:
        tokens, target = sft_tokens(r["prompt"], r["response"], tokenizer)
        yield len(tokens), shift(tokens, target, seq_len)


def chat_pairs(records, tokenizer, template, seq_len: int, train_on: str, key: str):
    """(full token count, shifted pair) of each conversation, rendered and masked by the chat template."""
    from meshtune.data.chat import ChatError, encode_chat

    for n, record in enumerate(records, start=1):
        try:
            ids, target = encode_chat(record["messages"], tokenizer, template, train_on)
        except ChatError as e:
            raise ConfigError(f"{key}: conversation {n}: {e}") from e
        yield len(ids), shift(ids, target, seq_len)


def text_pairs(records, tokenizer, seq_len: int, packing: bool):
    """Text as rows. Unpacked: one stream with EOS separators, cut into chunks of seq_len + 1 tokens that share
    one token with the next (every token but the first is predicted once; a short last chunk is kept). Packed:
    each document (`bos + text + eos`) cut into pieces of its own."""
    if packing:
        for r in records:
            doc = tokenizer.bos + tokenizer.encode(r["text"]) + [tokenizer.eos_id]
            for start in range(0, max(len(doc) - 1, 1), seq_len):
                piece = doc[start:start + seq_len + 1]
                yield len(piece), shift(piece, [True] * len(piece), seq_len)
        return
    buf: list[int] = []
    for r in records:
        buf += tokenizer.encode(r["text"]) + [tokenizer.eos_id]
        while len(buf) > seq_len + 1:
            chunk, buf = buf[:seq_len + 1], buf[seq_len:]
            yield len(chunk), shift(chunk, [True] * len(chunk), seq_len)
    if len(buf) > 1:
        yield len(buf), shift(buf, [True] * len(buf), seq_len)


def _in_memory(pairs, seq_len: int) -> tuple[TokenStore, int]:
    counter = [0]
    return TokenStore.build(_truncations(pairs, seq_len, counter)), counter[0]


class SFTDataset(TokenRows):
    """Prompt/response pairs (in memory), with the loss on the response and EOS only.

    Attributes:
        num_truncated: Examples whose EOS did not fit in `seq_len`.
    """

    def __init__(self, examples: list[dict[str, str]], tokenizer, seq_len: int, packing: bool = False):
        store, cut = _in_memory(sft_pairs(examples, tokenizer, seq_len), seq_len)
        super().__init__(store, seq_len, tokenizer.pad_id, packing, records=examples)
        self.num_truncated = cut


class ChatDataset(TokenRows):
    """Conversations (in memory) rendered with the chat template, the loss on the tokens `train_on` names.

    Raises:
        ConfigError: naming the conversation (its number) the template refuses or cannot mask.
    """

    def __init__(self, conversations: list[dict], tokenizer, template, seq_len: int, train_on: str = "assistant",
                 packing: bool = False, key: str = "data.train_path"):
        store, cut = _in_memory(chat_pairs(conversations, tokenizer, template, seq_len, train_on, key), seq_len)
        super().__init__(store, seq_len, tokenizer.pad_id, packing, records=conversations)
        self.num_truncated = cut


class PackedDataset(TokenRows):
    """Text for language modelling (in memory); every real token is a label (see `text_pairs`)."""

    def __init__(self, texts: list[str], tokenizer, seq_len: int, packing: bool = False):
        store, _ = _in_memory(text_pairs([{"text": t} for t in texts], tokenizer, seq_len, packing), seq_len)
        super().__init__(store, seq_len, tokenizer.pad_id, packing)

    def split_tail(self, n: int) -> tuple[TokenRows, TokenRows]:
        """Splits off the last `n` examples, unpacked (a held-out evaluation split); returns `(head, tail)`."""
        cut = len(self.store) - n
        return (TokenRows(self.store, self.seq_len, self.pad_id, self.packing, 0, cut),
                TokenRows(self.store, self.seq_len, self.pad_id, False, cut))


def chat_template(cfg: DataConfig, tokenizer):
    """The chat template conversations are rendered with: `data.chat_template`, else the tokenizer folder's."""
    from meshtune.data.chat import ChatTemplate, load_template

    if cfg.chat_template:
        text, source = load_template(cfg.chat_template)
    elif tokenizer.chat_template:
        text, source = tokenizer.chat_template, f"data.tokenizer {getattr(tokenizer, 'path', '')}"
    else:
        what = f"data.train_path: {cfg.train_path} holds" if cfg.train_path else "data.task=chat makes"
        raise ConfigError(
            f"{what} conversations but data.tokenizer={cfg.tokenizer} has no chat "
            "template; set data.tokenizer to the model's HF folder (tokenizer_config.json chat_template or "
            "chat_template.jinja) or data.chat_template=FILE")
    return ChatTemplate(text, tokenizer.special_tokens, source)


def _pairs(kind: str, records, cfg: DataConfig, tokenizer, key: str, packing: bool, template=None):
    if kind == "chat":
        return chat_pairs(records, tokenizer, template or chat_template(cfg, tokenizer), cfg.seq_len, cfg.train_on,
                          key)
    if kind == "sft":
        return sft_pairs(records, tokenizer, cfg.seq_len)
    return text_pairs(records, tokenizer, cfg.seq_len, packing)


def file_store(path: str, key: str, cfg: DataConfig, tokenizer, cache_dir: str | None, packing: bool
               ) -> tuple[TokenStore, str]:
    """The tokenized examples of a data file and its record kind: streamed through the tokenizer once, into the
    token cache under `cache_dir` when given (later calls with the same inputs map it), else into memory."""
    kind = record_kind([next(iter(iter_records(path, key)))])  # the first record decides (and must be valid)
    template = chat_template(cfg, tokenizer) if kind == "chat" else None
    packing = packing and kind == "text"  # only text examples depend on packing

    def pairs():
        return _truncations(_pairs(kind, iter_records(path, key), cfg, tokenizer, key, packing, template),
                            cfg.seq_len, [0])

    if cache_dir is None:
        return TokenStore.build(pairs()), kind
    name = cache_key(data=file_fingerprint(path), tokenizer=tokenizer_fingerprint(tokenizer), kind=kind,
                     template=template.text if template else None, train_on=cfg.train_on if template else None,
                     seq_len=cfg.seq_len, packed_text=packing)
    return cached(cache_dir, name, pairs, info={"source": str(path), "kind": kind}), kind


def _task_splits(cfg: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    train = generate(cfg.task, cfg.num_train, seed)
    key = (lambda e: json.dumps(e["messages"])) if cfg.task == CHAT else (lambda e: e["prompt"])  # noqa: E731
    seen = {key(e) for e in train}
    # Oversample, then drop prompts already in train (and repeats), so eval measures generalisation.
    candidates = generate(cfg.task, 2 * cfg.num_eval + 16, seed + _EVAL_SEED_OFFSET)
    eval_examples = []
    for e in candidates:
        if len(eval_examples) == cfg.num_eval:
            break
        if key(e) not in seen:
            seen.add(key(e))
            eval_examples.append(e)
    return train, eval_examples


def build_datasets(cfg: DataConfig, tokenizer, seed: int, cache_dir: str | None = None
                   ) -> tuple[TokenRows, TokenRows]:
    """Builds the training and evaluation datasets named by the `data` config section.

    Args:
        cfg: The `data` section; exactly one of `task` and `train_path` must be set.
        tokenizer: Any tokenizer from `build_tokenizer`.
        seed: Seeds synthetic task generation (`train.seed`).
        cache_dir: The token cache for data files (`data.cache_dir`); None tokenizes into memory.

    Returns:
        `(train_ds, eval_ds)`; training rows are packed with `data.packing`, evaluation rows never are (exact match
        scores whole examples).

    Raises:
        ConfigError: Both or neither of `data.task`/`data.train_path` are set, a file is bad, or the
            training file is too small to hold out `data.num_eval` examples.
    """
    if cfg.seq_len < 1:
        raise ConfigError(f"data.seq_len: {cfg.seq_len}; use a positive number of tokens")
    if cfg.num_eval < 0:
        raise ConfigError(f"data.num_eval: {cfg.num_eval}; use a count >= 0")
    if bool(cfg.task) == bool(cfg.train_path):
        which = "both are set" if cfg.task else "neither is set"
        raise ConfigError(
            f"data.task / data.train_path: {which}; set exactly one "
            "(e.g. data.task='' data.train_path=train.jsonl, or data.task=reverse)"
        )
    pad = tokenizer.pad_id
    if cfg.task == CHAT:
        train, eval_examples = _task_splits(cfg, seed)
        template = chat_template(cfg, tokenizer)
        return (ChatDataset(train, tokenizer, template, cfg.seq_len, cfg.train_on, cfg.packing, "data.task"),
                ChatDataset(eval_examples, tokenizer, template, cfg.seq_len, cfg.train_on, False, "data.task"))
    if cfg.task:
        train, eval_examples = _task_splits(cfg, seed)
        return (SFTDataset(train, tokenizer, cfg.seq_len, cfg.packing),
                SFTDataset(eval_examples, tokenizer, cfg.seq_len))

    store, kind = file_store(cfg.train_path, "data.train_path", cfg, tokenizer, cache_dir, cfg.packing)
    if cfg.eval_path:
        eval_store, _ = file_store(cfg.eval_path, "data.eval_path", cfg, tokenizer, cache_dir, False)
        return TokenRows(store, cfg.seq_len, pad, cfg.packing), TokenRows(eval_store, cfg.seq_len, pad)
    n = len(store)
    if n <= cfg.num_eval:
        what = (f"packs into {n} sequences of data.seq_len={cfg.seq_len}" if kind == "text" else
                f"has {n} examples")
        raise ConfigError(f"data.train_path: {cfg.train_path} {what}, too few to hold out data.num_eval="
                          f"{cfg.num_eval}; lower data.num_eval or give data.eval_path")
    return (TokenRows(store, cfg.seq_len, pad, cfg.packing, 0, n - cfg.num_eval),
            TokenRows(store, cfg.seq_len, pad, False, n - cfg.num_eval))


def exact_match(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher-forced exact match: the argmax is right at every labelled position of a sequence.

    With greedy decoding this equals generating the whole answer and EOS, because each position's argmax
    is conditioned on a correct prefix either way.

    Args:
        logits: (B, T, V) predictions; `logits[:, t]` predicts `labels[:, t]`.
        labels: (B, T) target ids, -100 where nothing is scored.

    Returns:
        `(correct, evaluated)`, both (B,) bool. Rows with no label other than -100 are not evaluated and
        never correct; accuracy is `correct.sum() / evaluated.sum()` (all-reduce both sums across ranks).
    """
    scored = labels != IGNORE_INDEX  # (B, T)
    hit = (logits.argmax(dim=-1) == labels) | ~scored  # (B, T)
    evaluated = scored.any(dim=1)
    return hit.all(dim=1) & evaluated, evaluated
