"""QAT and quantized export (meshtune.recipes.qat, meshtune.quantized): one process, tiny model, CPU."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from meshtune.config import ConfigError, ModelConfig
from meshtune.models import build_model
from meshtune.recipes import RecipeConfig, apply_recipes, build_recipes
from meshtune.recipes.lora import LoRAConfig, lora_modules
from meshtune.recipes.qat import QATLinear, QATLoRALinear, QuantConfig, convert, prepare, ptq, qat_modules
from meshtune.schema import load_config

pytest.importorskip("torchao")

V = 64
MCFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
LEVELS = {"int8-int4": 7.5, "int8-int8": 127.5}  # symmetric scale = max|w| / LEVELS (torchao's choose_qparams)


def base_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(MCFG, vocab_size=V)


def tokens(seed: int = 1, batch: int = 3, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def torchao_prepared(model, c: QuantConfig):
    """The reference: torchao's own QAT prepare step on the same layers."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    from meshtune.recipes.qat import base_config

    names = [n for n, _ in qat_modules(prepare(copy.deepcopy(model), c))]
    quantize_(model, QATConfig(base_config(c), step="prepare"), filter_fn=lambda m, fqn: fqn in names)
    return model


@pytest.mark.parametrize("scheme", ["int8-int4", "int8-int8"])
def test_fake_quant_round_trip_error_bounds(scheme):
    c = QuantConfig(scheme=scheme, group_size=16)
    model = prepare(base_model(), c)
    layer = model.layers["0"].feed_forward.w2
    w = layer.weight.detach()
    fq = layer.fake_quantized_weight().detach()
    groups, fq_groups = w.view(w.shape[0], -1, 16), fq.view(w.shape[0], -1, 16)
    scale = groups.abs().amax(-1, keepdim=True) / LEVELS[scheme]
    assert ((fq_groups - groups).abs() <= scale / 2 + 1e-7).all()  # rounding error at most half a step
    q = fq_groups / scale  # integer levels in the signed range
    assert torch.allclose(q, q.round(), atol=1e-3)
    lo, hi = (-8, 7) if scheme == "int8-int4" else (-128, 127)
    assert q.round().min() >= lo and q.round().max() <= hi
    assert (fq != w).any()


@pytest.mark.parametrize("scheme", ["int8-int4", "int8-int8"])
def test_forward_and_gradients_equal_torchao_fake_quantized_linear(scheme):
    """Two micro-batches (one cached fake quantization) then a step: outputs and accumulated gradients equal
    torchao's FakeQuantizedLinear, which fake-quantizes in every forward; the cache is renewed after the step."""
    c = QuantConfig(scheme=scheme)
    ours, ref = prepare(base_model(), c), torchao_prepared(base_model(), c)
    assert isinstance(ours.layers["0"].attention.wq, QATLinear)
    assert type(ref.layers["0"].attention.wq).__name__ == "FakeQuantizedLinear"
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ours, ref)]
    recipe = build_recipes(RecipeConfig(name="qat", qat=c))[0]
    for step in range(2):
        for mb in range(2):
            x = tokens(seed=10 * step + mb)
            out, want = ours(x), ref(x)
            assert (out - want).abs().max() < 1e-5
            F.cross_entropy(out.flatten(0, 1), x.flatten()).backward()
            F.cross_entropy(want.flatten(0, 1), x.flatten()).backward()
        for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
            assert (p.grad - q.grad).abs().max() <= 1e-6 * max(1.0, float(q.grad.abs().max())), n
        for o in opts:
            o.step()
            o.zero_grad()
        recipe.after_optimizer_step(ours)
        with torch.no_grad():  # the same new weights in both (a 1e-7 gap could flip a rounding, 1e-3 in output)
            for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
                q.copy_(p)
    # without after_optimizer_step, an in-place weight update still renews the cache (version counter)
    with torch.no_grad():
        for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
            p.mul_(1.5)
            q.mul_(1.5)
        assert torch.equal(ours(tokens()), ref(tokens()))


def test_straight_through_gradient():
    """grad of the real weight = grad of a plain linear whose weight is the fake-quantized one, except where
    torchao's rounding clamped (the STE mask)."""
    layer = prepare(base_model(), QuantConfig()).layers["1"].attention.wo
    x = torch.randn(4, 5, 32)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    wfq = layer.fake_quantized_weight().detach().requires_grad_()
    F.linear(layer.activation_fake_quantizer(x), wfq).backward(g)
    mask = torch.ones(wfq.numel(), dtype=torch.bool)
    mask[layer.quantized_weight()[3]] = False  # the flat indices of the clamped codes
    mask = mask.view(wfq.shape)
    assert mask.float().mean() > 0.9  # clamping is the exception (the max of a group rounding up)
    assert torch.equal(layer.weight.grad, wfq.grad * mask)


