"""QLoRA on real gloo ranks: FSDP2 shards and all-gathers the NF4 base as NF4 bytes, and trains like the same
run in one process from the same seed; a DCP checkpoint of the NF4 base resumes bitwise."""

import pytest
import torch

from meshtune.artifacts.packed import is_nf4
from tests.distributed.cases import full, layout, max_diff, reference_trainer, step_losses, tiny_config

TOL = 1e-5
# the tiny model's projections (32x32, 16x32, 96x32...) hold 4 to 24 groups of 32 x 4 weights: 2 ranks split them
QLORA = ["recipe.name=qlora", "recipe.qlora.block_size=32", "recipe.qlora.scaler_block_size=4"]


def full_params(model):
    """Every parameter gathered, NF4 ones dequantized shard by shard first: torchao's NF4 `clone` re-quantizes
    at its default block sizes, and its functional all-gather (DTensor.full_tensor) of the three inner tensors
    crashed a gloo rank about one run in ten (heap corruption), so NF4 tensors are neither cloned nor gathered."""
    from torch.distributed.tensor import DTensor

    from meshtune.runtime.data_parallel import unwrap

    out = {}
    for n, p in unwrap(model).named_parameters(remove_duplicate=False):
        p = p.detach()
        if is_nf4(p) and isinstance(p, DTensor):
            p = DTensor.from_local(p.to_local().get_original_weight(), p.device_mesh, p.placements)
        elif is_nf4(p):
            p = p.get_original_weight()
        out[n] = full(p).clone()
    return out


def interrupted_vs_uninterrupted(run_dir, lay, steps, cut):
    """Resume within one layout, NF4 parameters compared dequantized (`full_params` above)."""
    from tests.distributed.test_checkpoint import interrupted_vs_uninterrupted as resume_run

    return resume_run(run_dir, lay, lay, steps, cut, params=full_params)


def _gathered(t):
    """Bytes FSDP2 all-gathers of a local shard: NF4's codes, int8 scales and group factors (its scaler mean
    and 16-value table are metadata every rank has), else the plain tensor."""
    names = ("quantized_data", "quantized_scalers", "quantization_factor") if type(t).__name__ == "NF4Tensor" else ()
    return sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names) if names else t.numel() * 4


def qlora_fsdp_vs_reference(run_dir, tied):
    from meshtune.runtime.data_parallel import unwrap
    from meshtune.runtime.gloo_fsdp import P2PAllGather
    from meshtune.runtime.run import build_trainer, model_state_bytes, tensor_bytes

    # tied: with a chunked loss too, which runs the NF4 head (the embedding's matrix) once per 8 positions
    chunk = ["model.tie_embeddings=true", "train.loss_chunk_size=8"] if tied else []
    cfg = tiny_config(run_dir, *layout(1, 2, 4), *QLORA, *chunk)
    ref, trainer = reference_trainer(cfg), build_trainer(cfg)
    model = unwrap(trainer.model)
    sent = {"block": [], "root": []}

    def recording(unit):
        class Recording(P2PAllGather):
            def __call__(self, output_tensor, input_tensor, group, async_op=False):
                sent[unit].append(input_tensor.numel() * input_tensor.element_size())
                return super().__call__(output_tensor, input_tensor, group, async_op)

        return Recording()

    block = model.layers["0"]
    block.set_custom_all_gather(recording("block"))
    model.set_custom_all_gather(recording("root"))  # the root unit: embedding, final norm, head
    local = {n: p.to_local() for n, p in block.named_parameters()}
    root = {n: p.to_local() for n, p in model.named_parameters() if not n.startswith("layers.")}  # tied: once
    wq, emb = local["attention.wq.weight"], root["tok_embeddings.weight"]
    before = full_params(trainer.model)
    losses, ref_losses = step_losses(trainer, 3), step_losses(ref, 3)
    after = full_params(trainer.model)
    return {"losses": losses, "ref_losses": ref_losses, "sent": sent, "wq_type": type(wq).__name__,
            "wq_rows": wq.shape[0], "shard_bytes": sum(tensor_bytes(t) for t in local.values()),
            "gathered_bytes": sum(_gathered(t) for t in local.values()),
            "root_gathered": sum(_gathered(t) for t in root.values()), "root_names": sorted(root),
            "emb_type": type(emb).__name__, "emb_rows": emb.shape[0],
            "head_is_emb": model.output.weight is model.tok_embeddings.weight, "rank": torch.distributed.get_rank(),
            "state_bytes": model_state_bytes(trainer.model),
            "logits": logits_of(model),
            "ref_logits": logits_of(ref.model),
            "nf4_gathered": sum(_gathered(t) for t in local.values() if type(t).__name__ == "NF4Tensor"),
            "nf4_fp32_bytes": sum(t.numel() * 4 for t in local.values() if type(t).__name__ == "NF4Tensor"),
            "changed": {n for n in after if not (after[n] == before[n]).all()},
            "lora_diff": max_diff({k: v for k, v in after.items() if "lora_" in k},
                                  {k: v for k, v in full_params(ref.model).items() if "lora_" in k})}


