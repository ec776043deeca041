"""parallel.fsdp_unit=linear (runtime/fsdp_units.py) on real gloo ranks: the same numbers as block units, bitwise,
and as the single-process reference from the same seed; checkpoints across unit kinds; which units gather when,
and how many bytes are gathered at once against `meshtune validate`'s term."""

import pytest

from tests.distributed.cases import full_params, reference_trainer, step_losses, tiny_config

TOL = 1e-5
FSDP = ["parallel.dp_shard=2", "train.micro_batch_size=2"]  # 2 accumulation steps: no-sync backwards too


def fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    from meshtune.runtime.data_parallel import unwrap

    return [m for m in unwrap(model).modules() if isinstance(m, FSDPModule)]


def block_vs_linear(run_dir, overrides, steps):
    """The same run with each unit kind on the same ranks, and its single-process reference: losses as hex
    (bitwise), whether every parameter is bitwise equal, and the distance to the reference."""
    import torch

    from meshtune.runtime.run import build_trainer

    out, params = {}, {}
    for unit in ("block", "linear"):
        cfg = tiny_config(run_dir, *FSDP, f"parallel.fsdp_unit={unit}", *overrides)
        trainer = build_trainer(cfg)
        out[f"units-{unit}"] = len(fsdp_modules(trainer.model))
        out[unit] = [x.hex() for x in step_losses(trainer, steps)]
        params[unit] = full_params(trainer.model)
    ref = reference_trainer(cfg)
    ref_losses, ref_params = step_losses(ref, steps), full_params(ref.model)
    out["bitwise_params"] = all(torch.equal(params["block"][k], params["linear"][k]) for k in params["block"])
    out["loss_diff"] = max(abs(float.fromhex(a) - b) for a, b in zip(out["linear"], ref_losses, strict=True))
    out["param_diff"] = max(float((params["linear"][k] - ref_params[k]).abs().max()) for k in ref_params)
    return out


LORA = ["recipe.name=lora"]
AC = ["parallel.activation_checkpointing=true"]
CASES = {
    "full": [],
    "lora": LORA,
    "full-ac": AC,
    "lora-ac": [*LORA, *AC],
    "lora-ac-every2-selective": [*LORA, *AC, "parallel.ac_every=2", "parallel.ac_mode=selective_op"],
    "full-ac-selective-tied": [*AC, "parallel.ac_mode=selective_op", "model.tie_embeddings=true"],
    "lora-vocab-parallel-ac": [*LORA, *AC, "parallel.vocab_parallel=true"],
    "full-cpu-offload-ac": [*AC, "parallel.cpu_offload=true"],
    "full-keep-after-forward": ["parallel.reshard_after_forward=false"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_linear_units_equal_block_units_bitwise(rank_pool, tmp_path, name):
    """Each parameter is sharded and reduce-scattered exactly as inside its block (the same per-element sums), so
    losses and parameters are bitwise those of block units, and within TOL of one process."""
    for r in rank_pool(2).run(block_vs_linear, str(tmp_path), CASES[name], 3):
        assert r["units-linear"] == r["units-block"] + 2 * 7, r  # 2 layers x 7 projections more units
        assert r["linear"] == r["block"], r
        assert r["bitwise_params"], r
        assert r["loss_diff"] < TOL and r["param_diff"] < 1e-4, r