@pytest.mark.parametrize("scheme,group_size", [("int8-int4", 32), ("int8-int8", 32), ("int8-int4", 0)])
def test_convert_matches_prepared_and_ptq_and_exports(scheme, group_size):
    c = QuantConfig(scheme=scheme, group_size=group_size,
                    targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"])
    prepared = prepare(base_model(), c)
    x = tokens()
    with torch.no_grad():
        fake = prepared(x)
        converted = convert(copy.deepcopy(prepared), c)
        real = converted(x)
        plain = base_model()(x)
        post = ptq(base_model(), c)(x)
    assert type(converted.layers["0"].attention.wq.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(converted.output.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert (real - fake).abs().max() < 1e-4  # the real kernels compute what training simulated
    assert torch.equal(real, post)  # untrained QAT converts to exactly PTQ of the same weights
    assert (real - plain).abs().max() > 1e-4  # and quantization did change something
    program = torch.export.export(converted, (x,))
    assert torch.equal(program.module()(x), real)


def test_lora_plus_qat_fake_quantizes_base_only_and_exports_merged():
    cfg = RecipeConfig(name="lora+qat", lora=LoRAConfig(rank=4, targets=["wq", "w2"]), qat=QuantConfig())
    recipes = build_recipes(cfg)
    model = apply_recipes(base_model(), recipes)
    wq = model.layers["0"].attention.wq
    assert isinstance(wq, QATLoRALinear) and isinstance(model.layers["0"].attention.wk, QATLinear)
    assert not isinstance(wq.lora_a, QATLinear)  # the LoRA path stays full precision
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        wq.lora_b.weight.normal_(0, 0.1)
    x = torch.randn(2, 3, 32)
    want = (F.linear(wq.activation_fake_quantizer(x), wq.weight_fake_quantizer(wq.weight))
            + wq.lora_b(wq.lora_a(x)) * wq.scaling)
    assert torch.allclose(wq(x), want, atol=1e-6)
    wq(x).sum().backward()
    assert wq.weight.grad is None and wq.lora_a.weight.grad is not None
    # export: LoRA merged into W, then W quantized = PTQ of the merged plain weights
    merged = copy.deepcopy(model)
    for _, m in lora_modules(merged):
        m.merge()
    state = {k: v for k, v in merged.state_dict().items() if ".lora_" not in k}
    plain = base_model()
    plain.load_state_dict(state)
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(convert(copy.deepcopy(model), cfg.qat)(ids), ptq(plain, cfg.qat)(ids))
    assert not any(".lora_" in k for k in convert(model, cfg.qat).state_dict())


def test_bad_input_errors():
    with pytest.raises(ConfigError, match=r"recipe\.qat\.targets: 'tok_embeddings' matches tok_embeddings"):
        prepare(base_model(), QuantConfig(targets=["tok_embeddings"]))
    with pytest.raises(ConfigError, match=r"recipe\.qat\.targets: 'attention_norm' matches .*RMSNorm"):
        prepare(base_model(), QuantConfig(targets=["attention_norm"]))
    with pytest.raises(ConfigError, match=r"recipe\.qat\.targets: 'nope' matches no linear layer"):
        prepare(base_model(), QuantConfig(targets=["nope"]))
    with pytest.raises(ConfigError, match=r"recipe\.qat\.group_size: 64 does not divide in_features=32"):
        prepare(base_model(), QuantConfig(group_size=64))
    with pytest.raises(ConfigError, match=r"recipe\.qat\.scheme"):
        load_config(None, ["data.task=sort", "recipe.qat.scheme=int3"])
    with pytest.raises(ConfigError, match=r"recipe\.qat\.group_size: must be >= 0"):
        load_config(None, ["data.task=sort", "recipe.qat.group_size=-1"])
    with pytest.raises(ConfigError, match=r"parallel\.tp=1"):
        load_config(None, ["data.task=sort", "recipe.name=qat", "parallel.tp=2"])
    for name in ("prune+qat", "qat+prune"):  # QAT's module swap would drop the masks (structured: a crash)
        with pytest.raises(ConfigError, match=rf"recipe\.name: {re.escape(name)} stacks prune and qat"):
            load_config(None, ["data.task=sort", f"recipe.name={name}"])


def test_int4_codes_pack_two_to_a_byte():
    from meshtune.artifacts.quantized import pack_int4, unpack_int4

    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3)[:-1].reshape(47)  # every code, an odd count
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == 24
    assert torch.equal(unpack_int4(packed, (47,)), q)
    w = torch.randint(-8, 8, (6, 10), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(w), (6, 10)), w)


@pytest.mark.parametrize("recipe", ["qat", ""])
def test_quantized_export_round_trip(tmp_path, recipe, capsys):
    """A trained run -> `--format quantized` (QAT convert or PTQ) -> load_quantized runs, equal outputs, smaller."""
    from meshtune.artifacts import find, load_run
    from meshtune.artifacts.quantized import load_quantized
    from meshtune.export import export
    from meshtune.export.quantized import quantize_loaded
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer

    cfg = load_config(None, ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=32",
                             "data.task=reverse", "data.seq_len=24", "data.num_train=64", "data.num_eval=8",
                             "train.steps=2", "train.global_batch_size=8", "train.micro_batch_size=4",
                             "train.eval_every=0", "checkpoint.resume=never", "metrics.progress=false",
                             f"run_dir={tmp_path / 'run'}", f"recipe.name={recipe}", "recipe.qat.group_size=16"])
    build_trainer(cfg, DistEnv()).fit()
    (path,) = export(cfg.run_dir, "quantized")
    out = capsys.readouterr().out
    assert ("QAT int8-int4" if recipe else "PTQ int8-int4") in out and "smaller" in out
    assert re.search(r"eager decode \d+ tokens/s vs \d+ fp32 \(\d+\.\d\dx, batch 1", out), out
    loaded = load_quantized(path)
    want, _, _ = quantize_loaded(load_run(find(cfg.run_dir)))
    ids = tokens(seq=24)
    with torch.no_grad():
        assert torch.equal(loaded(ids), want(ids))
    fp32 = sum(t.numel() * 4 for t in load_run(find(cfg.run_dir)).state.values())
    assert path.stat().st_size < 0.6 * fp32
    (p8,) = export(cfg.run_dir, "quantized", out=tmp_path / "q8", quiet=True,
                   scheme=None if recipe else "int8-int8")
    assert p8.is_file()
    if not recipe:  # int4 codes are packed two to a byte: the int4 file is smaller than the int8 one
        assert path.stat().st_size < p8.stat().st_size
