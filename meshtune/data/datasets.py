"""Datasets of fixed-length token rows (padded or packed), and the exact-match metric for the synthetic tasks.

    tok = build_tokenizer("byte")
    train_ds, eval_ds = build_datasets(cfg.data, tok, seed=cfg.train.seed)
    batch = collate([train_ds[i] for i in indices])   # input_ids, labels: (B, T) int64

Every item has `input_ids` and `labels` (and, packed, `positions`) of exactly `data.seq_len` tokens;
`labels[t]` is the token that should follow `input_ids[:t+1]`, or -100 where no loss is taken (prompt tokens,
padding). Because the labels already carry the mask, the loss is one `cross_entropy(ignore_index=-100)` and
the trainer can normalise by the global count of `labels != -100`.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

from meshtune.config import ConfigError, DataConfig
from meshtune.data.files import load_records, record_kind
from meshtune.data.tasks import CHAT, generate

IGNORE_INDEX = -100
"""Label value that `torch.nn.functional.cross_entropy` skips by default."""

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


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: example indices per row, each row's lengths summing to <= capacity.

    Longest first; each goes into the open row it fills most tightly (ties: the row opened first), else a new
    row. Deterministic, so every rank and every resume packs the same rows."""
    import bisect

    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, row = free.pop(k)
        else:
            space, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    return rows


class TokenRows:
    """Training rows of `seq_len` tokens: `input_ids`, `labels` and, when packed, `positions`.

    Unpacked, each example is one row padded to `seq_len`. Packed (`data.packing`), examples share rows
    (best-fit), and `positions` restart at 0 at each example, which is also what tells the model where an
    example starts: attention never crosses one (`models.decoder.document_mask`). Padding is its own
    segment with labels -100.

    Args:
        examples: `(input_ids, labels)` pairs, each at most `seq_len` long.
        seq_len: Tokens per row.
        pad_id: Input id of padding.
        packing: Pack rows best-fit.
        records: The source records, kept for evaluation and tests (`examples` attribute).
    """

    def __init__(self, examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int, packing: bool = False,
                 records: list | None = None):
        self.examples = records if records is not None else []
        groups = pack_best_fit([len(e[0]) for e in examples], seq_len) if packing else [[i] for i in
                                                                                          range(len(examples))]
        self.groups = groups  # example indices of each row, in order
        n = len(groups)
        self.input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
        self.labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
        self.positions = torch.zeros((n, seq_len), dtype=torch.long) if packing else None
        for r, group in enumerate(groups):
            at = 0
            for i in group:
                inp, lab = examples[i]
                self.input_ids[r, at:at + len(inp)] = torch.tensor(inp, dtype=torch.long)
                self.labels[r, at:at + len(lab)] = torch.tensor(lab, dtype=torch.long)
                if packing:
                    self.positions[r, at:at + len(inp)] = torch.arange(len(inp))
                at += len(inp)
            if packing and at < seq_len:
                self.positions[r, at:] = torch.arange(seq_len - at)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {"input_ids": self.input_ids[i], "labels": self.labels[i]}
        if self.positions is not None:
            item["positions"] = self.positions[i]
        return item


class SFTDataset(TokenRows):
    """Prompt/response pairs, with the loss on the response and EOS only.

    Args:
        examples: Dicts with `prompt` and `response` strings.
        tokenizer: Any tokenizer from `build_tokenizer`.
        seq_len: Tokens per sequence (`data.seq_len`).
        packing: Pack examples into shared rows (`data.packing`).

    Attributes:
        num_truncated: Examples whose EOS did not fit in `seq_len`; the trainer may warn about them.
    """

    def __init__(self, examples: list[dict[str, str]], tokenizer, seq_len: int, packing: bool = False):
        pairs = [shift(*sft_tokens(e["prompt"], e["response"], tokenizer), seq_len) for e in examples]
        self.num_truncated = sum(tokenizer.eos_id not in p[1] for p in pairs)
        super().__init__(pairs, seq_len, tokenizer.pad_id, packing, examples)


class ChatDataset(TokenRows):
    """Conversations rendered with the chat template, the loss on the tokens `data.train_on` names.

    Args:
        conversations: Dicts with `messages` (OpenAI roles), as `load_records` returns them.
        tokenizer: Any tokenizer from `build_tokenizer`.
        template: The chat template (`chat.ChatTemplate`).
        seq_len: Tokens per sequence; longer conversations are cut at the end.
        train_on: `assistant`, `last` or `all`.
        packing: Pack conversations into shared rows.
        key: The config key of the file, for errors.

    Raises:
        ConfigError: naming the conversation (its number in the file) the template refuses or cannot mask.
    """

    def __init__(self, conversations: list[dict], tokenizer, template, seq_len: int, train_on: str = "assistant",
                 packing: bool = False, key: str = "data.train_path"):
        from meshtune.data.chat import ChatError, encode_chat

        pairs = []
        self.num_truncated = 0
        for n, record in enumerate(conversations, start=1):
            try:
                ids, target = encode_chat(record["messages"], tokenizer, template, train_on)
            except ChatError as e:
                raise ConfigError(f"{key}: conversation {n}: {e}") from e
            self.num_truncated += len(ids) > seq_len + 1
            pairs.append(shift(ids, target, seq_len))
        super().__init__(pairs, seq_len, tokenizer.pad_id, packing, conversations)


