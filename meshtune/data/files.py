"""Reading training and evaluation files: JSONL records or plain text, validated line by line.

    records = load_jsonl("data/train.jsonl")             # [{"prompt": ..., "response": ...}, ...]
    records = load_records("notes.txt", "data.eval_path")  # [{"text": <the whole file>}]

A JSONL file holds one JSON object per line, all of one kind: conversations (OpenAI `{"messages": [{"role",
"content"}, ...]}` or ShareGPT `{"conversations": [{"from", "value"}, ...]}`, rendered with the chat template),
`{"prompt": str, "response": str}` (supervised fine-tuning: the loss covers the response only) or `{"text": str}`
(language modelling). Parquet files and datasets saved with `save_to_disk` hold the same fields as columns.
Other keys are ignored. Every mistake raises `ConfigError` naming the config key, the file, the line number
and the fix, because a traceback from deep inside `json` tells a user nothing about which line to edit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from meshtune.config import ConfigError
from meshtune.data.chat import ROLES


def _read_text(path: str | Path, key: str) -> str:
    p = Path(path)
    if not p.is_file():
        what = "a directory, not a file" if p.is_dir() else "no such file"
        raise ConfigError(f"{key}: {path}: {what}; give the path of a .jsonl or .txt file")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{key}: {path} line {line}: not valid UTF-8; re-save the file as UTF-8") from e
    if not text.strip():
        raise ConfigError(f"{key}: {path} is empty; give a file with at least one example")
    return text


# ShareGPT's speaker names -> OpenAI roles
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "model": "assistant", "system": "system", "tool": "tool"}
KINDS = {"sft": "prompt/response pairs", "text": "text", "chat": "conversations"}


def _messages(turns: Any, form: str) -> list[dict[str, str]] | str:
    """A conversation as OpenAI messages, or a description of what is wrong with it."""
    if not isinstance(turns, list) or not turns:
        return f'"{form}" must be a non-empty list of turns'
    role_key, text_key = ("role", "content") if form == "messages" else ("from", "value")
    out = []
    for n, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or role_key not in turn:
            return f'turn {n} of "{form}" needs a "{role_key}" field'
        role = turn[role_key]
        role = role if form == "messages" else _SHAREGPT_ROLES.get(role, role)
        if role not in ROLES:
            known = ", ".join(ROLES if form == "messages" else _SHAREGPT_ROLES)
            return f'turn {n} has unknown {role_key} {role!r}; use one of {known}'
        text = turn.get(text_key)
        if not isinstance(text, str):
            return f'turn {n} "{text_key}" must be a string, got {type(text).__name__}'
        out.append({"role": role, "content": text})
    if not any(m["role"] == "assistant" for m in out):
        return "the conversation has no assistant turn, so nothing would be learned from it"
    return out


def _record(record: Any) -> tuple[str, dict] | str:
    """(kind, normalised record) for a valid record, else a description of what is wrong."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for form in ("messages", "conversations"):
        if form in record:
            msgs = _messages(record[form], form)
            return msgs if isinstance(msgs, str) else ("chat", {"messages": msgs})
    if "prompt" in record and "response" in record:
        fields = ("prompt", "response")
    elif "text" in record:
        fields = ("text",)
    else:
        return 'needs "messages" (or ShareGPT "conversations"), both "prompt" and "response", or "text"'
    for name in fields:
        if not isinstance(record[name], str):
            return f'"{name}" must be a string, got {type(record[name]).__name__}'
    return ("sft" if len(fields) == 2 else "text"), {name: record[name] for name in fields}


def _uniform(rows, path, key: str, unit: str) -> Iterator[dict]:
    """Validates (number, record) pairs as they stream: all of one kind; the first bad one is named by its line or
    row."""
    first = None
    for n, raw in rows:
        where = f"{key}: {path} {unit} {n}"
        got = _record(raw)
        if isinstance(got, str):
            raise ConfigError(f"{where}: {got}; fix or remove that {unit}")
        kind, record = got
        if first is None:
            first = (kind, n)
        elif kind != first[0]:
            raise ConfigError(f"{where}: {KINDS[kind]}, but {unit} {first[1]} is {KINDS[first[0]]}; use one kind "
                              "per file")
        yield record
    if first is None:
        raise ConfigError(f"{key}: {path} is empty; give a file with at least one example")


def iter_jsonl(path: str | Path, key: str = "data.train_path") -> Iterator[dict]:
    """The records of a JSONL file as they are read (a line at a time, so memory does not grow with the file),
    validated as `load_jsonl` describes."""
    p = Path(path)
    if not p.is_file():
        what = "a directory, not a file" if p.is_dir() else "no such file"
        raise ConfigError(f"{key}: {path}: {what}; give the path of a .jsonl, .txt or .parquet file")

    def rows():
        with p.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ConfigError(f"{key}: {path} line {lineno}: not valid UTF-8; re-save the file as UTF-8") from e
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    hint = "" if p.suffix in (".jsonl", ".json") else " (plain-text files must end in .txt)"
                    raise ConfigError(f"{key}: {path} line {lineno}: invalid JSON ({e.msg}){hint}; fix or remove "
                                      "that line") from e

    yield from _uniform(rows(), path, key, "line")


