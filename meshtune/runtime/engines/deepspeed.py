"""`parallel.engine: deepspeed`: ZeRO stage 1, 2 or 3 through `deepspeed.initialize`.

The DeepSpeed config is generated from meshtune's (`deepspeed_config`), so batch sizes, accumulation, clipping,
precision, optimizer and schedule cannot disagree between the two; a user JSON (`parallel.deepspeed_config`)
adds keys, and one that contradicts a generated value is a ConfigError naming the key and both values.

Loss scaling stays meshtune's: the trainer already multiplies each micro-batch's summed loss by
dp / global tokens, so `engine.backward(loss, scale_wrt_gas=False)` (DeepSpeed would otherwise divide by the
accumulation steps again) and the accumulation boundary is set per micro-batch, with one `engine.step()` per
optimizer step. The optimizer is meshtune's torch AdamW (`zero_allow_untested_optimizer`; DeepSpeed's own
AdamW would JIT-compile fused_adam); the LambdaLR schedule on it is stepped by the trainer, after the
recipes' after_optimizer_step, exactly as for the native engine.

Checkpoints: `engine.save_checkpoint` writes into Checkpointer's `step_N.tmp/deepspeed/` (renamed atomically to
`step_N/` with meta.json last); `meshtune.artifacts` rebuilds full fp32 weights from any stage with DeepSpeed's
zero_to_fp32 for export, serving and teachers (ZeRO-3 adapters come out full-size). Every torch.load DeepSpeed
makes of these files is weights-only (`meshtune.artifacts.safe.torch_loads_weights_only`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from meshtune.artifacts.find import DEEPSPEED_DIR
from meshtune.artifacts.safe import torch_loads_weights_only
from meshtune.config import ConfigError
from meshtune.quiet import quiet_deepspeed
from meshtune.runtime.checkpoint import Checkpointer, load_rng_state
from meshtune.runtime.engines.native import check_saved_by, import_engine
from meshtune.runtime.env import ensure_process_group
from meshtune.runtime.precision import use_bf16
from meshtune.schema import Config

SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU shared-memory all-reduce: used by inference_all_reduce only
TAG = DEEPSPEED_DIR  # the folder inside step_N/ that holds DeepSpeed's own checkpoint
# keys meshtune passes as objects rather than config: a user JSON may not set them
OWNED = {"optimizer": "meshtune passes its own AdamW (optim.*)",
         "scheduler": "meshtune drives its own LR schedule (optim.warmup_steps, optim.schedule)"}


def deepspeed_config(cfg: Config, world_size: int, accum_steps: int, bf16: bool) -> dict:
    """The DeepSpeed config that says what meshtune's config says (see the module docstring)."""
    p, t = cfg.parallel, cfg.train
    if world_size * t.micro_batch_size * accum_steps != t.global_batch_size:
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not train.micro_batch_size="
                          f"{t.micro_batch_size} x {world_size} ranks x an accumulation count; change the batch sizes")
    zero: dict = {"stage": p.zero_stage}
    for key, device in (("offload_optimizer", p.offload_optimizer), ("offload_param", p.offload_param)):
        if device != "none":
            zero[key] = {"device": device, **({"nvme_path": p.nvme_path} if device == "nvme" else {})}
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,  # DeepSpeed's default is 1.0: meshtune's value must win
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # meshtune logs metrics itself
        "wall_clock_breakdown": False,
    }


def merge_user_config(generated: dict, user: dict, source: str, prefix: str = "") -> dict:
    """`generated` with the keys of `user` added; a key both set to different values is a ConfigError."""
    out = dict(generated)
    for key, value in user.items():
        name = f"{prefix}{key}"
        if not prefix and key in OWNED:
            raise ConfigError(f"{source}: key {name!r} conflicts with meshtune ({OWNED[key]}); remove it")
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge_user_config(out[key], value, source, f"{name}.")
        elif out[key] != value:
            raise ConfigError(f"{source}: key {name!r} is {value!r} there but meshtune's config gives {out[key]!r}; "
                              "remove it from the JSON or change the meshtune setting")
    return out


