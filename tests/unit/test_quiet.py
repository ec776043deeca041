"""meshtune.quiet: each filter drops its one third-party message and nothing next to it."""

from __future__ import annotations

import enum
import logging
import warnings

import pytest

from meshtune.quiet import quiet_deepspeed, quiet_torchao

LOGGERS = ("DeepSpeed", "torchao", "torch.utils._pytree")


@pytest.fixture
def logged():
    """Records reaching each of LOGGERS' handlers; the loggers' filters are restored afterwards."""
    saved = {name: list(logging.getLogger(name).filters) for name in LOGGERS}
    seen: list[tuple[str, str]] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append((record.name, record.getMessage()))

    handler = Keep()
    for name in LOGGERS:
        logging.getLogger(name).addHandler(handler)
    yield seen
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.removeHandler(handler)
        logger.filters[:] = saved[name]


def warn_from(module: str, message: str, category=FutureWarning) -> None:
    warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 83, module=module)


def test_deepspeed_filters_drop_only_the_deprecated_collectives_and_the_cpu_line(logged):
    c10d = "torch.distributed.c10d_logger"
    gather = ("`torch.distributed.all_gather_into_tensor` is deprecated. "
              "Please use `torch.distributed.all_gather_single` instead.")
    scatter = ("`torch.distributed.reduce_scatter_tensor` is deprecated. "
               "Please use `torch.distributed.reduce_scatter_single` instead.")
    with warnings.catch_warnings(record=True) as seen:  # restores the filter list on exit
        warnings.simplefilter("always")
        quiet_deepspeed()
        quiet_deepspeed()  # twice is once
        warn_from(c10d, gather)
        warn_from(c10d, scatter)
        warn_from(c10d, "`torch.distributed.all_reduce_coalesced` will be deprecated.")  # another message
        warn_from("meshtune.runtime.gloo_fsdp", gather)  # the same text from another module
        warn_from(c10d, gather, DeprecationWarning)  # another category
        warnings.warn("a real FutureWarning", FutureWarning, stacklevel=1)
    shown = [(str(w.message), w.category) for w in seen]
    assert shown == [("`torch.distributed.all_reduce_coalesced` will be deprecated.", FutureWarning),
                     (gather, FutureWarning), (gather, DeprecationWarning), ("a real FutureWarning", FutureWarning)]

    ds = logging.getLogger("DeepSpeed")
    assert sum(getattr(f, "key", None) == "meshtune.cpu-accelerator" for f in ds.filters) == 1
    cpu_line = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
    ds.handle(ds.makeRecord("DeepSpeed", logging.WARNING, "real_accelerator.py", 213, cpu_line, (), None))
    ds.handle(ds.makeRecord("DeepSpeed", logging.WARNING, "engine.py", 1, cpu_line, (), None))  # not its source
    ds.warning("a real DeepSpeed warning")
    assert logged == [("DeepSpeed", cpu_line), ("DeepSpeed", "a real DeepSpeed warning")]


class KernelPreference(enum.Enum):  # torchao's name, this module's class: its registration warning stays
    AUTO = "auto"


def test_torchao_filters_drop_only_its_cuda_kernels_and_its_enum_registrations(logged):
    quiet_torchao()
    quiet_torchao()
    ao, pytree = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    site = "/venv/lib/python3.11/site-packages/torchao"
    ao.warning(f"Failed to load {site}/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load this library")
    ao.warning(f"Failed to load {site}/_C_cutlass_90a.abi3.so: Could not load this library")
    ao.warning(f"Failed to load {site}/_C.abi3.so: undefined symbol")  # torchao's own CPU kernels: a real failure
    ao.warning("a real torchao warning")
    enum_msg = ("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. "
                "Calling register_constant() on Enum subclasses is deprecated and will be an error in a future "
                "release.")
    torchao_enum = enum.Enum("KernelPreference", "AUTO", module="torchao.quantization.quantize_.common")
    pytree.warning(enum_msg, torchao_enum)
    pytree.warning(enum_msg, KernelPreference)
    assert [name for name, _ in logged] == ["torchao", "torchao", "torch.utils._pytree"]
    assert logged[0][1].startswith(f"Failed to load {site}/_C.abi3.so")
    assert logged[1][1] == "a real torchao warning"
    assert logged[2][1].startswith(f"{KernelPreference} is an Enum subclass")