def load_jsonl(path: str | Path, key: str = "data.train_path") -> list[dict]:
    """Loads and validates a JSONL file of conversations, prompt/response pairs or text records.

    Blank lines are skipped. All records must be of one kind. Conversations are OpenAI `messages`
    (`role`/`content`) or ShareGPT `conversations` (`from`/`value`), both returned as `{"messages": [...]}`.

    Args:
        path: The file.
        key: The config key that named the file, used in error messages.

    Returns:
        The records, each reduced to its `messages`, `prompt`/`response` or `text` fields.

    Raises:
        ConfigError: The file is missing or empty, or a line is malformed; the message gives the line.
    """
    return list(iter_jsonl(path, key))


def _columns_error(key: str, path, columns) -> ConfigError:
    return ConfigError(f"{key}: {path} has columns {', '.join(columns) or '(none)'}; it needs messages (or "
                       "conversations), prompt and response, or text")


def iter_parquet(path: str | Path, key: str = "data.train_path") -> Iterator[dict]:
    """The records of a Parquet file, or a folder of them, in batches of rows (needs pyarrow); the columns are the
    fields of one JSONL record kind."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ConfigError(f"{key}: {path} is Parquet, which needs pyarrow; pip install 'meshtune[data]'") from e
    files = sorted(Path(path).glob("*.parquet")) if Path(path).is_dir() else [Path(path)]
    for file in files:
        try:
            table = pq.ParquetFile(file)
        except Exception as e:  # pyarrow's ArrowInvalid and OSError
            raise ConfigError(f"{key}: {file} is not a readable Parquet file ({e}); re-save it") from e
        columns = table.schema_arrow.names
        if not {"messages", "conversations", "text"} & set(columns) and not {"prompt", "response"} <= set(columns):
            raise _columns_error(key, file, columns)

        def rows(table=table):
            n = 0
            for batch in table.iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    n += 1
                    yield n, row

        yield from _uniform(rows(), file, key, "row")


def load_parquet(path: str | Path, key: str = "data.train_path") -> list[dict]:
    """Loads a Parquet file, or a folder of them, with the columns of one JSONL record kind (needs pyarrow)."""
    return list(iter_parquet(path, key))


def load_saved_dataset(path: str | Path, key: str = "data.train_path") -> list[dict]:
    """Loads a dataset saved by `datasets.Dataset.save_to_disk` (a DatasetDict's `train` split); needs `datasets`."""
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(f"{key}: {path} was saved by the datasets library, which is not installed; "
                          "pip install 'meshtune[data]'") from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise ConfigError(f"{key}: {path} holds the splits {', '.join(ds)}; give the folder of one split")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if not {"messages", "conversations", "text"} & set(ds.column_names) and not {
            "prompt", "response"} <= set(ds.column_names):
        raise _columns_error(key, path, ds.column_names)
    return list(_uniform(enumerate(ds, start=1), path, key, "row"))


def iter_records(path: str | Path, key: str = "data.train_path") -> Iterator[dict]:
    """The records of a data file as they are read: `.txt` is one text record, `.parquet` (or a folder of them) and
    a folder saved by `datasets` are tables, anything else is JSONL. Memory does not grow with a JSONL or Parquet
    file's size.

    Raises:
        ConfigError: As `load_jsonl`, naming the line or row, when the bad record is reached.
    """
    p = Path(path)
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
            yield from load_saved_dataset(p, key)
        elif any(p.glob("*.parquet")):
            yield from iter_parquet(p, key)
        else:
            raise ConfigError(f"{key}: {path} is a folder with no Parquet files and no saved dataset; give a .jsonl, "
                              ".txt or .parquet file, or a folder saved by datasets' save_to_disk")
    elif p.suffix == ".txt":
        yield {"text": _read_text(path, key)}
    elif p.suffix == ".parquet":
        if not p.is_file():
            raise ConfigError(f"{key}: {path}: no such file; give the path of a .parquet file")
        yield from iter_parquet(p, key)
    else:
        yield from iter_jsonl(path, key)


def load_records(path: str | Path, key: str = "data.train_path") -> list[dict]:
    """Loads a data file (any form `iter_records` reads) as a list of records of one kind (`messages`,
    `prompt`/`response` or `text`).

    Raises:
        ConfigError: As `load_jsonl`, naming the line or row.
    """
    return list(iter_records(path, key))


def record_kind(records: list[dict]) -> str:
    """`chat`, `sft` or `text`: the kind of a uniform list of records (as `load_records` returns)."""
    first = records[0] if records else {}
    return "chat" if "messages" in first else "sft" if "prompt" in first else "text"


def is_sft(records: list[dict[str, str]]) -> bool:
    """Whether records are prompt/response pairs (True) or text (False); `load_jsonl` made them uniform."""
    return bool(records) and "prompt" in records[0]
