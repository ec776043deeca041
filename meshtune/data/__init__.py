"""Data: tokenizers, bundled synthetic tasks, JSONL/text datasets and a layout-independent sampler.

    from meshtune.data import StepSampler, build_datasets, build_tokenizer, collate

    tok = build_tokenizer(cfg.data.tokenizer)
    train_ds, eval_ds = build_datasets(cfg.data, tok, seed=cfg.train.seed)
    sampler = StepSampler(len(train_ds), 32, 4, dp_rank, dp_size, seed=cfg.train.seed)
    for micro in sampler.next_step():
        batch = collate([train_ds[i] for i in micro])

Every item is `input_ids`/`labels` of `data.seq_len` tokens, labels -100 where no loss is taken, and with
`data.packing` also `positions` (restarting at 0 for each packed example).
"""

from meshtune.data.chat import ChatTemplate, encode_chat
from meshtune.data.datasets import (
    IGNORE_INDEX,
    ChatDataset,
    PackedDataset,
    SFTDataset,
    TokenRows,
    build_datasets,
    collate,
    encode_example,
    exact_match,
    model_args,
)
from meshtune.data.files import load_jsonl, load_records
from meshtune.data.sampler import StepSampler, eval_batches
from meshtune.data.tasks import TASKS, Task, generate, get_task
from meshtune.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "ChatDataset",
    "TASKS",
    "ByteTokenizer",
    "ChatTemplate",
    "HFTokenizer",
    "PackedDataset",
    "SFTDataset",
    "StepSampler",
    "TokenRows",
    "Task",
    "build_datasets",
    "build_tokenizer",
    "collate",
    "encode_chat",
    "encode_example",
    "eval_batches",
    "exact_match",
    "generate",
    "get_task",
    "load_jsonl",
    "load_records",
    "model_args",
]
