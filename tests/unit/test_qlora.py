"""QLoRA (recipe.name: qlora) in one process: NF4 round trip against torchao, the NF4 bytes counted, loading
full-precision weights (an HF dir, a merged file, on meta) into the NF4 base, one-line refusals, and quality
against LoRA on the unquantized base."""

from __future__ import annotations

import pytest
import torch

from meshtune.config import ConfigError, ModelConfig
from meshtune.models import build_model
from meshtune.recipes import RecipeConfig, apply_recipes, build_recipes
from meshtune.recipes.lora import LoRAConfig, lora_modules
from meshtune.recipes.qlora import QLoRAConfig, target_shapes
from meshtune.recipes.qlora.nf4 import row_scaler_block_size
from meshtune.runtime.env import DistEnv
from meshtune.runtime.precision import tensor_bytes
from meshtune.runtime.run import build_trainer, model_state_bytes
from meshtune.schema import load_config
from tests.distributed.cases import TINY, step_losses, tiny_config

SMALL_BLOCKS = ["recipe.qlora.block_size=32", "recipe.qlora.scaler_block_size=4"]  # the tiny model's sizes
NF4_HALF_GAP = (1.0 - 0.6962) / 2  # the widest gap between NF4 code values is [-1, -0.6962]


def qlora_model(m: ModelConfig, qlora: QLoRAConfig, seed: int = 0, lora: LoRAConfig | None = None):
    torch.manual_seed(seed)
    base = build_model(m, vocab_size=64)
    full = {k: v.clone() for k, v in base.state_dict().items()}
    recipes = build_recipes(RecipeConfig(name="qlora", lora=lora or LoRAConfig(), qlora=qlora))
    return full, apply_recipes(base, recipes), recipes


def test_nf4_round_trip_is_torchaos_and_within_its_bound():
    """The stored base is exactly torchao's `to_nf4` of the weights; each weight's error is at most half the
    widest NF4 gap times its block's absmax, plus the error of that scale's int8 double quantization."""
    from torchao.quantization import to_nf4

    m = ModelConfig(dim=256, n_layers=1, n_heads=4)
    full, model, _ = qlora_model(m, QLoRAConfig())  # torchao's defaults: block 64, scaler block 256
    for name in ("layers.0.attention.wq.weight", "layers.0.feed_forward.w2.weight"):
        w, q = full[name], model.state_dict()[name]
        assert type(q).__name__ == "NF4Tensor"
        ref = to_nf4(w, 64, 256)
        assert torch.equal(q.get_original_weight(), ref.get_original_weight())
        err = (q.get_original_weight() - w).abs().view(-1, 64)
        scale = w.abs().view(-1, 64).amax(dim=1, keepdim=True)  # each block's absmax
        stored = q.dequantize_scalers(q.quantized_scalers, q.quantization_factor, 256).view(-1, 1)
        # codes are picked against the true scale, then decoded with the stored one
        assert (err <= NF4_HALF_GAP * scale + (scale - stored).abs() + 1e-7).all(), name
        assert (scale - stored).abs().max() < 0.01 * scale.max()  # double quantization costs < 1% of a scale
        assert err.mean() < 0.1 * w.abs().mean()  # measured 0.08: NF4 on normal weights


