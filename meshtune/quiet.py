"""Third-party messages that tell a meshtune user nothing, filtered where meshtune calls into those libraries.

Each filter matches one message from one logger or warning module; every other warning still prints:

- DeepSpeed's ZeRO calls `torch.distributed.all_gather_into_tensor` / `reduce_scatter_tensor`, which torch
  deprecates with a FutureWarning raised in `torch.distributed.c10d_logger`: ~4 copies per training step.
- importing DeepSpeed logs "Setting accelerator to CPU ..." on its "DeepSpeed" logger; meshtune already chose
  the CPU itself (`DistEnv`, by the same `torch.cuda` check).
- importing torchao logs "Failed to load .../_C_mxfp8...so" and ".../_C_cutlass_90a...so" on the "torchao"
  logger (CUDA kernels that none of meshtune's QAT / PTQ schemes calls), and torch logs on
  "torch.utils._pytree" that torchao registers its Enums (KernelPreference, ...) with register_constant().

- FSDP2 warns when a unit's forward returns a view (an in-place op on it would skip the unit's pre-backward
  hook). LoRA's fused forward returns a view of its GEMM output, so under parallel.fsdp_unit=linear every
  LoRA projection warns; the decoder never modifies a projection's output in place
  (tests/distributed/test_fsdp_units.py compares every gradient with block units', bitwise).

Filters live in the process (the warnings filter list, the named loggers), so every torchrun worker installs its
own when it builds the engine or first imports torchao. Installing twice adds nothing.
"""

from __future__ import annotations

import logging
import re
import warnings

DEPRECATED_COLLECTIVES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"


class DropRecord(logging.Filter):
    """A logger filter that drops the records `matches` accepts; `key` names it so it is added once."""

    def __init__(self, key: str, matches):
        super().__init__()
        self.key, self.matches = key, matches

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.matches(record)


def drop_records(logger_name: str, key: str, matches) -> None:
    logger = logging.getLogger(logger_name)  # the same object the library gets when it imports later
    if not any(getattr(f, "key", None) == key for f in logger.filters):
        logger.addFilter(DropRecord(key, matches))


def quiet_deepspeed() -> None:
    """Call before importing deepspeed (its accelerator line is logged at import)."""
    warnings.filterwarnings("ignore", message=DEPRECATED_COLLECTIVES, category=FutureWarning,
                            module=r"torch\.distributed\.c10d_logger$")
    drop_records("DeepSpeed", "meshtune.cpu-accelerator",
                 lambda r: r.module == "real_accelerator" and r.getMessage().startswith("Setting accelerator to CPU."))


def _torchao_enum(record: logging.LogRecord) -> bool:
    return (isinstance(record.msg, str) and record.msg.startswith("%s is an Enum subclass and is now natively")
            and bool(record.args) and getattr(record.args[0], "__module__", "").startswith("torchao."))


def quiet_torchao() -> None:
    """Call before the first torchao import of a code path (its messages come at import)."""
    cuda_kernels = re.compile(r"Failed to load \S*[/\\]_C_(mxfp8|cutlass)[^/\\\s]*\.so: ")
    drop_records("torchao", "meshtune.torchao-cuda-kernels", lambda r: bool(cuda_kernels.match(r.getMessage())))
    drop_records("torch.utils._pytree", "meshtune.torchao-enum-constants", _torchao_enum)


def quiet_fsdp_projection_views() -> None:
    """Call when FSDP2 shards projections on their own (runtime/fsdp_units.py)."""
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w*LoRALinear\) returned a view tensor",
                            category=UserWarning, module=r"torch\.distributed\.fsdp\._fully_shard\._fsdp_state$")
