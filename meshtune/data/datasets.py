"""Datasets of fixed-length token sequences, and the exact-match metric for the synthetic tasks.

    tok = build_tokenizer("byte")
    train_ds, eval_ds = build_datasets(cfg.data, tok, seed=cfg.train.seed)
    batch = collate([train_ds[i] for i in indices])   # input_ids, labels: (B, T) int64

Every item has `input_ids` and `labels` of exactly `data.seq_len` tokens; `labels[t]` is the token that
should follow `input_ids[:t+1]`, or -100 where no loss is taken (prompt tokens, padding). Because the
labels already carry the mask, the loss is one `cross_entropy(ignore_index=-100)` and the trainer can
normalise by the global count of `labels != -100`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from meshtune.config import ConfigError, DataConfig
from meshtune.data.files import is_sft, load_records
from meshtune.data.tasks import generate

IGNORE_INDEX = -100
"""Label value that `torch.nn.functional.cross_entropy` skips by default."""

# Offset between the seeds of the training and evaluation splits of a synthetic task: any fixed value
# works, this one just makes it unlikely that a user's other seed lands on it.
_EVAL_SEED_OFFSET = 1_000_003


def encode_example(prompt: str, response: str, tokenizer, seq_len: int) -> tuple[list[int], list[int]]:
    """Encodes a prompt/response pair so that only the response and EOS are predicted.

    Tokens are `[bos] + enc(prompt) + enc(response) + [eos]`, truncated to `seq_len + 1`; inputs are
    `tokens[:-1]` and labels `tokens[1:]`, with labels that are prompt tokens set to -100, then both padded
    to `seq_len` (inputs with `pad_id`, labels with -100).

    Returns:
        `(input_ids, labels)`, each of length `seq_len`.
    """
    prompt_ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    tokens = (prompt_ids + tokenizer.encode(response) + [tokenizer.eos_id])[: seq_len + 1]
    input_ids, labels = tokens[:-1], tokens[1:]
    # labels[t] = tokens[t + 1]; it is a response token once t + 1 >= len(prompt_ids).
    n_masked = min(len(prompt_ids) - 1, len(labels))
    labels = [IGNORE_INDEX] * n_masked + labels[n_masked:]
    pad = seq_len - len(input_ids)
    return input_ids + [tokenizer.pad_id] * pad, labels + [IGNORE_INDEX] * pad


class SFTDataset:
    """Prompt/response pairs, one padded sequence each, with the loss on the response and EOS only.

    Args:
        examples: Dicts with `prompt` and `response` strings.
        tokenizer: Any tokenizer from `build_tokenizer`.
        seq_len: Tokens per sequence (`data.seq_len`).

    Attributes:
        num_truncated: Examples whose EOS did not fit in `seq_len`; the trainer may warn about them.
    """

    def __init__(self, examples: list[dict[str, str]], tokenizer, seq_len: int):
        self.examples = examples
        pairs = [encode_example(e["prompt"], e["response"], tokenizer, seq_len) for e in examples]
        # Encoded once up front: these datasets are small, and it makes __getitem__ free in the loop.
        self.input_ids = torch.tensor([p[0] for p in pairs], dtype=torch.long).view(len(pairs), seq_len)
        self.labels = torch.tensor([p[1] for p in pairs], dtype=torch.long).view(len(pairs), seq_len)
        self.num_truncated = sum(tokenizer.eos_id not in p[1] for p in pairs)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


class PackedDataset:
    """Text concatenated with EOS separators and cut into sequences; every real token is a label.

    Chunk i covers tokens `[i*seq_len, (i+1)*seq_len]` (seq_len + 1 tokens, sharing one token with the next
    chunk) so that every token except the first is predicted exactly once. A short final chunk is padded
    rather than dropped, so that a small text file still yields data.

    Args:
        texts: The documents.
        tokenizer: Any tokenizer from `build_tokenizer`.
        seq_len: Tokens per sequence (`data.seq_len`).
    """

    def __init__(self, texts: list[str], tokenizer, seq_len: int):
        stream: list[int] = []
        for text in texts:
            stream += tokenizer.encode(text) + [tokenizer.eos_id]
        rows_in, rows_lab = [], []
        for start in range(0, max(len(stream) - 1, 0), seq_len):
            chunk = stream[start : start + seq_len + 1]
            pad = seq_len + 1 - len(chunk)
            rows_in.append(chunk[:-1] + [tokenizer.pad_id] * pad)
            rows_lab.append(chunk[1:] + [IGNORE_INDEX] * pad)
        self.input_ids = torch.tensor(rows_in, dtype=torch.long).view(len(rows_in), seq_len)
        self.labels = torch.tensor(rows_lab, dtype=torch.long).view(len(rows_lab), seq_len)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    def split_tail(self, n: int) -> tuple[PackedDataset, PackedDataset]:
        """Splits off the last `n` sequences (a held-out evaluation split); returns `(head, tail)`."""
        head, tail = object.__new__(PackedDataset), object.__new__(PackedDataset)
        cut = len(self) - n
        head.input_ids, head.labels = self.input_ids[:cut], self.labels[:cut]
        tail.input_ids, tail.labels = self.input_ids[cut:], self.labels[cut:]
        return head, tail


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stacks dataset items into a batch: `input_ids` and `labels` of shape (B, T)."""
    return {key: torch.stack([item[key] for item in items]) for key in ("input_ids", "labels")}


def _dataset(records: list[dict[str, str]], tokenizer, seq_len: int) -> SFTDataset | PackedDataset:
    if is_sft(records):
        return SFTDataset(records, tokenizer, seq_len)
    return PackedDataset([r["text"] for r in records], tokenizer, seq_len)


def _task_splits(cfg: DataConfig, seed: int) -> tuple[list[dict], list[dict]]:
    train = generate(cfg.task, cfg.num_train, seed)
    seen = {e["prompt"] for e in train}
    # Oversample, then drop prompts already in train (and repeats), so eval measures generalisation.
    candidates = generate(cfg.task, 2 * cfg.num_eval + 16, seed + _EVAL_SEED_OFFSET)
    eval_examples = []
    for e in candidates:
        if len(eval_examples) == cfg.num_eval:
            break
        if e["prompt"] not in seen:
            seen.add(e["prompt"])
            eval_examples.append(e)
    return train, eval_examples


def build_datasets(
    cfg: DataConfig, tokenizer, seed: int
) -> tuple[SFTDataset | PackedDataset, SFTDataset | PackedDataset]:
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
    if cfg.task:
        train, eval_examples = _task_splits(cfg, seed)
        return SFTDataset(train, tokenizer, cfg.seq_len), SFTDataset(eval_examples, tokenizer, cfg.seq_len)

    train_records = load_records(cfg.train_path, "data.train_path")
    if cfg.eval_path:
        eval_records = load_records(cfg.eval_path, "data.eval_path")
        return _dataset(train_records, tokenizer, cfg.seq_len), _dataset(eval_records, tokenizer, cfg.seq_len)

    if is_sft(train_records):
        n = len(train_records)
        if n <= cfg.num_eval:
            raise ConfigError(
                f"data.train_path: {cfg.train_path} has {n} examples, too few to hold out data.num_eval="
                f"{cfg.num_eval}; lower data.num_eval or give data.eval_path"
            )
        return (
            SFTDataset(train_records[: n - cfg.num_eval], tokenizer, cfg.seq_len),
            SFTDataset(train_records[n - cfg.num_eval :], tokenizer, cfg.seq_len),
        )
    packed = _dataset(train_records, tokenizer, cfg.seq_len)
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