@pytest.mark.parametrize("tied", [False, True])
def test_nf4_base_bytes_are_about_0_14_of_fp32(tied):
    """Every projection, the embedding and the head (one Parameter when tied) stored as NF4 at ~0.13x."""
    m = ModelConfig(dim=256, n_layers=2, n_heads=4, tie_embeddings=tied)
    _, model, _ = qlora_model(m, QLoRAConfig())
    torch.manual_seed(0)
    lora = apply_recipes(build_model(m, vocab_size=64), build_recipes(RecipeConfig(name="lora")))
    nf4 = {n: p for n, p in model.named_parameters() if type(p).__name__ == "NF4Tensor"}
    ends = {"tok_embeddings.weight"} if tied else {"tok_embeddings.weight", "output.weight"}
    assert nf4.keys() - {n for n in nf4 if ".layers." in f".{n}"} == ends  # and every block projection:
    assert len(nf4) == 2 * 7 + len(ends)
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    assert not any(p.requires_grad for p in nf4.values())
    ratio = sum(tensor_bytes(p) for p in nf4.values()) / sum(p.numel() * 4 for p in nf4.values())
    assert 0.12 < ratio < 0.15, ratio  # 4 bits + 1/64 byte of scale + <= 4/64 byte of group factor per weight
    plain = dict(lora.named_parameters())
    saved = sum(plain[n].numel() * 4 - tensor_bytes(p) for n, p in nf4.items())
    assert model_state_bytes(lora) - model_state_bytes(model) == saved  # the run's start-event figure
    off = qlora_model(m, QLoRAConfig(quantize_embeddings=False))[1]  # the choice: full-precision ends
    assert type(off.tok_embeddings.weight).__name__ == "Parameter" and off.tok_embeddings.weight.dtype == torch.float32


def nf4_ends_model(tied: bool, seed: int = 0):
    """A small QLoRA model (dim 64, vocab 96, blocks of 32, groups of 4) with NF4 embedding and head."""
    m = ModelConfig(dim=64, n_layers=1, n_heads=4, tie_embeddings=tied)
    torch.manual_seed(seed)
    base = build_model(m, vocab_size=96)
    full = {k: v.clone() for k, v in base.state_dict().items()}
    recipes = build_recipes(RecipeConfig(name="qlora", qlora=QLoRAConfig(32, 4)))
    return full, apply_recipes(base, recipes), recipes


@pytest.mark.parametrize("tied", [False, True])
def test_nf4_embedding_and_head_are_torchaos_dequantization(tied):
    """The lookup is the looked-up rows of torchao's dequantized weight, bitwise; the head's chunked matmul and
    its input gradient are torchao's `linear_nf4` within fp32 rounding; the round trip is within NF4's bound."""
    from torchao.quantization import to_nf4
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

    full, model, _ = nf4_ends_model(tied)
    emb, head = model.tok_embeddings, model.output
    w = full["tok_embeddings.weight"]
    deq = emb.weight.get_original_weight()
    # scale groups of at most 4 blocks within one 2-block row: 2 (nf4.row_scaler_block_size)
    assert torch.equal(deq, to_nf4(w, 32, 2).get_original_weight())
    err, scale = (deq - w).abs().view(-1, 32), w.abs().view(-1, 32).amax(dim=1, keepdim=True)
    stored = emb.weight.dequantize_scalers(emb.weight.quantized_scalers, emb.weight.quantization_factor, 2)
    assert (err <= NF4_HALF_GAP * scale + (scale - stored.view(-1, 1)).abs() + 1e-7).all()
    tokens = torch.randint(0, 96, (3, 11))
    assert torch.equal(emb(tokens), deq[tokens])
    hw = head.weight
    x = torch.randn(3, 11, 64, requires_grad=True)
    head.rows_per_chunk = 40  # 96 rows: chunks of 40, 40, 16
    out = head(x)
    ref = linear_nf4(x, hw)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0],
                               atol=1e-5, rtol=1e-5)


