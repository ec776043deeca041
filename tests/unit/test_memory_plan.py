"""The planner's activation and logits bytes (runtime/memory_plan.py) against bytes counted with
torch.autograd.graph.saved_tensors_hooks, per lever, within 10%; and `meshtune validate --device-memory`."""

import pytest
import torch

from meshtune.config import ConfigError, ModelConfig
from meshtune.models import build_model
from meshtune.runtime.chunked_loss import ChunkedLogits
from meshtune.runtime.grads import summed_loss
from meshtune.runtime.memory_plan import activation_bytes, block_elems_per_token, logits_bytes, parse_bytes
from meshtune.runtime.parallelize import apply_activation_checkpointing
from meshtune.runtime.plan_report import describe_plan, model_shapes
from meshtune.schema import load_config

B, T, V = 2, 64, 512


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward, parameters and buffers left out."""

    def __init__(self, model):
        self.skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.seen: dict[int, int] = {}

    def pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    def total(self) -> int:
        return sum(self.seen.values())


@pytest.mark.parametrize("dims", [(64, 4, 2, 0, 0.0), (96, 6, 3, 320, 0.0), (128, 8, 8, 0, 0.0), (64, 4, 2, 0, 50.0)],
                         ids=["64", "96-ffn", "128-mha", "64-softcapped"])
@pytest.mark.parametrize("ac", [None, (1, "full"), (2, "full")], ids=["none", "full", "every2"])
def test_activation_bytes_match_counted(dims, ac):
    dim, heads, kv, ffn, softcap = dims
    family = ["model.family=gemma2", f"model.attn_softcap={softcap}"] if softcap else []
    cfg = ModelConfig(dim=dim, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn, n_layers=4, max_seq_len=T,
                      **({"family": "gemma2", "attn_softcap": softcap} if softcap else {}))
    model = build_model(cfg, V)
    if ac:
        apply_activation_checkpointing(model, *ac)
    counter = SavedBytes(model)
    h = model.tok_embeddings(torch.randint(0, V, (B, T))).detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        for block in model.layers.values():
            h = block(h, model.rope_cos[:T], model.rope_sin[:T])
    shapes = model_shapes(load_config(None, ["data.task=sort", f"model.dim={dim}", f"model.n_heads={heads}",
                                             f"model.n_kv_heads={kv}", f"model.ffn_dim={ffn}",
                                             f"data.seq_len={T}", *family]), V, 1)
    predicted = activation_bytes(shapes, B * T, list(range(4)), 4, ac is not None, *(ac or (1, "full")))
    if ac:  # saved in forward: without the one block's activations that are live only while it is recomputed
        predicted -= block_elems_per_token(shapes, "none") * B * T * 4
    assert abs(counter.total() - predicted) / predicted < 0.10, (counter.total(), predicted)


@pytest.mark.parametrize("softcap", [0.0, 30.0], ids=["plain", "softcapped"])
@pytest.mark.parametrize("chunk", [0, 16, 48])
def test_logits_bytes_kept_for_backward_match_counted(chunk, softcap):
    """Unchunked: the fp32 log-probabilities saved in forward. Chunked: the forward saves no vocabulary-sized
    tensor at all, and backward's recompute of one chunk saves what the plain loss saves for B x chunk
    positions (the checkpoint's recompute bypasses saved-tensor hooks, so that chunk is counted directly)."""
    family = ["model.family=gemma2", f"model.logit_softcap={softcap}"] if softcap else []
    model = build_model(ModelConfig(dim=32, n_heads=4, n_layers=1, max_seq_len=T,
                                    **({"family": "gemma2", "logit_softcap": softcap} if softcap else {})), V)
    hidden = torch.randn(B, T, 32, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    inputs = B * T * (32 * 4 + 8)  # the hidden states and labels (views of them), not logits

    def saved(logits_of, h, lab) -> int:
        counter = SavedBytes(model)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            summed_loss(logits_of(h), lab).backward()
        return counter.total()
    if chunk:
        assert saved(lambda h: ChunkedLogits(h, model.output, chunk, softcap), hidden, labels) <= inputs
        counted = saved(model.logits, hidden[:, :chunk], labels[:, :chunk]) - B * chunk * 32 * 4
    else:
        counted = saved(model.logits, hidden, labels) - B * T * 32 * 4
    shapes = model_shapes(load_config(None, ["data.task=sort", "model.dim=32", "model.n_heads=4", *family]), V, 1)
    predicted = logits_bytes(shapes, B, T, 4, chunk, softcap=bool(softcap))["kept"]
    assert abs(counted - predicted) / predicted < 0.10, (counted, predicted)


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("24GB") == 24e9
    with pytest.raises(ConfigError, match=r"^--device-memory: cannot read"):
        parse_bytes("lots")


def test_validate_prints_each_lever_and_what_fits():
    cfg = load_config(None, ["data.task=sort", "model.vocab_size=131072", "data.seq_len=2048",
                             "model.max_seq_len=2048", "train.micro_batch_size=1", "train.global_batch_size=2"])
    text = describe_plan(cfg, 2, device_memory=2 * 2**30)
    rows = {line.split("  ")[1].strip(): line for line in text.splitlines() if line.startswith("  ") and "->" in line}
    assert "as configured" in rows and "ac_mode=selective_op" in rows and "all levers" in rows
    assert "does not fit" in rows["as configured"]  # 131072 x 2048 logits: 3 GiB at the loss's peak
    assert rows["train.loss_chunk_size=1024"].endswith(" fits")
    assert "fits with: train.loss_chunk_size=1024" in text


def test_planner_counts_stored_bytes_gathered_units_and_a_frozen_head():
    """Parameters as the run stores them (train.frozen_dtype), FSDP2's unsharded units (the root, and the most
    gathered at once: the root twice while it is copied out, or the root and two blocks), and no head gradient
    when the head is frozen (LoRA)."""
    from meshtune.data import build_tokenizer
    from meshtune.runtime.plan_report import _rank_layout
    from meshtune.runtime.preflight import preflight, vocab_size

    def layout(*extra):
        cfg = load_config(None, ["data.task=sort", "model.dim=64", "model.n_layers=4", "model.n_heads=4",
                                 "recipe.name=lora", *extra])
        vocab = vocab_size(cfg, build_tokenizer(cfg.data.tokenizer))
        return _rank_layout(cfg, preflight(cfg, 2), vocab, 0), build_model(cfg.model, vocab, device="meta"), vocab

    fsdp, model, vocab = layout("train.dtype=fp32")
    half, _, _ = layout("train.dtype=bf16", "train.frozen_dtype=bf16")
    ddp, _, _ = layout("train.dtype=fp32", "parallel.dp_replicate=2", "parallel.dp_shard=1")
    lora_bytes = 4 * fsdp["trainable"]
    assert abs((half["param_bytes"] - lora_bytes) * 2 - (fsdp["param_bytes"] - lora_bytes)) <= 64  # shard padding
    block = 4 * sum(p.numel() for p in model.layers["0"].parameters())
    root = 4 * (model.num_params() - 4 * sum(p.numel() for p in model.layers["0"].parameters()))
    lora_block = 2 * lora_bytes / 4  # a block's adapters, gathered from both ranks
    units = fsdp["units"]
    assert abs(units["root"] - root) <= 64 and all(abs(b - block - lora_block) <= 64 for b in units["blocks"])
    assert fsdp["gathered"] == units["root"] + max(units["root"], sum(units["blocks"]))
    assert ddp["gathered"] == 0 and not fsdp["head_trains"]
    s = model_shapes(load_config(None, ["data.task=sort", "model.dim=64"]), vocab, 1)
    frozen, trained = (logits_bytes(s, 1, 64, 4, 0, h)["peak"] for h in (False, True))
    assert trained - frozen == 4 * vocab * 64


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_planner_counts_the_nf4_embedding_and_head(tied):
    """QLoRA's embedding and head (recipe.qlora.quantize_embeddings) at their stored NF4 bytes per rank: switching
    them off adds back exactly their fp32 rows less what torchao's `to_nf4` of a real shard stores, and FSDP2's
    gathered root unit grows by the same on each rank. (The run's own model state equals this layout's:
    tests/distributed/test_qlora_distributed.py.)"""
    from torchao.quantization import to_nf4

    from meshtune.recipes.qlora.nf4 import row_scaler_block_size
    from meshtune.runtime.plan_report import _rank_layout
    from meshtune.runtime.precision import tensor_bytes
    from meshtune.runtime.preflight import preflight

    def layout(on: bool):
        cfg = load_config("finetune/qlora", ["train.dtype=fp32", f"model.tie_embeddings={str(tied).lower()}",
                                             f"recipe.qlora.quantize_embeddings={str(on).lower()}"])
        return _rank_layout(cfg, preflight(cfg, 2), 264, 0), cfg

    (nf4, cfg), (fp32, _) = layout(True), layout(False)
    q, dim = cfg.recipe.qlora, cfg.model.dim
    shard = to_nf4(torch.randn(264 // 2, dim), q.block_size, row_scaler_block_size(dim, q.block_size,
                                                                                   q.scaler_block_size))
    ends = 1 if tied else 2
    saved = ends * (264 // 2 * dim * 4 - tensor_bytes(shard))
    assert fp32["param_bytes"] - nf4["param_bytes"] == saved
    # the gathered root over both ranks (and the all-gather buffer of the largest unit, which may then be a block)
    assert fp32["gathered"] - nf4["gathered"] >= 2 * saved
    assert nf4["params"] == fp32["params"] and nf4["trainable"] == fp32["trainable"]


def test_validate_prints_the_nf4_dequantization_and_the_moments():
    """QLoRA: the largest projection's whole-weight dequantization (`nf4_linear_bytes`, counted in
    tests/unit/test_nf4_memory.py) is its own column, and the peak is the state plus the busiest moment."""
    from meshtune.models.sizes import ffn_hidden_dim
    from meshtune.recipes.qlora.nf4 import nf4_linear_bytes
    from meshtune.runtime.plan_report import planned_memory

    cfg = load_config("finetune/qlora", ["train.dtype=fp32"])
    plan = planned_memory(cfg, 2)
    assert plan["dequantized"] == nf4_linear_bytes(cfg.model.dim * ffn_hidden_dim(cfg.model), 4)
    assert plan["moments"]["block"] >= plan["dequantized"]
    assert plan["total"] == sum(plan["state"].values()) + max(plan["moments"].values())
    text = describe_plan(cfg, 2)
    assert "/ dequantized -> peak" in text and "moments beyond the model state, as configured" in text
    assert planned_memory(load_config("finetune/lora", ["train.dtype=fp32"]), 2)["dequantized"] == 0


def test_planner_gathers_projection_units():
    """`meshtune validate`'s FSDP2 units with parallel.fsdp_unit=linear: the two largest projections (three under
    activation checkpointing: a block's last stays gathered while the rest are recomputed), each with what a block
    unit keeps (its norms), in place of two blocks; a unit's reduce-scatter is a projection's. (Counted in real
    steps on gloo ranks: tests/distributed/test_fsdp_units.py.)"""
    from meshtune.runtime.fsdp_units import projections
    from meshtune.runtime.plan_report import _rank_layout
    from meshtune.runtime.preflight import preflight

    def layout(unit: str):
        cfg = load_config(None, ["data.task=sort", "model.dim=64", "model.ffn_dim=256", "model.n_layers=4",
                                 "model.n_heads=4", "train.dtype=fp32", f"parallel.fsdp_unit={unit}"])
        return _rank_layout(cfg, preflight(cfg, 2), 264, 0), build_model(cfg.model, 264, device="meta")

    (block, model), (linear, _) = layout("block"), layout("linear")
    first = model.layers["0"]
    sizes = sorted((4 * sum(p.numel() for p in m.parameters()) for m in projections(model, first)), reverse=True)
    rest = 4 * sum(p.numel() for n, p in first.named_parameters() if "norm" in n)
    whole = 4 * sum(p.numel() for p in first.parameters())
    assert sizes[0] == 4 * 64 * 256 and whole == sum(sizes) + rest  # the MLP projections are the largest

    def near(got: list, want: list) -> bool:  # up to 64 B of shard padding a unit
        return len(got) == len(want) and all(abs(g - w) <= 64 for g, w in zip(got, want, strict=True))
    assert near(block["units"]["blocks"], [whole, whole]) and block["units"]["blocks_ac"] == block["units"]["blocks"]
    assert near(linear["units"]["blocks"], [sizes[0] + rest, sizes[1] + rest])
    assert near(linear["units"]["blocks_ac"], [sizes[0] + rest, sizes[1] + rest, sizes[2]])
    assert linear["units"]["root"] == block["units"]["root"] and linear["param_bytes"] == block["param_bytes"]
    root = 4 * model.num_params() - 4 * whole  # the embedding, head and final norm: here larger than a projection
    assert abs(block["reduced"] - whole) <= 64 and abs(linear["reduced"] - max(root, sizes[0])) <= 64  # full FT


def test_validate_offers_linear_units_as_a_lever():
    """`meshtune validate` on block units shows what parallel.fsdp_unit=linear would gather, in the lever table
    and in "all levers"; a layout that already has them, or no FSDP2 sharding, shows no such row."""
    name = "fsdp_unit=linear (one projection gathered)"

    def rows(*extra):
        cfg = load_config(None, ["data.task=sort", "model.dim=64", "model.ffn_dim=256", "model.n_layers=4",
                                 "model.n_heads=4", *extra])
        table = [line for line in describe_plan(cfg, 2).splitlines() if line.startswith("  ") and " -> " in line]
        return {line[2:50].strip(): [float(x) for x in line[50:].replace("->", "/").split("/")] for line in table}

    block, linear = rows(), rows("parallel.fsdp_unit=linear")
    gathered, peak = 3, -1  # parameters / gradients / optimizer / gathered / activations / logits / dequantized -> peak
    assert block[name][gathered] == linear["as configured"][gathered] < block["as configured"][gathered]
    assert block[name][peak] == linear["as configured"][peak] < block["as configured"][peak]
    assert block["all levers"] == linear["all levers"]
    assert name not in linear and name not in rows("parallel.dp_replicate=2", "parallel.dp_shard=1")


def test_validate_offers_vocab_parallel_as_a_lever():
    """Where a config allows parallel.vocab_parallel, the lever table shows its row (and with fsdp_unit=linear):
    the same numbers as the config with the keys set; a config that has it, or cannot have it, shows none."""
    alone, both = "vocab_parallel (embedding/head by vocab rows)", "vocab_parallel + fsdp_unit=linear"

    def rows(*extra):
        cfg = load_config(None, ["data.task=sort", "model.dim=64", "model.ffn_dim=256", "model.n_layers=4",
                                 "model.n_heads=4", "model.vocab_size=4096", "recipe.name=lora", *extra])
        table = [line for line in describe_plan(cfg, 2).splitlines() if line.startswith("  ") and " -> " in line]
        return {line[2:50].strip(): [float(x) for x in line[50:].split("fits")[0].replace("->", "/").split("/")]
                for line in table}

    plain = rows()
    assert plain[alone] == rows("parallel.vocab_parallel=true")["as configured"]
    assert plain[both] == rows("parallel.vocab_parallel=true", "parallel.fsdp_unit=linear")["as configured"]
    gathered, peak = 3, -1
    assert plain[both][peak] <= plain[alone][peak] < plain["as configured"][peak]  # GiB to 3 decimals: a tiny block
    assert plain[alone][gathered] < plain["as configured"][gathered]  # the 4096-row table is never gathered
    assert alone not in rows("parallel.vocab_parallel=true")
    assert alone not in rows("parallel.tp=2", "parallel.dp_shard=1")  # no FSDP2 sharding: not a lever


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_softcapped_attention_keeps_eight_bytes_per_score(dtype):
    """model.attn_softcap's explicit attention (the planner's `scores` term): beside q, k and v, what autograd keeps
    is 8 bytes per score in either precision (fp32: capped scores + softmax; bf16: capped scores, the fp32 softmax
    and its bf16 copy)."""
    from meshtune.models.decoder import attention

    H, D = 4, 16
    q, k, v = (torch.randn(B, H, T, D, dtype=dtype, requires_grad=True) for _ in range(3))
    counter = SavedBytes(torch.nn.Module())
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        attention(q, k, v, None, None, 30.0).float().sum().backward()
    qkv = 3 * B * H * T * D * q.element_size()
    mask = T * T  # the causal mask (bool), shared by every head
    scores = B * H * T * T
    assert counter.total() - qkv - mask == 8 * scores, (counter.total() - qkv - mask, 8 * scores)
