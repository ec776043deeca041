"""`meshtune export` of a QLoRA run trained under FSDP2 (dp_shard=2, NF4 base) on 2 gloo ranks, in this
process: merged / hf dequantize the NF4 base and fold LoRA in (full precision); peft is LoRA's adapter, which
PEFT applies on the dequantized base."""

from __future__ import annotations

import pytest
import torch

from meshtune.cli import main
from tests.integration.test_export import assert_peft_logits

STEPS = 3
QLORA = ["recipe.name=qlora", "recipe.lora.rank=4", "recipe.lora.alpha=8", "recipe.qlora.block_size=32",
         "recipe.qlora.scaler_block_size=4"]


def train_qlora_fsdp(run_dir: str, tied: bool) -> dict:
    """On every rank: a few QLoRA steps under FSDP2 with a final checkpoint; the parameters (NF4 dequantized)
    and the trained model's logits on fixed tokens."""
    from meshtune.runtime.data_parallel import unwrap
    from meshtune.runtime.run import build_trainer
    from tests.distributed.cases import layout, tiny_config
    from tests.distributed.test_qlora_distributed import full_params

    cfg = tiny_config(run_dir, *layout(1, 2, 4), *QLORA, f"train.steps={STEPS}", "checkpoint.save_final=true",
                      f"model.tie_embeddings={str(tied).lower()}")
    trainer = build_trainer(cfg)
    trainer.fit()
    model = unwrap(trainer.model)
    ends = {n: type(p.to_local()).__name__ for n, p in model.named_parameters(remove_duplicate=False)
            if n in ("tok_embeddings.weight", "output.weight")}
    params = full_params(trainer.model)
    model.eval()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
    return {"params": params, "tokens": x, "logits": logits, "ends": ends}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def qlora_run(rank_pool, tmp_path_factory, request):
    """A QLoRA run whose embedding and head (untied, or one tied matrix) were NF4 too."""
    run_dir = tmp_path_factory.mktemp("export") / "qlora"
    r0, r1 = rank_pool(2).run(train_qlora_fsdp, str(run_dir), request.param)
    torch.testing.assert_close(r0["logits"], r1["logits"])
    assert r0["ends"] == {"tok_embeddings.weight": "NF4Tensor", "output.weight": "NF4Tensor"}, r0["ends"]
    return run_dir, r0


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["export", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_merged_export_is_the_dequantized_base_plus_lora(qlora_run, tmp_path):
    from safetensors.torch import load_file

    from meshtune.artifacts import find, load_run, run_config
    from meshtune.export import export
    from meshtune.models import build_model

    run_dir, r = qlora_run
    (path,) = export(run_dir, "merged", out=tmp_path, quiet=True)
    state = load_file(str(path))
    assert not any(".lora_" in k for k in state)
    assert all(state[k].dtype == torch.float32 for k in ("layers.0.attention.wq.weight", "tok_embeddings.weight"))
    plain = build_model(run_config(run_dir).model, state["tok_embeddings.weight"].shape[0])
    plain.load_state_dict(state)  # strict: exactly the base model's names, plain fp32 tensors
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(r["tokens"]), r["logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_run(find(run_dir)).model(r["tokens"]), r["logits"], atol=1e-5, rtol=1e-5)


def test_peft_export_on_the_dequantized_base(qlora_run, capsys):
    run_dir, r = qlora_run
    code, out, err = run_cli(capsys, run_dir, "--format", "peft")
    assert code == 0, err
    assert_peft_logits(run_dir, r, run_dir / "peft")  # r["params"]: the NF4 base dequantized, and the adapters


def test_hf_export_loads_in_transformers(qlora_run, capsys):
    transformers = pytest.importorskip("transformers")
    run_dir, r = qlora_run
    code, _, err = run_cli(capsys, run_dir, "--format", "hf")
    assert code == 0, err
    hf = transformers.LlamaForCausalLM.from_pretrained(run_dir / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(r["tokens"]).logits, r["logits"], atol=1e-4, rtol=1e-4)
