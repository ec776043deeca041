"""`meshtune export` end to end: a LoRA run trained under FSDP2 (dp_shard=2) on 2 gloo ranks, exported in
this process (world size 1) as an adapter, merged weights and a Hugging Face PEFT directory; and the CLI's
one-line errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from meshtune.cli import main
from meshtune.config import ModelConfig

STEPS = 3


def train_lora_fsdp(run_dir: str) -> dict:
    """On every rank: a few LoRA steps under FSDP2 with a final checkpoint; the gathered parameters, which
    LoRA tensors were sharded on this rank, and the trained model's logits on fixed tokens."""
    from torch.distributed.tensor import DTensor

    from meshtune.runtime.data_parallel import unwrap
    from meshtune.runtime.run import build_trainer
    from tests.distributed.cases import full_params, layout, tiny_config

    cfg = tiny_config(run_dir, *layout(1, 2, 4), "recipe.name=lora", "recipe.lora.rank=4", "recipe.lora.alpha=8",
                      f"train.steps={STEPS}", "checkpoint.save_final=true")
    trainer = build_trainer(cfg)
    trainer.fit()
    model = unwrap(trainer.model)
    sharded = {n for n, p in model.named_parameters()
               if ".lora_" in n and isinstance(p, DTensor) and p.to_local().shape != p.shape}
    params = full_params(trainer.model)
    model.eval()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)  # (B, T, V): FSDP gathers the shards; every rank feeds the same tokens
    return {"params": params, "sharded": sharded, "tokens": x, "logits": logits}


