"""`meshtune export`: a trained run's weights as files other tools load, one module per format.

    meshtune export runs/tiny --format merged                  # runs/tiny/model.safetensors
    meshtune export runs/lora --format adapter --step 40       # runs/lora/adapter.safetensors
    meshtune export runs/lora --format peft --out my_adapter   # my_adapter/adapter_config.json, adapter_model.*
    meshtune export runs/hf-lora --format hf                   # runs/hf-lora/hf/config.json, model.safetensors
    meshtune export runs/tiny --format executorch              # runs/tiny/executorch/model.pte, model.json

One process (world size 1) reads the run's checkpoint through `meshtune.artifacts` (any engine, any layout:
every exported tensor is full-size, so an adapter trained under FSDP or ZeRO-3 is never a shard or empty),
checks the format against what the run's recipes declare they can produce, and writes it. The formats
(merged, adapter, peft, hf, sparse, shrunk, program, quantized, executorch) are described in their modules;
adding one is one module and its line below. Every user error is a one-line ConfigError naming the thing and the fix.
"""

from __future__ import annotations

from pathlib import Path

from meshtune.config import ConfigError
from meshtune.export.base import REGISTRY, Options, check_format, human_size, merged_state, save_safetensors

# the registry: importing a format module registers it, in the order `--format` lists them
# isort: off
from meshtune.export import merged, adapter, peft, hf, sparse, shrunk, program, quantized, executorch  # noqa: E402, F401
# isort: on

FORMATS = tuple(REGISTRY)

__all__ = ["FORMATS", "check_format", "export", "human_size", "merged_state", "save_safetensors"]


def export(run_dir: str | Path, fmt: str, out: str | Path | None = None, step: int | None = None,
           quiet: bool = False, scheme: str | None = None, dtype: str | None = None,
           max_seq_len: int | None = None) -> list[Path]:
    """Export a run's checkpoint in `fmt` (one of FORMATS) and print each file with its size.

    Args:
        run_dir: the training run's run_dir (holds config.yaml and checkpoints/).
        fmt: one of FORMATS (see the format modules).
        out: output directory; default: the run dir, or the format's folder in it (run_dir/peft, run_dir/hf).
        step: export this checkpoint step instead of the newest complete one.
        quiet: do not print.
        scheme: for `quantized`: int8-int4 or int8-int8 instead of the run's recipe.qat.scheme; for
            `executorch` also fp32 (its default when the run has no QAT).
        dtype: for `hf`: bf16, fp16 or fp32 (default: the dtype of the run's init_from HF checkpoint, else fp32).
        max_seq_len: for `executorch`: KV-cache length (default: model.max_seq_len).

    Returns:
        The written files.

    Raises:
        ConfigError: one line naming what is missing or wrong and the fix.
    """
    from meshtune.artifacts import find, find_checkpoint, load_run, run_config
    from meshtune.recipes import build_recipes

    run_dir = Path(run_dir)
    if fmt not in REGISTRY:  # cheap checks first: no weights are read for a bad request
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}; pick one of them")
    spec = check_format(fmt, build_recipes(run_config(run_dir).recipe))
    ckpt = find_checkpoint(run_dir, step)
    run = load_run(find(ckpt, key="RUN_DIR"))
    dest = Path(out) if out is not None else run_dir / spec.out_dir
    written = spec.write(run, dest, Options(run_dir, quiet, scheme, dtype, max_seq_len))
    if not quiet:
        name = run.artifact.recipe_cfg.name
        what = f"recipe {name}" if name else "no recipe"
        print(f"meshtune export: {fmt} from {run.artifact.path} (step {run.artifact.step}, {what})")
        for path in written:
            print(f"  wrote {path} ({human_size(path.stat().st_size)})")
    return written


def lower_job(job: tuple[str, str, str | None]) -> tuple[str, float]:
    """(run dir, out dir, scheme) -> (model.pte, seconds): `meshtune export RUN --format executorch --scheme S
    --out OUT` in a worker process (spawned: the demo and compress-search lower several at once), on one thread."""
    import time

    import torch

    from meshtune.quiet import quiet_torchao

    quiet_torchao()  # before anything imports torchao in this fresh process
    torch.set_num_threads(1)
    t0 = time.time()
    run_dir, out, scheme = job
    return str(export(run_dir, "executorch", out, scheme=scheme, quiet=True)[0]), time.time() - t0