def test_validate_counts_the_nf4_bytes_per_rank():
    """`meshtune validate`'s per-rank parameter bytes (the layout built on meta) count NF4 at its packed size."""
    from meshtune.runtime.plan_report import _rank_layout
    from meshtune.runtime.preflight import preflight

    per_rank = {}
    for name in ("lora", "qlora"):
        # fp32 compute: the plan's default (auto) is bf16, which would store LoRA's frozen base in bf16
        cfg = load_config("finetune/qlora", [f"recipe.name={name}", "train.dtype=fp32"])
        per_rank[name] = _rank_layout(cfg, preflight(cfg, 2), 264, 0)
    lora, qlora = per_rank["lora"], per_rank["qlora"]
    assert lora["params"] == qlora["params"] and lora["param_bytes"] == 4 * lora["params"]
    cfg = load_config("finetune/qlora")
    m, q = cfg.model, cfg.recipe.qlora
    base = sum(r * c for r, c in target_shapes(m, LoRAConfig().targets).values()) * m.n_layers // 2  # per rank
    ends = 2 * 264 * m.dim // 2  # the untied embedding and head, per rank
    saved = lora["param_bytes"] - qlora["param_bytes"]
    # 4 bits and an int8 scale per block of 64 and an fp32 factor per group: the projections' groups of 64 x 32,
    # the embedding's and head's of one 128-wide row (2 blocks; nf4.row_scaler_block_size)
    kept = base * (0.5 + 1 / q.block_size + 4 / (q.block_size * q.scaler_block_size)) + ends * (0.5 + 1 / 64 + 4 / 128)
    tables = 68 * (7 * m.n_layers + 2)  # and each NF4 tensor's 16-value table and scale mean, on every rank
    assert 0 <= 4 * (base + ends) - kept - saved <= tables, (saved, 4 * (base + ends) - kept)


def test_forward_is_lora_on_the_dequantized_base_and_only_adapters_train():
    m = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2)
    _, model, (recipe,) = qlora_model(m, QLoRAConfig(32, 4))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if ".lora_" in n}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_b." in n:
                p.normal_()
    x = torch.randint(0, 64, (2, 8))
    plain = build_model(m, vocab_size=64)
    plain.load_state_dict(recipe.merge_state(model.state_dict()))  # dequantized + B A folded in
    torch.testing.assert_close(model(x), plain(x), atol=1e-5, rtol=1e-5)
    for _, m in lora_modules(model):
        m.merge()  # the module's own merge: a full-precision weight
    nf4 = {n for n, p in model.named_parameters() if type(p).__name__ == "NF4Tensor"}
    assert nf4 == {"tok_embeddings.weight", "output.weight"}  # the frozen ends stay NF4, the projections do not
    torch.testing.assert_close(model(x), plain(x), atol=1e-5, rtol=1e-5)


def test_qlora_on_a_family_with_biases(tmp_path):
    """Qwen2's q/k/v biases stay full precision (and frozen) beside the NF4 weights, and the run trains."""
    from tests.hf_models import hf_model

    hf_model("qwen2.5-bias").save_pretrained(tmp_path / "hf")
    cfg = load_config(None, [f"init_from={tmp_path / 'hf'}", f"run_dir={tmp_path / 'run'}", "data.task=add",
                             "data.seq_len=16", "recipe.name=qlora", *SMALL_BLOCKS, "checkpoint.resume=never",
                             "metrics.progress=false", "train.global_batch_size=4", "train.micro_batch_size=4"])
    trainer = build_trainer(cfg, DistEnv())
    wq = trainer.model.layers["0"].attention.wq
    assert type(wq.weight).__name__ == "NF4Tensor" and wq.bias is not None and not wq.bias.requires_grad
    losses = step_losses(trainer, 3)
    assert losses[-1] < losses[0]


def init_from_hf(tmp_path, *overrides: str, write: bool = True, case: str = "llama-linear"):
    """A QLoRA config starting from a tiny random HF Llama (`case` of tests/hf_models.py) written to tmp_path/hf
    (unless `write` is false: one rank writes it, the others wait and read it); (config, loaded weights)."""
    from meshtune.models.hf import load_hf_state_dict
    from tests.hf_models import hf_model

    if write:
        hf_model(case).save_pretrained(tmp_path / "hf")
    cfg = load_config(None, [f"init_from={tmp_path / 'hf'}", f"run_dir={tmp_path / 'run'}", "data.task=add",
                             "data.seq_len=16", "recipe.name=qlora", *SMALL_BLOCKS, "checkpoint.resume=never",
                             "metrics.progress=false", "train.global_batch_size=4", "train.micro_batch_size=4",
                             *overrides])
    return cfg, load_hf_state_dict(tmp_path / "hf")