def read_user_config(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"parallel.deepspeed_config: cannot read {path} as JSON ({e}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"parallel.deepspeed_config: {path} holds no JSON object; give a DeepSpeed config")
    return data


def build_config(cfg: Config, world_size: int, accum_steps: int, device: torch.device) -> dict:
    """The generated config merged with `parallel.deepspeed_config` (when set)."""
    ds = deepspeed_config(cfg, world_size, accum_steps, use_bf16(cfg.train.dtype, device))
    if cfg.parallel.deepspeed_config:
        src = f"parallel.deepspeed_config ({cfg.parallel.deepspeed_config})"
        ds = merge_user_config(ds, read_user_config(cfg.parallel.deepspeed_config), src)
    return ds


class DeepSpeedEngine:
    """ZeRO through a `deepspeed.DeepSpeedEngine`; `model` is that engine (an nn.Module around the decoder)."""

    name = "deepspeed"
    owns_precision = True  # bf16: DeepSpeed keeps bf16 weights and fp32 master copies itself

    def __init__(self, cfg: Config, mesh, device: torch.device, model: torch.nn.Module, optimizer,
                 accum_steps: int):
        quiet_deepspeed()
        deepspeed = import_engine("deepspeed")
        if device.type == "cpu":
            # DeepSpeed's CPU comm backend JIT-compiles SHM_OP when it starts (g++ and ninja, ~40 s cold) though
            # training never calls it (its all_reduce is torch.distributed's). Marking it incompatible, in the
            # dict DeepSpeed keeps for such edits, skips the build. (On GPU there is no such op, and reading the
            # dict would probe every op builder for nothing.)
            deepspeed.ops.__compatible_ops__[SHM_OP] = False
        self.config = build_config(cfg, mesh.dp_size, accum_steps, device)  # a bad user JSON: before any group
        ensure_process_group(device)
        self.stage = self.config["zero_optimization"]["stage"]
        self.model, self.ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                   config=self.config)

    def accumulate(self, last: bool):
        import contextlib

        self.model.set_gradient_accumulation_boundary(last)  # reduce gradients on the last micro-batch only
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # the trainer scaled it by dp / global tokens

    def step(self) -> float:
        self.model.step()  # clips to gradient_clipping (= optim.grad_clip), steps, zeroes the gradients
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def zero_grad(self) -> None:
        pass  # engine.step() zeroed them

    def save(self, checkpointer: Checkpointer, step: int, meta: dict) -> Path:
        def write(tmp: Path) -> None:
            self.model.save_checkpoint(str(tmp), tag=TAG, save_latest=False)

        return checkpointer.save(step, self.model, None, {**meta, "engine": self.name, "zero_stage": self.stage,
                                                          "world_size": self.model.dp_world_size}, write=write)

    def load(self, checkpointer: Checkpointer, path: Path) -> dict:
        check_saved_by(path, self.name)
        meta_file = Path(path) / "meta.json"
        if not meta_file.is_file():
            raise ConfigError(f"checkpoint.resume: {path} is not a complete meshtune checkpoint (no meta.json); "
                              "give a step_N folder or use resume=auto")
        meta = json.loads(meta_file.read_text())
        check_resumable(path, meta, self.stage, self.model.dp_world_size)
        with torch_loads_weights_only(Path(path) / TAG):  # DeepSpeed's own torch.loads: no code from its files
            self.model.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=False, load_module_strict=True)
        load_rng_state(path, checkpointer.rank)
        return meta


def check_resumable(path, meta: dict, stage: int, world_size: int) -> None:
    """A DeepSpeed checkpoint resumes only with its ZeRO stage on its world size (ZeRO partitions are per rank:
    DeepSpeed cannot reshard them). Used by the engine and by the launcher's preflight.

    Raises:
        ConfigError: naming the key and the ways out.
    """
    if meta.get("zero_stage") != stage:
        raise ConfigError(f"parallel.zero_stage: {path} was saved with ZeRO stage {meta.get('zero_stage')}, this run "
                          f"uses {stage}; resume with parallel.zero_stage={meta.get('zero_stage')}")
    saved = meta.get("world_size", world_size)
    if saved != world_size:
        raise ConfigError(f"checkpoint.resume: {path} holds DeepSpeed ZeRO partitions of {saved} ranks, this run has "
                          f"{world_size}; resume on {saved} ranks, or start from its weights (`meshtune export "
                          "RUN_DIR --format merged` + init_from; the optimizer state restarts), or train with "
                          "parallel.engine=native, whose checkpoints reshard")