@pytest.fixture(scope="module")
def lora_run(rank_pool, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "lora"
    r0, r1 = rank_pool(2).run(train_lora_fsdp, str(run_dir))
    assert r0["sharded"] and r0["sharded"] == r1["sharded"]  # the adapters really were split over the ranks
    return run_dir, r0


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["export", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_adapter_holds_full_trained_lora_tensors(lora_run, tmp_path, capsys):
    from safetensors import safe_open

    run_dir, r = lora_run
    code, out, _ = run_cli(capsys, run_dir, "--format", "adapter", "--out", tmp_path)
    assert code == 0
    path = tmp_path / "adapter.safetensors"
    assert f"wrote {path} (" in out and "KiB)" in out
    trained = {n: t for n, t in r["params"].items() if ".lora_" in n}
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(trained)
        for name, t in trained.items():
            saved = f.get_tensor(name)
            assert saved.shape == t.shape and torch.equal(saved, t), name  # full-size, not a shard or empty
        meta = f.metadata()
    assert meta["meshtune.recipe"] == "lora" and meta["meshtune.step"] == str(STEPS)
    assert '"rank": 4' in meta["meshtune.recipe_config"]
    assert any(t.abs().sum() > 0 for n, t in trained.items() if ".lora_b." in n)  # B moved off zero


def test_merged_weights_reproduce_the_lora_model(lora_run, tmp_path):
    from safetensors.torch import load_file

    from meshtune.artifacts import find, load_run, run_config
    from meshtune.export import export
    from meshtune.models import build_model

    run_dir, r = lora_run
    (path,) = export(run_dir, "merged", out=tmp_path, quiet=True)
    state = load_file(str(path))
    assert not any(".lora_" in k for k in state)
    plain = build_model(run_config(run_dir).model, state["tok_embeddings.weight"].shape[0])
    plain.load_state_dict(state)  # strict: exactly the base model's names
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(r["tokens"]), r["logits"], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the model export builds in one process is the trained one, LoRA unmerged
        torch.testing.assert_close(load_run(find(run_dir)).model(r["tokens"]), r["logits"], atol=1e-5, rtol=1e-5)
    # the merged weights hold the LoRA update
    assert not torch.equal(state["layers.0.attention.wq.weight"], r["params"]["layers.0.attention.wq.weight"])


def hf_llama_state(state: dict, cfg: ModelConfig) -> dict:
    """meshtune base weights -> HF LlamaForCausalLM names (q/k rows permuted to rotate-half)."""
    from meshtune.models.hf import to_hf_state_dict

    return to_hf_state_dict({k: v for k, v in state.items() if "lora_" not in k}, cfg)


def assert_peft_logits(run_dir, r: dict, peft_dir) -> None:
    """The run's frozen base (r["params"] without adapters) in a transformers Llama, `peft_dir` loaded onto it
    with PeftModel: the same logits as meshtune's (r["logits"] of r["tokens"]) within 1e-4."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from meshtune.artifacts import run_config

    m = run_config(run_dir).model
    vocab = r["params"]["tok_embeddings.weight"].shape[0]
    ffn = r["params"]["layers.0.feed_forward.w1.weight"].shape[0]
    hf_cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=m.dim, intermediate_size=ffn,
                                      num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                                      num_key_value_heads=m.n_kv_heads, max_position_embeddings=m.max_seq_len,
                                      rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
                                      tie_word_embeddings=m.tie_embeddings)
    hf = transformers.LlamaForCausalLM(hf_cfg)
    base = {k: v for k, v in r["params"].items() if ".lora_" not in k}  # the frozen base, unmerged
    missing, unexpected = hf.load_state_dict(hf_llama_state(base, m), strict=False)
    assert not unexpected and all("rotary" in k or k == "lm_head.weight" and m.tie_embeddings for k in missing), missing
    hf = peft.PeftModel.from_pretrained(hf, str(peft_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(r["tokens"]).logits, r["logits"], atol=1e-4, rtol=1e-4)


def test_peft_export_loads_onto_hf_llama(lora_run, capsys):
    run_dir, r = lora_run
    code, out, _ = run_cli(capsys, run_dir, "--format", "peft")  # default out: RUN_DIR/peft
    assert code == 0
    peft_dir = run_dir / "peft"
    assert {p.name for p in peft_dir.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert "adapter_model.safetensors (" in out
    assert_peft_logits(run_dir, r, peft_dir)


def test_hf_export_loads_in_transformers(lora_run, capsys):
    """--format hf of the FSDP2 LoRA run: LoRA folded in, default out RUN_DIR/hf, the trained model's logits."""
    transformers = pytest.importorskip("transformers")
    run_dir, r = lora_run
    code, out, _ = run_cli(capsys, run_dir, "--format", "hf")
    assert code == 0 and "no tokenizer files copied" in out  # the run used the byte tokenizer
    assert {p.name for p in (run_dir / "hf").iterdir()} == {"config.json", "model.safetensors"}
    hf = transformers.LlamaForCausalLM.from_pretrained(run_dir / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(r["tokens"]).logits, r["logits"], atol=1e-4, rtol=1e-4)


def test_export_newest_and_named_step(lora_run, tmp_path, capsys):
    run_dir, _ = lora_run
    code, out, _ = run_cli(capsys, run_dir, "--format", "merged", "--out", tmp_path, "--step", STEPS)
    assert code == 0 and f"step {STEPS}" in out and (tmp_path / "model.safetensors").is_file()


# ---- one-line errors, exit code 2 ------------------------------------------------------------------------


def fake_run(tmp_path, lora_run, recipe: str | None = None, checkpoint: bool = True):
    """A copy of the LoRA run's config.yaml (optionally with another recipe), with or without its checkpoint."""
    src, _ = lora_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    text = (src / "config.yaml").read_text()
    if recipe is not None:
        text = text.replace("name: lora", f"name: {recipe!r}" if recipe else "name: ''")
    (run_dir / "config.yaml").write_text(text)
    if checkpoint:
        shutil.copytree(src / "checkpoints", run_dir / "checkpoints")
    return run_dir


@pytest.mark.parametrize("case, expected", [
    ("missing run dir", "no such run directory"),
    ("no config.yaml", "config.yaml: not found"),
    ("no checkpoint", "no complete checkpoint; train the run"),
    ("bad format", "--format: 'onnx' is not one of merged, adapter, peft, hf"),
    ("missing format", "--format: missing"),
    ("unsaved step", "--step 99: no complete checkpoint"),
    ("bad step", "--step: 'last' is not a step number"),
    ("peft of adapters", "--format peft: Hugging Face PEFT export covers recipe.name=lora only"),
    ("merged of prefix", "--format merged: recipe 'prefix' adds modules that cannot be folded"),
    ("hf of adapters", "--format hf: recipe 'adapters' adds modules that cannot be folded"),
    ("adapter of full training", "--format adapter: this run has no recipe"),
])
def test_cli_errors_are_one_line(lora_run, tmp_path, capsys, case, expected):
    run_dir = lora_run[0]
    argv = {  # built lazily: only the case's own fake run is written
        "missing run dir": lambda: [tmp_path / "nope", "--format", "merged"],
        "no config.yaml": lambda: [tmp_path, "--format", "merged"],
        "no checkpoint": lambda: [fake_run(tmp_path, lora_run, checkpoint=False), "--format", "adapter"],
        "bad format": lambda: [run_dir, "--format", "onnx"],
        "missing format": lambda: [run_dir],
        "unsaved step": lambda: [run_dir, "--format", "adapter", "--step", "99"],
        "bad step": lambda: [run_dir, "--format", "adapter", "--step", "last"],
        "peft of adapters": lambda: [fake_run(tmp_path, lora_run, "adapters"), "--format", "peft"],
        "merged of prefix": lambda: [fake_run(tmp_path, lora_run, "prefix"), "--format", "merged"],
        "hf of adapters": lambda: [fake_run(tmp_path, lora_run, "adapters"), "--format", "hf"],
        "adapter of full training": lambda: [fake_run(tmp_path, lora_run, ""), "--format", "adapter"],
    }[case]()
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("meshtune: error: ") and expected in err, err