def logits_of(model):
    """Logits of fixed tokens after training (the NF4 embedding and head in the forward)."""
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qlora_fsdp2_matches_single_process(rank_pool, tmp_path, tied):
    from meshtune.runtime.plan_report import _rank_layout
    from meshtune.runtime.preflight import preflight

    chunk = ["model.tie_embeddings=true", "train.loss_chunk_size=8"] if tied else []
    # fp32 as the ranks run on CPU (a plan's `auto` is bf16, which stores the frozen norms in bf16 as on GPU)
    cfg = tiny_config(str(tmp_path / "plan"), *layout(1, 2, 4), *QLORA, *chunk, "train.dtype=fp32")
    for r in rank_pool(2).run(qlora_fsdp_vs_reference, str(tmp_path), tied):
        # `meshtune validate`'s layout (built on meta) holds what the rank holds: NF4 embedding and head included
        plan = _rank_layout(cfg, preflight(cfg, 2), 264, r["rank"])
        assert plan["param_bytes"] + 12 * plan["trainable"] == r["state_bytes"], (plan, r["state_bytes"])
        assert r["wq_type"] == "NF4Tensor" and r["wq_rows"] == 16  # each rank holds half the rows, as NF4
        assert r["emb_type"] == "NF4Tensor" and r["emb_rows"] == 132  # and half the embedding's 264
        assert r["head_is_emb"] == tied
        assert set(r["root_names"]) == {"norm.weight", "tok_embeddings.weight"} | (set() if tied else {"output.weight"})
        # every gather sends this rank's shard as stored: NF4 codes + scales, not fp32
        assert r["sent"]["block"] and set(r["sent"]["block"]) == {r["gathered_bytes"]}, r
        assert r["sent"]["root"] and set(r["sent"]["root"]) == {r["root_gathered"]}, r
        assert r["root_gathered"] < 0.2 * 4 * 132 * 32 * (1 if tied else 2), r  # NF4: 4 bits + scales
        assert r["nf4_gathered"] < 0.15 * r["nf4_fp32_bytes"], r  # 4 bits + 2 x 1/32 byte of scales per weight
        assert r["changed"] and all("lora_" in n for n in r["changed"])  # the NF4 base stays as it was
        assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"], strict=True)) < TOL, r
        assert r["lora_diff"] < 1e-4, r
        torch.testing.assert_close(r["logits"], r["ref_logits"], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qlora_resume_is_bitwise_identical(rank_pool, tmp_path, tied):
    fsdp = [*layout(1, 2, 2), *QLORA, f"model.tie_embeddings={str(tied).lower()}"]
    for r in rank_pool(2).run(interrupted_vs_uninterrupted, str(tmp_path), fsdp, 4, 2):
        assert r["start"] == 2
        assert r["losses"] == r["ref_losses"], r
        assert r["param_diff"] == 0.0


NF4_PARTS = ("quantized_data", "quantized_scalers", "quantization_factor")  # split by rows; the mean is whole


def qlora_init_from_vs_reference(run_dir, source, pp=1):
    """A QLoRA run on dp_shard=2 (x `pp` stages) loading full-precision weights from `source` (an HF dir, the same
    on meta, a tensor file, a full fine-tuning FSDP2 run's checkpoint of them, an HF dir of a model with tied
    embeddings), beside the one-process run loading the same: this rank's NF4 parts against the rows of the
    one-process weight its FSDP2 shard holds."""
    from dataclasses import replace
    from pathlib import Path

    import torch.distributed as dist
    from safetensors.torch import save_file

    from meshtune.runtime.data_parallel import unwrap
    from meshtune.runtime.run import build_trainer
    from tests.distributed.test_pipeline_parallel import pp_layout
    from tests.unit.test_qlora import init_from_hf

    path = Path(run_dir)
    if dist.get_rank() == 0:
        loaded = init_from_hf(path, case="llama3.2-tied" if source == "tied" else "llama-linear")[1]  # the HF dir
        if source == "weights":
            save_file(loaded, str(path / "weights.safetensors"))
    dist.barrier()
    cfg, _ = init_from_hf(path, *(layout(1, 2, 2) if pp == 1 else pp_layout(pp, 2, 1, 1, "1F1B")), write=False)
    if source == "checkpoint":  # step 0: the HF weights as they loaded, saved by 2 ranks
        plain = build_trainer(replace(cfg, recipe=replace(cfg.recipe, name=""), run_dir=str(path / "plain")))
        plain.save()
        del plain
    source_dir = {"weights": "weights.safetensors", "checkpoint": "plain"}.get(source, "hf")
    cfg = replace(cfg, init_from=str(path / source_dir))
    ref = reference_trainer(cfg)  # one process (a checkpoint: reading both ranks' pieces of each weight)
    device = "meta" if source == "meta" else "auto"
    trainer = build_trainer(replace(cfg, model=replace(cfg.model, init_device=device)))
    params = dict(unwrap(trainer.model).named_parameters())  # a pipeline stage's: some of the model's
    nf4 = {n: p for n, p in params.items() if is_nf4(p)}
    parts_equal = {}
    for n, p in nf4.items():
        mine, whole = p.to_local(), ref.model.get_parameter(n)
        shard = p.device_mesh.get_local_rank()  # FSDP2's shard index (the dp_shard mesh)
        parts_equal[n] = torch.equal(mine.scaler_mean, whole.scaler_mean) and all(
            torch.equal(getattr(mine, a), getattr(whole, a).chunk(2)[shard]) for a in NF4_PARTS)
    dequantized = max_diff({n: v for n, v in full_params(trainer.model).items() if n in nf4},
                           {n: v for n, v in full_params(ref.model).items() if n in nf4})
    return {"parts_equal": parts_equal, "dequantized": dequantized, "losses": step_losses(trainer, 3),
            "ref_losses": step_losses(ref, 3)}


@pytest.mark.parametrize("source", ["hf", "meta", "weights", "checkpoint", "tied"])
def test_qlora_init_from_under_fsdp2_is_the_one_process_quantization(rank_pool, tmp_path, source):
    """Each rank quantizes the rows it loads with the whole weight's block-scale statistics: its NF4 bytes are
    the one-process quantization's rows bitwise (the projections, and the embedding and head split by vocabulary
    rows), built on the device or on meta, from an HF dir, a tensor file or a plain checkpoint; the runs then
    train alike."""
    for r in rank_pool(2).run(qlora_init_from_vs_reference, str(tmp_path), source):
        ends = 1 if source == "tied" else 2  # the tied head is the embedding's Parameter
        assert len(r["parts_equal"]) == 14 + ends and all(r["parts_equal"].values()), r["parts_equal"]
        assert r["dequantized"] == 0.0
        # on meta the LoRA A matrices are drawn after sharding (other values): B = 0 makes the first step the base's
        steps = 1 if source == "meta" else 3
        assert max(abs(a - b) for a, b in zip(r["losses"][:steps], r["ref_losses"][:steps], strict=True)) < TOL, r


def test_qlora_init_from_under_pipeline_and_fsdp2_is_the_one_process_quantization(rank_pool, tmp_path):
    """2 stages x dp_shard=2: each stage's ranks quantize their rows with the whole weight's statistics, gathered
    over the stage's FSDP2 mesh."""
    for r in rank_pool(4).run(qlora_init_from_vs_reference, str(tmp_path), "hf", pp=2):
        assert len(r["parts_equal"]) == 8 and all(r["parts_equal"].values()), r["parts_equal"]  # a block + an end
        assert r["dequantized"] == 0.0
        assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"], strict=True)) < TOL, r


def qlora_pp_vs_reference(run_dir, tied):
    from meshtune.runtime.run import build_trainer
    from tests.distributed.test_pipeline_parallel import pp_layout

    cfg = tiny_config(run_dir, *pp_layout(2, 1, 1, 2, "1F1B"), *QLORA, f"model.tie_embeddings={str(tied).lower()}")
    ref, trainer = reference_trainer(cfg), build_trainer(cfg)
    nf4 = [n for n, p in trainer.model.named_parameters() if type(p).__name__ == "NF4Tensor"]
    return {"losses": step_losses(trainer, 3), "ref_losses": step_losses(ref, 3), "nf4": nf4}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qlora_pipeline_parallel_matches_single_process(rank_pool, tmp_path, tied):
    first, last = rank_pool(2).run(qlora_pp_vs_reference, str(tmp_path), tied)
    for r, end in ((first, "tok_embeddings.weight"), (last, "output.weight")):
        assert len(r["nf4"]) == 8 and end in r["nf4"]  # one block per stage, its projections NF4, and its end
        assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses"], strict=True)) < TOL, r
