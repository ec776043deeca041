"""Reading training and evaluation files: JSONL records or plain text, validated line by line.

    records = load_jsonl("data/train.jsonl")             # [{"prompt": ..., "response": ...}, ...]
    records = load_records("notes.txt", "data.eval_path")  # [{"text": <the whole file>}]

A JSONL file holds one JSON object per line, either all `{"prompt": str, "response": str}` (supervised
fine-tuning: the loss covers the response only) or all `{"text": str}` (language modelling on packed text).
Other keys are ignored. Every mistake raises `ConfigError` naming the config key, the file, the line number
and the fix, because a traceback from deep inside `json` tells a user nothing about which line to edit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from meshtune.config import ConfigError


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


def _kind(record: Any) -> str:
    """Returns `sft` or `text` for a valid record, else a description of what is wrong."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    if "prompt" in record and "response" in record:
        fields = ("prompt", "response")
    elif "text" in record:
        fields = ("text",)
    else:
        return 'needs both "prompt" and "response" fields, or a "text" field'
    for name in fields:
        if not isinstance(record[name], str):
            return f'"{name}" must be a string, got {type(record[name]).__name__}'
    return "sft" if len(fields) == 2 else "text"


def load_jsonl(path: str | Path, key: str = "data.train_path") -> list[dict[str, str]]:
    """Loads and validates a JSONL file of prompt/response or text records.

    Blank lines are skipped. All records must be of one kind, so a file is either fine-tuning pairs or
    text to pack.

    Args:
        path: The file.
        key: The config key that named the file, used in error messages.

    Returns:
        The records, each reduced to its `prompt`/`response` or `text` fields.

    Raises:
        ConfigError: The file is missing or empty, or a line is malformed; the message gives the line.
    """
    text = _read_text(path, key)
    records: list[dict[str, str]] = []
    first_kind = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{key}: {path} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            hint = "" if Path(path).suffix in (".jsonl", ".json") else " (plain-text files must end in .txt)"
            raise ConfigError(f"{where}: invalid JSON ({e.msg}){hint}; fix or remove that line") from e
        kind = _kind(record)
        if kind not in ("sft", "text"):
            raise ConfigError(f"{where}: {kind}; fix or remove that line")
        if first_kind is None:
            first_kind = (kind, lineno)
        elif kind != first_kind[0]:
            raise ConfigError(
                f"{where}: a {kind} record, but line {first_kind[1]} is a {first_kind[0]} record; "
                "use one kind per file (prompt/response pairs or text)"
            )
        fields = ("prompt", "response") if kind == "sft" else ("text",)
        records.append({name: record[name] for name in fields})
    return records


def load_records(path: str | Path, key: str = "data.train_path") -> list[dict[str, str]]:
    """Loads a data file: `.txt` files are one text record, anything else is read as JSONL.

    Args:
        path: The file.
        key: The config key that named the file, used in error messages.

    Returns:
        A list of records (`prompt`/`response` or `text`).

    Raises:
        ConfigError: As `load_jsonl`.
    """
    if Path(path).suffix == ".txt":
        return [{"text": _read_text(path, key)}]
    return load_jsonl(path, key)


def is_sft(records: list[dict[str, str]]) -> bool:
    """Whether records are prompt/response pairs (True) or text (False); `load_jsonl` made them uniform."""
    return bool(records) and "prompt" in records[0]
