"""Tokenized examples as flat int32 arrays, in memory or memory-mapped from a token cache shared by runs.

    store = TokenStore.build(pairs)                       # (input_ids, labels) lists -> arrays in memory
    store = cached(cache_dir, key, lambda: pairs)         # tokenized once; later runs map the files
    inp, lab = store.example(3)                           # numpy views, no copy

An example is its shifted `(input_ids, labels)` pair, already cut to `data.seq_len`. The arrays hold every
example's tokens end to end (`tokens`, `labels`) and where each starts (`offsets`, n + 1 entries), so a dataset of
any size costs a process only the pages it reads, and 16 bytes per example of index. A cache entry is a folder
named by a hash of everything the tokens depend on (the data, the tokenizer files, the chat template, seq_len,
...), written under a temporary name and renamed into place, so a reader never sees half of one and two builders
never mix their files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

FORMAT = 1  # bump when the files or what goes into a key change
_FILES = ("tokens.npy", "labels.npy", "offsets.npy")


class TokenStore:
    """Examples end to end: `tokens`/`labels` (int32) and `offsets` (int64, n + 1)."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray, offsets: np.ndarray, path: Path | None = None):
        self.tokens, self.labels, self.offsets, self.path = tokens, labels, offsets, path

    @classmethod
    def build(cls, pairs: Iterable[tuple[list[int], list[int]]]) -> TokenStore:
        """Arrays in memory from `(input_ids, labels)` pairs (as int32 while they stream in)."""
        from array import array

        tokens, labels, offsets = array("i"), array("i"), array("q", [0])
        for inp, lab in pairs:
            tokens.extend(inp)
            labels.extend(lab)
            offsets.append(len(tokens))
        return cls(np.frombuffer(tokens, np.int32), np.frombuffer(labels, np.int32), np.frombuffer(offsets, np.int64))

    @classmethod
    def open(cls, path: Path) -> TokenStore:
        """A cached store, memory-mapped (read-only: pages are shared by every rank on the node)."""
        arrays = [np.load(path / name, mmap_mode="r") for name in _FILES]
        return cls(*arrays, path=path)

    def save(self, path: Path) -> None:
        for name, array in zip(_FILES, (self.tokens, self.labels, self.offsets), strict=True):
            np.save(path / name, array)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.labels[a:b]


def file_fingerprint(path: str | Path) -> dict:
    """What identifies a data file's contents cheaply: its resolved path, size, mtime and a hash of its first and
    last MiB (or of each file of a folder)."""
    p = Path(path).resolve()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    out = []
    for f in files:
        st = f.stat()
        h = hashlib.sha256()
        with f.open("rb") as fh:
            h.update(fh.read(2**20))
            if st.st_size > 2**20:
                fh.seek(max(st.st_size - 2**20, 2**20))
                h.update(fh.read())
        out.append([str(f), st.st_size, st.st_mtime_ns, h.hexdigest()])
    return {"files": out}


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's files (`byte` for the built-in one): any change re-tokenizes."""
    path = getattr(tokenizer, "path", None)
    if path is None:
        return "byte"
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "chat_template.jinja"):
        f = folder / name
        h.update(name.encode() + (f.read_bytes() if f.is_file() else b"-"))
    return h.hexdigest()


def cache_key(**parts) -> str:
    """The name of a cache entry: a hash of `parts` (JSON-serialisable) and the format version."""
    blob = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cached(cache_dir: str | Path, key: str, pairs: Callable[[], Iterable[tuple[list[int], list[int]]]],
           info: dict | None = None) -> TokenStore:
    """The store for `key` under `cache_dir`: mapped when it exists, else built from `pairs()`, written atomically
    (a temporary folder renamed into place; when another process got there first, its entry is kept) and mapped.
    `store.built` says whether this call tokenized."""
    root = Path(cache_dir)
    final = root / key
    built = False
    if not (final / "meta.json").is_file():
        new_root = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            store = TokenStore.build(pairs())
            store.save(tmp)
            (tmp / "meta.json").write_text(json.dumps({"examples": len(store), "tokens": int(store.offsets[-1]),
                                                       **(info or {})}, default=str))
            if final.exists():  # entries appear only by rename, complete: one without meta.json was damaged
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(tmp, final)
                built = True
            except OSError:  # another rank or run renamed its copy first: same key, same contents
                pass
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            if new_root and not any(root.iterdir()):  # a bad file leaves the run dir as it was
                root.rmdir()
    store = TokenStore.open(final)
    store.built = built
    return store
