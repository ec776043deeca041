"""Training rows of `data.seq_len` tokens made from a token store: one padded example each, or packed.

    rows = TokenRows(store, seq_len=2048, pad_id=0, packing=True)   # best-fit rows over store's examples
    batch = collate([rows[i] for i in idx])                        # input_ids, labels, positions: (B, T)
    logits = model(*model_args(batch, device))

Packed rows (`data.packing`) hold several examples; `positions` restart at 0 at each one, which is also what tells
the model where an example starts, so attention never crosses one (`models.decoder.document_mask`). Padding is
its own segment with labels -100. Rows are assembled when read, from the store's arrays (a cached store reads only those
examples from its files), so their memory does not grow with the dataset.
"""

from __future__ import annotations

import heapq
import os
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = -100
"""Label value that `torch.nn.functional.cross_entropy` skips by default."""


def pack_rows(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing bin packing of examples into rows of `capacity` tokens.

    Longest first; each goes into the open row it fills most tightly (ties: the row opened first), else a new row.
    A segment tree over free space finds that row in O(log capacity). Deterministic, so every rank and every resume
    packs the same rows.

    Returns:
        `(row_ptr, members)`: row r holds examples `members[row_ptr[r]:row_ptr[r + 1]]`, longest first.
    """
    from array import array

    size = 1
    while size < capacity + 1:
        size *= 2
    count = [0] * (2 * size)  # rows with each amount of free space, summed up the tree
    by_space: list[list[int]] = [[] for _ in range(capacity + 1)]  # heaps of row ids

    def add(space: int, delta: int) -> None:
        i = space + size
        while i:
            count[i] += delta
            i //= 2

    def tightest(n: int) -> int:  # the smallest free space >= n that some row has, or -1
        i = n + size
        if count[i]:
            return n
        while i > 1:
            if i % 2 == 0 and count[i + 1]:
                i += 1
                while i < size:
                    i = 2 * i if count[2 * i] else 2 * i + 1
                return i - size
            i //= 2
        return -1

    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), capacity)
    order = np.lexsort((np.arange(len(lengths)), -lengths))  # longest first, then by index
    row_of = array("q")  # the row of each example, in `order`
    rows = 0
    for chunk in np.array_split(order, max(1, len(order) // 65536)):  # python ints a chunk at a time
        for n in lengths[chunk].tolist():
            space = tightest(n)
            if space < 0:
                row, space = rows, capacity
                rows += 1
            else:
                row = heapq.heappop(by_space[space])
                add(space, -1)
            row_of.append(row)
            if space - n > 0:
                heapq.heappush(by_space[space - n], row)
                add(space - n, 1)
    row_of = np.frombuffer(row_of, np.int64) if len(row_of) else np.zeros(0, np.int64)
    members = order[np.argsort(row_of, kind="stable")]
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=rows))]).astype(np.int64)
    return row_ptr, members


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """`pack_rows` as lists: the example indices of each row."""
    row_ptr, members = pack_rows(np.asarray(lengths, dtype=np.int64), capacity)
    return [members[a:b].tolist() for a, b in zip(row_ptr[:-1], row_ptr[1:], strict=True)]


class TokenRows:
    """Rows of `seq_len` tokens over examples `start..stop` of a `TokenStore`.

    Args:
        store: The tokenized examples (`data.store.TokenStore`), each at most `seq_len` long.
        seq_len: Tokens per row.
        pad_id: Input id of padding.
        packing: Pack the examples best-fit; else one example per row.
        start, stop: The examples of the store these rows cover (a held-out split is a range).
        records: The source records, kept for small generated data (`examples` attribute).
    """

    def __init__(self, store, seq_len: int, pad_id: int, packing: bool = False, start: int = 0,
                 stop: int | None = None, records: list | None = None):
        self.store, self.seq_len, self.pad_id, self.packing = store, seq_len, pad_id, packing
        self.start, self.stop = start, len(store) if stop is None else stop
        self.examples = records if records is not None else []
        self.num_truncated = 0
        if packing:
            self._row_ptr, self._members = self._plan()
        self._rows = len(self._row_ptr) - 1 if packing else self.stop - self.start

    def _plan(self) -> tuple[np.ndarray, np.ndarray]:
        """The packing plan (`pack_rows`, as store indices); saved beside a cached store and read back next time."""
        from meshtune.data.store import FileArray

        path = getattr(self.store, "path", None)
        name = f"rows-{self.seq_len}-{self.start}-{self.stop}"
        files = [path / f"{name}-{part}.npy" for part in ("ptr", "members")] if path is not None else None
        if files is not None and all(f.is_file() for f in files):
            return FileArray(files[0]), FileArray(files[1])
        row_ptr, members = pack_rows(self.store.lengths[self.start:self.stop], self.seq_len)
        members = members + self.start
        for file, array in zip(files, (row_ptr, members), strict=True) if files else ():
            tmp = file.with_name(f".{file.stem}.{os.getpid()}.npy")
            try:
                np.save(tmp, array)
                os.replace(tmp, file)
            except OSError:  # a read-only cache: pack again next time
                tmp.unlink(missing_ok=True)
        return row_ptr, members

    def __len__(self) -> int:
        return self._rows

    def row_examples(self, r: int) -> np.ndarray:
        """Store indices of the examples in row `r`, in order."""
        if not self.packing:
            return np.array([self.start + r])
        a, b = (int(x) for x in self._row_ptr[r:r + 2])
        return self._members[a:b]

    @property
    def groups(self) -> list[list[int]]:
        """Example indices (from `start`) of each row, in order."""
        return [(self.row_examples(r) - self.start).tolist() for r in range(len(self))]

    def __getitem__(self, r: int) -> dict[str, Tensor]:
        if not 0 <= r < len(self):
            raise IndexError(r)
        inp = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        lab = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        pos = np.zeros(self.seq_len, dtype=np.int64) if self.packing else None
        at = 0
        for i in self.row_examples(r):
            t, lb = self.store.example(int(i))
            n = len(t)
            inp[at:at + n], lab[at:at + n] = t, lb
            if pos is not None:
                pos[at:at + n] = np.arange(n)
            at += n
        item = {"input_ids": torch.from_numpy(inp), "labels": torch.from_numpy(lab)}
        if pos is not None:
            pos[at:] = np.arange(self.seq_len - at)
            item["positions"] = torch.from_numpy(pos)
        return item

    def _stacked(self, key: str) -> Tensor:
        return torch.stack([self[r][key] for r in range(len(self))])

    @cached_property
    def input_ids(self) -> Tensor:
        """Every row's inputs (R, seq_len): for inspection and tests; training reads rows one at a time."""
        return self._stacked("input_ids")

    @cached_property
    def labels(self) -> Tensor:
        """Every row's labels (R, seq_len), -100 where no loss is taken."""
        return self._stacked("labels")

    @cached_property
    def positions(self) -> Tensor | None:
        """Every packed row's positions (R, seq_len); None when unpacked."""
        return self._stacked("positions") if self.packing else None


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stacks dataset items into a batch: `input_ids` and `labels` (and packed rows' `positions`), each (B, T)."""
    return {key: torch.stack([item[key] for item in items]) for key in ("input_ids", "labels", "positions")
            if key in items[0]}


def model_args(batch: dict[str, Tensor], device: torch.device) -> tuple[Tensor, ...]:
    """The model's forward arguments for a batch, on `device`: `(input_ids,)`, or `(input_ids, positions)` for packed
    rows."""
    keys = ("input_ids", "positions") if "positions" in batch else ("input_ids",)
    return tuple(batch[k].to(device, non_blocking=True) for k in keys)