class PackedDataset(TokenRows):
    """Text for language modelling; every real token is a label.

    Unpacked (the default), the documents are one stream with EOS separators, cut into rows: chunk i covers
    tokens `[i*seq_len, (i+1)*seq_len]` (seq_len + 1 tokens, sharing one token with the next chunk) so that
    every token except the first is predicted exactly once, and a short final chunk is padded rather than
    dropped. With `packing`, each document (`bos + text + eos`, cut into pieces of seq_len + 1) is an example
    of its own, packed best-fit, and attention stays within it.

    Args:
        texts: The documents.
        tokenizer: Any tokenizer from `build_tokenizer`.
        seq_len: Tokens per sequence (`data.seq_len`).
        packing: One example per document (piece), packed without cross-document attention.
    """

    def __init__(self, texts: list[str], tokenizer, seq_len: int, packing: bool = False):
        if packing:
            pairs = []
            for text in texts:
                doc = tokenizer.bos + tokenizer.encode(text) + [tokenizer.eos_id]
                for start in range(0, max(len(doc) - 1, 1), seq_len):
                    piece = doc[start:start + seq_len + 1]
                    pairs.append(shift(piece, [True] * len(piece), seq_len))
            super().__init__(pairs, seq_len, tokenizer.pad_id, True)
            return
        stream: list[int] = []
        for text in texts:
            stream += tokenizer.encode(text) + [tokenizer.eos_id]
        chunks = [stream[s:s + seq_len + 1] for s in range(0, max(len(stream) - 1, 0), seq_len)]
        pairs = [shift(c, [True] * len(c), seq_len) for c in chunks]
        super().__init__(pairs, seq_len, tokenizer.pad_id)

    def split_tail(self, n: int) -> tuple[TokenRows, TokenRows]:
        """Splits off the last `n` rows (a held-out evaluation split); returns `(head, tail)`."""
        head, tail = object.__new__(TokenRows), object.__new__(TokenRows)
        cut = len(self) - n
        for part, rows in ((head, slice(None, cut)), (tail, slice(cut, None))):
            part.examples, part.groups = [], self.groups[rows]
            part.input_ids, part.labels = self.input_ids[rows], self.labels[rows]
            part.positions = self.positions[rows] if self.positions is not None else None
        return head, tail


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stacks dataset items into a batch: `input_ids` and `labels` (and packed rows' `positions`), each (B, T)."""
    return {key: torch.stack([item[key] for item in items]) for key in ("input_ids", "labels", "positions")
            if key in items[0]}


def model_args(batch: dict[str, Tensor], device: torch.device) -> tuple[Tensor, ...]:
    """The model's forward arguments for a batch, on `device`: `(input_ids,)`, or `(input_ids, positions)` for packed
    rows."""
    keys = ("input_ids", "positions") if "positions" in batch else ("input_ids",)
    return tuple(batch[k].to(device, non_blocking=True) for k in keys)


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


def _dataset(records: list[dict], cfg: DataConfig, tokenizer, key: str, train: bool) -> TokenRows:
    packing = cfg.packing and train  # evaluation scores whole examples one per row (exact match)
    kind = record_kind(records)
    if kind == "chat":
        return ChatDataset(records, tokenizer, chat_template(cfg, tokenizer), cfg.seq_len, cfg.train_on, packing, key)
    if kind == "sft":
        return SFTDataset(records, tokenizer, cfg.seq_len, packing)
    return PackedDataset([r["text"] for r in records], tokenizer, cfg.seq_len, packing)


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


def build_datasets(
    cfg: DataConfig, tokenizer, seed: int
) -> tuple[TokenRows, TokenRows]:
    """Builds the training and evaluation datasets named by the `data` config section.

    Args:
        cfg: The `data` section; exactly one of `task` and `train_path` must be set.
        tokenizer: Any tokenizer from `build_tokenizer`.
        seed: Seeds synthetic task generation (`train.seed`).

    Returns:
        `(train_ds, eval_ds)`.

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
    if cfg.task == CHAT:
        train, eval_examples = _task_splits(cfg, seed)
        return _dataset(train, cfg, tokenizer, "data.task", True), _dataset(eval_examples, cfg, tokenizer,
                                                                          "data.task", False)
    if cfg.task:
        train, eval_examples = _task_splits(cfg, seed)
        return (SFTDataset(train, tokenizer, cfg.seq_len, cfg.packing),
                SFTDataset(eval_examples, tokenizer, cfg.seq_len))

    train_records = load_records(cfg.train_path, "data.train_path")
    if cfg.eval_path:
        eval_records = load_records(cfg.eval_path, "data.eval_path")
        return (_dataset(train_records, cfg, tokenizer, "data.train_path", True),
                _dataset(eval_records, cfg, tokenizer, "data.eval_path", False))

    if record_kind(train_records) != "text":
        n = len(train_records)
        if n <= cfg.num_eval:
            raise ConfigError(
                f"data.train_path: {cfg.train_path} has {n} examples, too few to hold out data.num_eval="
                f"{cfg.num_eval}; lower data.num_eval or give data.eval_path"
            )
        return (_dataset(train_records[: n - cfg.num_eval], cfg, tokenizer, "data.train_path", True),
                _dataset(train_records[n - cfg.num_eval:], cfg, tokenizer, "data.train_path", False))
    packed = _dataset(train_records, cfg, tokenizer, "data.train_path", True)
    if len(packed) <= cfg.num_eval:
        raise ConfigError(
            f"data.train_path: {cfg.train_path} packs into {len(packed)} sequences of data.seq_len="
            f"{cfg.seq_len}, too few to hold out data.num_eval={cfg.num_eval}; lower data.num_eval or "
            "give data.eval_path"
        )
    return packed.split_tail(cfg.num_eval)


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
