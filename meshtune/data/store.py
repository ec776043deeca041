"""Tokenized examples as flat int32 arrays, in memory or read from a token cache shared by runs.

    store = TokenStore.build(pairs)                       # (input_ids, labels) lists -> arrays in memory
    store = cached(cache_dir, key, lambda: pairs)         # tokenized once; later runs read the files
    inp, lab = store.example(3)                           # numpy arrays

An example is its shifted `(input_ids, labels)` pair, already cut to `data.seq_len`. The arrays hold every
example's tokens end to end (`tokens`, `labels`) and where each starts (`offsets`, n + 1 entries). A cached store
is read with `os.pread` where a row needs it, never mapped or loaded whole, so a process's memory is the same
for a dataset of any size. A cache entry is a folder
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
_FILES = ("tokens.bin", "labels.bin", "offsets.npy")  # raw int32 (written as they stream in), raw int32, .npy


class FileArray:
    """A 1-D array in a .npy file read with `os.pread` where it is sliced: nothing is mapped, so a process's memory
    does not grow with the file or with how much of it was read (the OS page cache, shared by every rank on the
    node and not counted as theirs, keeps the hot parts)."""

    def __init__(self, path: Path, raw_dtype=None):
        """`path` is a .npy file, or raw values of `raw_dtype`."""
        if raw_dtype is not None:
            dtype, self._data_offset = raw_dtype, 0
            shape = (path.stat().st_size // np.dtype(raw_dtype).itemsize,)
        else:
            with path.open("rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
                self._data_offset = f.tell()
        self.dtype, self.path, self._raw = np.dtype(dtype), path, raw_dtype
        self._len = shape[0]
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return self[int(index):int(index) + 1][0]
        start, stop, step = index.indices(self._len)
        assert step == 1, "FileArray slices are contiguous"
        n = max(stop - start, 0)
        size = self.dtype.itemsize
        raw = os.pread(self._fd, n * size, self._data_offset + start * size) if n else b""
        return np.frombuffer(raw, self.dtype)

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None

    def __getstate__(self):  # a copy (another process) opens its own descriptor
        return {"path": self.path, "raw": self._raw}

    def __setstate__(self, state):
        self.__init__(state["path"], state["raw"])


class TokenStore:
    """Examples end to end: `tokens`/`labels` (int32) and `offsets` (int64, n + 1); numpy arrays in memory, or
    `FileArray`s of a cache entry."""

    def __init__(self, tokens, labels, offsets, path: Path | None = None):
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
        """A cached store, read where it is sliced (`FileArray`)."""
        tokens, labels, offsets = (path / name for name in _FILES)
        return cls(FileArray(tokens, np.int32), FileArray(labels, np.int32), FileArray(offsets), path=path)

    @staticmethod
    def write(pairs: Iterable[tuple[list[int], list[int]]], path: Path) -> int:
        """Streams `(input_ids, labels)` pairs into the files of a store at `path`, a chunk at a time (memory: the
        chunk and 8 bytes per example); returns the number of examples."""
        from array import array

        offsets = array("q", [0])
        with (path / _FILES[0]).open("wb") as ft, (path / _FILES[1]).open("wb") as fl:
            tokens, labels = array("i"), array("i")
            for inp, lab in pairs:
                tokens.extend(inp)
                labels.extend(lab)
                offsets.append(offsets[-1] + len(inp))
                if len(tokens) >= 1 << 20:
                    tokens.tofile(ft)
                    labels.tofile(fl)
                    tokens, labels = array("i"), array("i")
            tokens.tofile(ft)
            labels.tofile(fl)
        np.save(path / _FILES[2], np.frombuffer(offsets, np.int64))
        return len(offsets) - 1

    def save(self, path: Path) -> None:
        """Writes this store's arrays in the layout `open` reads."""
        self.write((self.example(i) for i in range(len(self))), path)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets))

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = (int(x) for x in self.offsets[i:i + 2])
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
            n = TokenStore.write(pairs(), tmp)
            (tmp / "meta.json").write_text(json.dumps({"examples": n, **(info or {})}, default=str))
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
