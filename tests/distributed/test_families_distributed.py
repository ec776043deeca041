"""Each family end to end on 2 gloo ranks: `init_from=<HF dir>` (nothing of model.* set), LoRA under FSDP2 and
under TP=2, then `export --format hf` reloaded by transformers and `--format peft` reloaded by PeftModel on the
original checkpoint, both with the trained meshtune model's logits."""

from __future__ import annotations

import pytest
import torch

from tests import hf_models

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
STEPS = 3
LAYOUTS = {"fsdp2": ["parallel.dp_shard=2"], "tp2": ["parallel.dp_shard=1", "parallel.tp=2"],
           "fsdp2-meta": ["parallel.dp_shard=2", "model.init_device=meta"],
           "ddp": ["parallel.dp_replicate=2", "parallel.dp_shard=1"]}  # shards allocated, then filled
# a window of 8 at seq_len 24 and tied embeddings (Llama 3.2 / small Qwen2.5) are in the fsdp2 cases;
# Gemma 2 and 3 (tied) run under TP too (Gemma 2's soft-capped attention on each rank's heads); Phi-3's fused
# qkv_proj / gate_up_proj under both
RUNS = [("llama3.2-tied", "fsdp2"), ("llama3.2-tied", "fsdp2-meta"), ("mistral-window", "fsdp2"),
        ("mistral-window", "tp2"),
        ("qwen2.5-tied-bias", "fsdp2"), ("qwen2.5-bias", "tp2"), ("qwen3-qknorm", "fsdp2"), ("qwen3-qknorm", "tp2"),
        ("gemma2", "fsdp2"), ("gemma2", "tp2"), ("gemma3", "fsdp2"), ("gemma3", "tp2"), ("qwen2.5-bias", "ddp"),
        ("phi3", "fsdp2"), ("phi3", "tp2")]


