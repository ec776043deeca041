"""Reading checkpoints without running code in them: every pickle meshtune reads goes through an allow-list.

A pickle can name any importable callable and call it while it loads, so a checkpoint copied from elsewhere
could run code the moment it is opened. Three places in the formats meshtune reads are pickles:

- DCP's `.metadata` (the index of a checkpoint folder): read here by `RestrictedUnpickler`, which resolves
  only DCP's own metadata classes, `torch.Size`, torch dtypes and layouts, and `pathlib` paths;
- DCP's non-tensor values (optimizer hyperparameters such as `lr` and `betas`), which torch's
  `DefaultLoadPlanner` reads with `torch.load(weights_only=False)`: `SafeLoadPlanner` reads them with
  `weights_only=True`;
- torch files (`rng/rank*.pt`, FairScale's optimizer state, DeepSpeed's `*_states.pt`, `--format quantized`):
  `torch.load(weights_only=True)`, PyTorch's own allow-list, plus the three DeepSpeed classes its ZeRO files
  hold (`DEEPSPEED_GLOBALS`). DeepSpeed loads its files itself; `torch_loads_weights_only` makes every
  `torch.load` inside it weights-only too.

Anything else is refused with `UnsafeCheckpointError`, a one-line ConfigError naming the file.

    dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner())
    metadata = read_metadata(path)
    blob = load_torch_file(path / "rng" / "rank0.pt")
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from meshtune.config import ConfigError

# (module, name) pairs a DCP .metadata file may name; measured on checkpoints of every engine and recipe
_DCP_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
     ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
     ("pathlib", "PureWindowsPath")}
# what DeepSpeed's ZeRO checkpoint files hold besides tensors and containers
DEEPSPEED_GLOBALS = (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                     ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                     ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                     ("deepspeed.utils.tensor_fragment", "fragment_address"))
_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file would run code or build objects outside the allow-list when loaded."""


def _refusal(path: str | Path, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"{path}: refused to load: it holds {what}, not plain checkpoint data; meshtune "
                                 "never unpickles code, so use a checkpoint written by meshtune (or safetensors)")


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the classes a DCP `.metadata` file holds; anything else raises UnpicklingError."""

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                            torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name}")


def read_metadata(path: str | Path) -> Metadata:
    """The DCP `.metadata` of the checkpoint folder `path`, through `RestrictedUnpickler`.

    Raises:
        UnsafeCheckpointError: naming the file, when it names anything outside the allow-list.
        ConfigError: when it is missing or not a DCP metadata file.
    """
    file = Path(path) / ".metadata"
    if not file.is_file():
        raise ConfigError(f"{path}: no .metadata file; it is not a complete DCP checkpoint folder")
    try:
        with open(file, "rb") as f:
            metadata = RestrictedUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise _refusal(file, str(e) or "an object outside the allow-list") from None
    except Exception as e:  # truncated or not a pickle at all
        raise ConfigError(f"{file}: unreadable ({type(e).__name__}: {e}); the checkpoint is damaged") from None
    if not isinstance(metadata, Metadata):
        raise ConfigError(f"{file}: holds a {type(metadata).__name__}, not DCP metadata; the checkpoint is damaged")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file-system reader with `.metadata` read through `RestrictedUnpickler` (tensors were already
    read with `weights_only=True` by torch)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files: not written by meshtune
            raise ConfigError(f"{self.path}: per-rank DCP metadata is not supported; save with one .metadata")
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` reading DCP's non-tensor values with `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise _refusal(f"{read_item.dest_index.fqn} in the checkpoint", _short(e)) from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner uses

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _short(e: BaseException) -> str:
    """The name torch's weights-only unpickler refused, from its long message."""
    for line in str(e).splitlines():
        line = line.strip()
        if line.startswith(("Unsupported global", "Unsupported operand", "Trying to call reduce")):
            return line.split(" If you trust", 1)[0].split(". This", 1)[0]
    return "an object outside torch's weights-only allow-list"


def dcp_load(state: dict, path: str | Path, allow_partial: bool = False) -> None:
    """`torch.distributed.checkpoint.load` of `state` (in place) from the folder `path`, reading no pickle
    outside the allow-list."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # DCP warns on every load without a process group: one process is normal
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, storage_reader=SafeReader(str(path)),
                 planner=SafeLoadPlanner(allow_partial_load=allow_partial))


def _deepspeed_globals() -> list:
    import importlib

    from meshtune.quiet import quiet_deepspeed

    quiet_deepspeed()  # importing DeepSpeed logs its accelerator line

    found = []
    for module, name in DEEPSPEED_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass  # DeepSpeed absent or another version: its files then cannot name the class either
    return found


def load_torch_file(path: str | Path, map_location="cpu"):
    """`torch.load(path, weights_only=True)`; a file naming anything else is refused, naming the file.

    Raises:
        UnsafeCheckpointError: for a pickle outside the allow-list (code, arbitrary classes).
        ConfigError: for a file that is missing, truncated or not a torch file.
    """
    path = Path(path)

    def load(allowed: list):
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            # torch warns about a foreign pickle protocol just before it refuses the file: the refusal says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)

    try:
        try:
            return load([])
        except pickle.UnpicklingError as e:  # DeepSpeed's files name a few of its classes: import it only then
            if "deepspeed" not in str(e):
                raise
            return load(_deepspeed_globals())
    except pickle.UnpicklingError as e:
        with open(path, "rb") as f:
            head = f.read(4)
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # neither a torch zip nor a pickle
            raise ConfigError(f"{path}: not a torch file (or a damaged one); the checkpoint is damaged") from None
        raise _refusal(path, _short(e)) from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; the checkpoint is incomplete") from None
    except (RuntimeError, EOFError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ConfigError(f"{path}: unreadable torch file ({first}); the checkpoint is damaged") from None


@contextlib.contextmanager
def torch_loads_weights_only(folder: str | Path) -> Iterator[None]:
    """Every `torch.load` inside (DeepSpeed's own included) reads weights-only, with DeepSpeed's classes
    allowed. A refusal names the offending file under `folder`.

    Raises:
        UnsafeCheckpointError: naming the first file under `folder` that is not weights-only loadable.
    """
    old = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            yield
    except pickle.UnpicklingError:
        for file in sorted(Path(folder).rglob("*.pt")):  # the failure path only: find the file to name
            load_torch_file(file)
        raise _refusal(folder, "an object outside torch's weights-only allow-list") from None
    finally:
        if old is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = old


def safetensors_metadata(path: str | Path, key: str = "checkpoint") -> dict[str, str]:
    """The string metadata of a safetensors file (empty when it has none).

    Raises:
        ConfigError: naming `key` and the file, for an empty, truncated or corrupt file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise _damaged(path, key, e) from None


def load_safetensors(path: str | Path, key: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on CPU.

    Raises:
        ConfigError: naming `key` and the file, for an empty, truncated or corrupt file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _damaged(path, key, e) from None


def _damaged(path, key: str, e: BaseException) -> ConfigError:
    size = Path(path).stat().st_size if Path(path).is_file() else 0
    why = "it is empty" if size == 0 else (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return ConfigError(f"{key}: {path} is not a readable safetensors file ({why}); it is truncated or damaged, "
                       "write it again")