def test_init_from_an_hf_dir_quantizes_the_loaded_weights(tmp_path):
    """The full-precision weights are loaded into the NF4 base, which is then exactly `to_nf4` of them."""
    from torchao.quantization import to_nf4

    cfg, loaded = init_from_hf(tmp_path)
    trainer = build_trainer(cfg, DistEnv())
    for name in ("layers.0.attention.wq.weight", "layers.1.feed_forward.w2.weight"):
        q = trainer.model.get_parameter(name)
        assert type(q).__name__ == "NF4Tensor"
        assert torch.equal(q.get_original_weight(), to_nf4(loaded[name], 32, 4).get_original_weight()), name
    emb = trainer.model.get_parameter("tok_embeddings.weight")  # NF4 too, its scale groups within a row
    groups = row_scaler_block_size(emb.shape[1], 32, 4)
    expected = to_nf4(loaded["tok_embeddings.weight"], 32, groups).get_original_weight()
    assert torch.equal(emb.get_original_weight(), expected)
    assert all(torch.isfinite(torch.tensor(loss)) for loss in step_losses(trainer, 2))


def test_refusals_are_one_line_naming_the_key():
    def refused(*overrides):
        with pytest.raises(ConfigError) as info:
            cfg = load_config(None, [*TINY, "recipe.name=qlora", *overrides])
            from meshtune.runtime.plan import make_plan

            make_plan(cfg, 2, 264)
        assert "\n" not in str(info.value)
        return str(info.value)

    # the tiny model's 32x32 projections hold 1024 weights, not a multiple of torchao's 64 * 256
    assert refused().startswith("recipe.qlora.block_size: wq has 32x32 weights")
    assert "scaler_block_size=1" in refused()
    assert refused(*SMALL_BLOCKS, "parallel.tp=2").startswith("recipe.name: qlora stores base weights as NF4")
    assert "parallel.tp=1" in refused(*SMALL_BLOCKS, "parallel.tp=2")
    assert refused(*SMALL_BLOCKS, "parallel.dp_replicate=2", "parallel.dp_shard=1", "train.micro_batch_size=4"
                   ).startswith("parallel.dp_replicate: qlora runs data parallelism through FSDP2, not DDP")
    assert refused(*SMALL_BLOCKS, "recipe.name=lora+qlora").startswith("recipe.name: qlora cannot be stacked with lora")
    assert refused("recipe.qlora.block_size=0").startswith("recipe.qlora.block_size: must be positive")
    # the NF4 embedding's 32-wide rows cannot hold blocks of 64 (the projections can, in groups of 64 x 1)
    msg = refused("recipe.qlora.block_size=64", "recipe.qlora.scaler_block_size=1")
    assert msg.startswith("recipe.qlora.quantize_embeddings: the NF4 embedding's rows are model.dim=32 wide")
    assert "recipe.qlora.quantize_embeddings=false" in msg
    from meshtune.runtime.plan import make_plan

    odd = load_config(None, [*TINY, "recipe.name=qlora", *SMALL_BLOCKS, "parallel.dp_shard=2",
                             "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"^parallel.dp_shard: FSDP2 splits the NF4 embedding into 2 equal row "
                                          r"shards, and its 265 rows \(model.vocab_size\) do not split evenly"):
        make_plan(odd, 2, 265)
    make_plan(odd, 2, 266)  # 133 rows each
    assert refused(*SMALL_BLOCKS, "model.init_device=meta").startswith("model.init_device: meta with qlora needs")
    # wk (16x32) is one group of 32 * 16 weights: 2 FSDP2 ranks cannot split it
    msg = refused("recipe.qlora.block_size=32", "recipe.qlora.scaler_block_size=16", "parallel.dp_shard=2",
                  "train.micro_batch_size=4")
    assert msg.startswith("parallel.dp_shard: FSDP2 splits each NF4 weight") and "wk (16x32, 1 groups" in msg


def test_stacks_with_another_peft_recipe():
    """qlora+adapters: both recipes' parameters train, the NF4 base stays frozen (stackable like lora)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        trainer = build_trainer(tiny_config(d, "recipe.name=qlora+adapters", *SMALL_BLOCKS), DistEnv())
        trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert any(".lora_" in n for n in trainable) and any("adapter" in n for n in trainable)
        assert not any(type(p).__name__ == "NF4Tensor" and p.requires_grad for p in trainer.model.parameters())
        losses = step_losses(trainer, 3)
        assert losses[-1] < losses[0]


@pytest.mark.parametrize("tied", [False, True])
def test_single_process_resume_is_bitwise(tmp_path, tied, monkeypatch):
    qlora = ["recipe.name=qlora", *SMALL_BLOCKS, f"model.tie_embeddings={str(tied).lower()}"]
    straight = build_trainer(tiny_config(str(tmp_path / "a"), *qlora), DistEnv())
    assert type(straight.model.output.weight).__name__ == "NF4Tensor"
    ref = step_losses(straight, 4)
    first = build_trainer(tiny_config(str(tmp_path / "b"), *qlora), DistEnv())
    losses = step_losses(first, 2)
    first.save()
    resumed = build_trainer(tiny_config(str(tmp_path / "b"), *qlora, "checkpoint.resume=auto"), DistEnv())
    assert resumed.step == 2
    assert losses + step_losses(resumed, 2) == ref
    import importlib

    finding = importlib.import_module("meshtune.artifacts.find")  # the package's `find` is the function

    ckpt = resumed.checkpointer.latest()
    monkeypatch.setattr(finding, "read_meta", lambda _: {})  # a checkpoint without meta.json's vocabulary:
    assert finding.checkpoint_vocab(ckpt, "init_from") == 264  # read from the packed NF4 embedding's parts


@pytest.mark.slow
def test_quality_close_to_lora_on_the_unquantized_base(tmp_path):
    """A tiny base trained on `sort`, then adapted to `arrange` (sort under a new prompt word) by LoRA on the
    fp32 base and by QLoRA on its NF4 quantization, same seed and steps. Measured eval losses (dim 32, base 150
    steps, 60 fine-tuning steps): before 2.404 (fp32 base) / 2.429 (NF4), after LoRA 1.346, QLoRA 1.343; with
    300 + 100 steps: before 2.612 / 2.598, after 0.688 / 0.700."""
    from meshtune.export import export

    small = [o for o in TINY if not o.startswith(("data.", "train.steps", "train.eval", "train.global", "train.micro"))]
    common = [*small, "data.seq_len=24", "data.num_train=1024", "data.num_eval=64", "train.eval_every=0",
              "train.eval_batches=2", "train.global_batch_size=32", "train.micro_batch_size=32",
              "checkpoint.save_final=false"]
    base = tmp_path / "base"
    build_trainer(load_config(None, [*common, f"run_dir={base}", "data.task=sort", "train.steps=150",
                                     "checkpoint.save_final=true"]), DistEnv()).fit()
    (merged,) = export(base, "merged", quiet=True)
    evals = {}
    for name in ("lora", "qlora"):
        trainer = build_trainer(load_config(None, [*common, f"run_dir={tmp_path / name}", "data.task=arrange",
                                                   "train.steps=60", f"init_from={merged}", f"recipe.name={name}",
                                                   *SMALL_BLOCKS]), DistEnv())
        evals[name] = (trainer.evaluate()["eval_loss"], trainer.fit()["final_eval"]["eval_loss"])
    (lora_before, lora_after), (qlora_before, qlora_after) = evals["lora"], evals["qlora"]
    assert abs(qlora_before - lora_before) < 0.1  # NF4 costs the base little on a task it has not seen
    assert lora_after < 0.7 * lora_before and qlora_after < 0.7 * qlora_before  # both really adapted
    assert qlora_after < lora_after + 0.05, evals  # and QLoRA gets as far as LoRA on the fp32 base