def train_lora(run_dir: str, hf_dir: str, layout: str) -> dict:
    """On every rank: LoRA on every projection from the HF directory, a final checkpoint, and the trained
    model's logits on fixed tokens."""
    from meshtune.runtime.data_parallel import unwrap
    from meshtune.runtime.run import build_trainer
    from meshtune.schema import load_config

    cfg = load_config(None, [
        f"init_from={hf_dir}", f"run_dir={run_dir}", *LAYOUTS[layout], "data.task=reverse", "data.seq_len=24",
        "data.num_train=64", "data.num_eval=8", f"train.steps={STEPS}", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.eval_every=0", "train.eval_batches=0", "optim.warmup_steps=1",
        "optim.lr=5e-2", "checkpoint.resume=never", "checkpoint.save_final=true", "metrics.progress=false",
        "recipe.name=lora", "recipe.lora.rank=4", "recipe.lora.alpha=8"])
    trainer = build_trainer(cfg)
    trainer.fit()
    model = unwrap(trainer.model).eval()
    x = torch.randint(0, hf_models.V, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
        logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
    return {"tokens": x, "logits": logits, "family": cfg.model.family}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for case in {c for c, _ in RUNS}:
        path = tmp_path_factory.mktemp(case)
        hf_models.hf_model(case).save_pretrained(path)
        out[case] = path
    return out


@pytest.mark.parametrize("case,layout", RUNS, ids=[f"{c}-{lay}" for c, lay in RUNS])
def test_lora_from_hf_dir_exports_to_transformers_and_peft(rank_pool, hf_dirs, tmp_path, case, layout):

    from meshtune.export import export

    run_dir = tmp_path / "run"
    r0, r1 = rank_pool(2).run(train_lora, str(run_dir), str(hf_dirs[case]), layout)
    torch.testing.assert_close(r0["logits"], r1["logits"], atol=0, rtol=0)
    ours = r0["logits"]
    export(run_dir, "hf", tmp_path / "hf", quiet=True)
    export(run_dir, "peft", tmp_path / "peft", quiet=True)

    merged = hf_models.load_pretrained(tmp_path / "hf", case)
    assert type(merged).__name__ == hf_models.CASES[case][1]
    base = hf_models.load_pretrained(hf_dirs[case], case)
    with torch.no_grad():
        before = base(r0["tokens"]).logits
        adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
        gaps = {"hf": (merged(r0["tokens"]).logits - ours).abs().max().item(),
                "peft": (adapted(r0["tokens"]).logits - ours).abs().max().item()}
    assert (before - ours).abs().max() > 1e-3  # training moved the model: the exports carry the adapters
    assert max(gaps.values()) < 1e-4, gaps


def read_sharded(hf_dir: str, layout: str) -> dict:
    """On every rank: the HF model built on meta, sharded (FSDP2 or TP), filled by `load_hf_into` from the
    safetensors slices this rank holds; the bytes it read and the full weights it ends up with."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    from meshtune.models import build_model
    from meshtune.models.hf import load_hf_into, read_hf_config
    from tests.distributed.cases import full_params

    cfg = read_hf_config(hf_dir)
    model = build_model(cfg, cfg.vocab_size, "meta")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if layout == "tp2":
        parallelize_module(model, mesh, model.tp_plan())
        model.tie_weights()
    else:
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    model.init_buffers()
    read = load_hf_into(model, hf_dir)
    return {"read": read, "params": full_params(model)}


@pytest.mark.parametrize("case", ["qwen3-qknorm", "qwen2.5-tied-bias", "phi3"])
@pytest.mark.parametrize("layout", ["fsdp2", "tp2"])
def test_each_rank_reads_only_its_slices(rank_pool, hf_dirs, case, layout):
    """Loading at scale: per rank about half of the bytes (rotary-permuted rows read in whole heads, norms and
    replicated tensors whole), and the assembled weights equal to a whole-file load."""
    from meshtune.models.hf import load_hf_state_dict

    if case not in hf_dirs:
        pytest.skip(f"{case} is not among this module's checkpoints")
    whole = load_hf_state_dict(hf_dirs[case])
    total = sum(t.numel() * t.element_size() for k, t in whole.items() if k != "output.weight" or
                t.data_ptr() != whole["tok_embeddings.weight"].data_ptr())
    for r in rank_pool(2).run(read_sharded, str(hf_dirs[case]), layout):
        assert r["params"].keys() == whole.keys()
        for name, t in whole.items():
            assert torch.equal(r["params"][name], t), name
        assert r["read"] < 0.6 * total, (r["read"], total)


def frozen_storage(run_dir: str, hf_dir: str) -> dict:
    """On every rank: the same LoRA run from an HF dir with its frozen base stored in fp32 and in bf16 (bf16
    compute both times): dtypes and bytes of the shards this rank holds, and the losses of two steps."""
    from torch.distributed.tensor import DTensor

    from meshtune.runtime.data_parallel import unwrap
    from meshtune.runtime.run import build_trainer
    from meshtune.schema import load_config
    from tests.distributed.cases import step_losses

    out = {}
    for frozen in ("fp32", "bf16"):
        cfg = load_config(None, [
            f"init_from={hf_dir}", f"run_dir={run_dir}/{frozen}", "parallel.dp_shard=2", "train.dtype=bf16",
            f"train.frozen_dtype={frozen}", "data.task=reverse", "data.seq_len=24", "data.num_train=32",
            "data.num_eval=8", "train.steps=2", "train.global_batch_size=4", "train.micro_batch_size=2",
            "optim.warmup_steps=0", "checkpoint.resume=never", "metrics.progress=false", "recipe.name=lora"])
        trainer = build_trainer(cfg)
        local = {n: p.to_local() if isinstance(p, DTensor) else p for n, p in unwrap(trainer.model).named_parameters()}
        out[frozen] = {"dtypes": {(str(t.dtype), "lora_" in n) for n, t in local.items()},
                       "frozen": sum(t.numel() * t.element_size() for n, t in local.items() if "lora_" not in n),
                       "trainable": sum(t.numel() * t.element_size() for n, t in local.items() if "lora_" in n),
                       "losses": step_losses(trainer, 2)}
    return out


def test_frozen_base_in_bf16_halves_its_shards(rank_pool, hf_dirs, tmp_path):
    """train.frozen_dtype=bf16 under FSDP2: the frozen base shards are bf16 (LoRA stays fp32), this rank's
    frozen bytes halve, and training follows the fp32-stored run within bf16 rounding."""
    for r in rank_pool(2).run(frozen_storage, str(tmp_path), str(hf_dirs["qwen3-qknorm"])):
        assert r["bf16"]["dtypes"] == {("torch.bfloat16", False), ("torch.float32", True)}, r["bf16"]["dtypes"]
        assert r["fp32"]["dtypes"] == {("torch.float32", False), ("torch.float32", True)}
        assert 2 * r["bf16"]["frozen"] == r["fp32"]["frozen"] and r["bf16"]["trainable"] == r["fp32"]["trainable"]
        for a, b in zip(r["bf16"]["losses"], r["fp32"]["losses"], strict=True):
            assert abs(a - b) < 0.05 * abs(b), (r["bf16"]["losses"], r["fp32"]["losses"])
