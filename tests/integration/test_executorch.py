"""`meshtune export --format executorch` and `meshtune generate`: a tiny Gemma-3-style run (q/k norms, a sliding
window shorter than the test sequences, local rotary tables, sandwich norms, tied embeddings) trained for a few
steps, exported as fp32, int8-int8 and int8-int4 programs, run in the ExecuTorch runtime against meshtune's eager
model: logits, greedy tokens, the cache-length limit and the missing-extra error."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from meshtune.cli import main
from meshtune.config import ConfigError

pytest.importorskip("executorch.runtime", reason="the executorch extra is not installed")

FEATURES = ["model.family=gemma3", "model.qk_norm=true", "model.sliding_window=6",
            "model.layer_types=[sliding_attention,full_attention]", "model.rope_local_theta=10000",
            "model.norm_offset=true", "model.sandwich_norm=true", "model.embed_scale=true", "model.mlp_act=gelu_tanh",
            "model.attn_scale=16", "model.tie_embeddings=true"]
PROMPTS = ["reverse: abcdef\n", "reverse: zyxw\n", "reverse: hello\n", "reverse: mesh\n"]
NEW = 12  # the prompts' 16-17 tokens + 12 fit the 32-position cache
# max |program - torchao eager| / max |logit|. XNNPACK keeps int4 group scales of linears in bf16: against
# torchao's model with fp32 scales the int8-int4 program is ~1e-2 off (measured); with the linears' scales rounded
# to bf16 (the embedding kernel keeps fp32 scales), ~4e-7. int8-int8 (per-channel fp32 scales): ~3e-7.
QUANT_BOUND = 1e-5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer
    from tests.distributed.cases import tiny_config

    root = tmp_path_factory.mktemp("executorch")
    cfg = tiny_config(str(root / "run"), *FEATURES, "train.steps=60", "checkpoint.save_final=true")
    build_trainer(cfg, DistEnv()).fit()
    return root / "run"


@pytest.fixture(scope="module")
def programs(run, tmp_path_factory):
    """scheme -> (program dir, the eager model it was exported from: fp32, or torchao-quantized as the program is:
    block linears, head and embedding)."""
    from meshtune.artifacts import find, find_checkpoint, load_run
    from meshtune.export import export
    from meshtune.export.executorch import program_model, program_scheme, quantize_program_model

    out = {}
    for scheme in ("fp32", "int8-int8", "int8-int4"):
        folder = tmp_path_factory.mktemp(scheme)
        export(run, "executorch", folder, scheme=scheme, quiet=True)
        loaded = load_run(find(find_checkpoint(run, None), key="RUN_DIR"))
        _, qcfg = program_scheme(loaded, scheme)
        model = program_model(loaded)
        out[scheme] = (folder, model if qcfg is None else quantize_program_model(model, qcfg)[0])
    return out


def eager_greedy(model, prompt: list[int], new: int, stops) -> list[int]:
    """Argmax continuation with the eager model, recomputing the whole sequence each step."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(new):
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


def program_logits(program, tokens: list[int]) -> torch.Tensor:
    """(T, V) through the program as generation feeds it: a prefill of 12 tokens, then one at a time."""
    rows = [program.forward(tokens[:12], 0)]
    rows += [program.forward([t], 12 + i) for i, t in enumerate(tokens[12:])]
    return torch.cat(rows)


def tokens(n: int = 20) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def test_files_and_config(programs):
    from torchao.quantization import IntxUnpackedToInt8Tensor

    folder, model = programs["int8-int4"]
    # the head and the (tied) embedding are quantized too, each its own copy
    assert all(isinstance(m.weight, IntxUnpackedToInt8Tensor) for m in (model.output, model.tok_embeddings))
    assert model.output.weight is not model.tok_embeddings.weight
    meta = json.loads((folder / "model.json").read_text())
    assert (folder / "model.pte").stat().st_size > 0
    assert meta["scheme"] == "int8-int4" and meta["group_size"] == 32 and meta["max_seq_len"] == 32
    assert meta["head"].startswith("int8 dynamic activations, int4 weights (groups of 32")
    assert meta["embedding"].startswith("int4 weight-only (groups of 32")
    assert meta["tokenizer"] == "byte" and meta["stop_ids"] == [258] and meta["bos"] == [257]


def test_fp32_program_logits_equal_eager(programs):
    from meshtune.inference_pte import PteProgram

    folder, model = programs["fp32"]
    x = tokens()
    with torch.no_grad():
        ref = model(torch.tensor([x]))[0]
    got = program_logits(PteProgram(folder / "model.pte"), x)
    print(f"fp32: max |program - eager| = {float((got - ref).abs().max()):.1e} "
          f"(max |logit| {float(ref.abs().max()):.1f})")
    assert (got - ref).abs().max() <= 1e-4  # 20 tokens: past the 6-token window


@pytest.mark.parametrize("scheme", ["int8-int8", "int8-int4"])
def test_quantized_program_logits_match_torchao_eager(programs, scheme):
    from torchao.quantization import IntxUnpackedToInt8Tensor

    from meshtune.inference_pte import PteProgram

    folder, model = programs[scheme]
    model = copy.deepcopy(model)
    x = torch.tensor([tokens()])
    got = program_logits(PteProgram(folder / "model.pte"), x[0].tolist())
    with torch.no_grad():
        fp32 = programs["fp32"][1](x)[0]
        torchao = model(x)[0]
        if scheme == "int8-int4":  # as XNNPACK stores them
            for w in [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]:
                if isinstance(w, IntxUnpackedToInt8Tensor):
                    w.scale.copy_(w.scale.to(torch.bfloat16).float())
        ref = model(x)[0]

    def rel(a: torch.Tensor) -> float:
        return float((got - a).abs().max() / a.abs().max())

    print(f"{scheme}: max |program - eager| / max |logit|: torchao (XNNPACK's scales) {rel(ref):.1e}, torchao "
          f"{rel(torchao):.1e}, fp32 {rel(fp32):.1e}")
    assert rel(ref) <= QUANT_BOUND


def test_fp32_program_generates_the_eager_tokens(run, programs, capsys):
    from meshtune.inference import generate
    from meshtune.inference_pte import PteProgram

    folder, model = programs["fp32"]
    program = PteProgram(folder / "model.pte")
    eager_texts = [c.text for c in generate(model, program.tokenizer, PROMPTS, NEW)]
    for prompt, text in zip(PROMPTS, eager_texts, strict=True):
        ids = program.encode(prompt)
        got = program.greedy(ids, NEW)
        assert got == eager_greedy(model, ids, NEW, program.stop_ids)  # token for token
        assert program.tokenizer.decode(got) == text
    # the tiny model soon says EOS: without stop tokens every prompt runs through all NEW decode steps
    program.stop_ids = set()
    for prompt in PROMPTS:
        ids = program.encode(prompt)
        assert program.greedy(ids, NEW) == eager_greedy(model, ids, NEW, ())
    # the command line: the same text eager and through the program
    assert main(["generate", str(run), "--prompt", PROMPTS[0], "--max-new-tokens", str(NEW)]) == 0
    eager_out = capsys.readouterr().out
    assert main(["generate", "--program", str(folder / "model.pte"), "--prompt", PROMPTS[0],
                 "--max-new-tokens", str(NEW)]) == 0
    assert capsys.readouterr().out == eager_out == eager_texts[0] + "\n"


@pytest.mark.parametrize("scheme", ["int8-int8", "int8-int4"])
def test_quantized_program_greedy_match_rate(programs, scheme):
    from meshtune.inference_pte import PteProgram

    folder, _ = programs[scheme]
    fp32 = programs["fp32"][1]
    program = PteProgram(folder / "model.pte")
    program.stop_ids = set()  # every prompt runs NEW steps (the tiny model soon says EOS)
    same = total = 0
    for prompt in PROMPTS:
        ids = program.encode(prompt)
        want, got = eager_greedy(fp32, ids, NEW, ()), program.greedy(ids, NEW)
        total += NEW
        same += sum(a == b for a, b in zip(want, got, strict=True))
    rate = same / total
    print(f"{scheme}: greedy tokens equal to eager fp32 at {same}/{total} positions ({rate:.0%})")
    assert rate >= 0.5


def test_cache_length_is_a_one_line_error(programs, capsys):
    from meshtune.inference_pte import PteProgram

    folder, _ = programs["fp32"]
    program = PteProgram(folder / "model.pte")
    with pytest.raises(ConfigError, match="do not fit the KV cache"):
        program.greedy(program.encode("reverse: abcdef\n"), 30)
    code = main(["generate", "--program", str(folder / "model.pte"), "--prompt", "x" * 20, "--max-new-tokens", "20"])
    # the ExecuTorch runtime's first load in a process may log its CPU probing ("[cpuinfo_utils.cpp:87] ...")
    err = "".join(line for line in capsys.readouterr().err.splitlines(True) if not line.startswith("[cpuinfo"))
    assert code == 2 and err.count("\n") == 1
    assert "--max-new-tokens" in err and "32 positions" in err and "--max-seq-len" in err


def test_missing_extra_is_a_one_line_error(run, tmp_path, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_executorch(name, *args, **kwargs):
        if name == "executorch" or name.startswith("executorch."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_executorch)
    for argv in (["export", str(run), "--format", "executorch", "--out", str(tmp_path)],
                 ["generate", "--program", str(tmp_path / "model.pte"), "--prompt", "x"]):
        if argv[0] == "generate":  # a program that exists, so the runtime import is what fails
            (tmp_path / "model.pte").write_bytes(b"")
            (tmp_path / "model.json").write_text(json.dumps({"format": "meshtune.executorch"}))
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert "pip install 'meshtune[executorch]'" in err
    assert not (tmp_path / "model.pte").stat().st_size  # nothing was written


def test_bad_flags_are_one_line_errors(run, tmp_path, capsys):
    cases = [(["export", str(run), "--format", "executorch", "--max-seq-len", "64", "--out", str(tmp_path)],
              "--max-seq-len: 64 is outside 2..32"),
             (["export", str(run), "--format", "merged", "--max-seq-len", "16"], "--max-seq-len: only for"),
             (["export", str(run), "--format", "quantized", "--scheme", "fp32", "--out", str(tmp_path)],
              "--scheme fp32: --format quantized"),
             (["generate", str(run), "--program", "x.pte", "--prompt", "x"], "one of them")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_program_accuracy_is_measured_on_the_program(run, programs):
    """meshtune.measure.evaluate_step (the demo's and compress-search's accuracy of a deployed program): the
    fp32 program scores what the eager model scores, token for token; a quantized one what its torchao model does
    within the scheme's bound."""
    from meshtune.measure import eval_split, evaluate, evaluate_step, program_step
    from meshtune.schema import load_config

    ds = eval_split(load_config(run / "config.yaml", []))
    for scheme, (folder, model) in programs.items():
        acc, loss = evaluate_step(program_step(folder / "model.pte"), ds)
        ref_acc, ref_loss = evaluate(model, ds, batch=4)
        assert acc == ref_acc, scheme
        assert loss == pytest.approx(ref_loss, rel=1e-5 if scheme == "fp32" else 1e-3), scheme


def test_deployment_rows_hold_each_programs_own_figures(run, programs):
    """The demo's deployment table (meshtune.demo.compress.measure_programs): every row's size is its own .pte's,
    its accuracy its own program's; the eager reference is timed with them; the table prints every row."""
    from meshtune.demo.compress import Row, format_programs, measure_programs
    from meshtune.measure import eval_split, evaluate_step, program_step
    from meshtune.schema import load_config

    ds = eval_split(load_config(run / "config.yaml", []))
    rows = [Row(scheme, folder / "model.pte", "executorch", program=folder / "model.pte", scheme=scheme,
                vocab=model.vocab_size, size=(folder / "model.pte").stat().st_size, accuracy=0.5)
            for scheme, (folder, model) in programs.items()]
    eager = measure_programs(rows, ds, prompt_len=8, new_tokens=4, reps=1, reference=programs["fp32"][1])
    assert all(x > 0 for x in eager)
    sizes = {r.scheme: r.pte_size for r in rows}
    assert sizes["fp32"] > sizes["int8-int8"] > sizes["int8-int4"]
    for r in rows:
        assert r.pte_size == r.program.stat().st_size and r.prefill_s > 0 and r.decode_tps > 0
    for r in rows:  # each row's accuracy and loss are its own program's ...
        assert (r.pte_accuracy, r.pte_loss) == evaluate_step(program_step(r.program), ds), r.scheme
    assert len({r.pte_loss for r in rows}) == len(rows)  # ... and differ per scheme, so a mix-up would show
    text = format_programs(rows, eager).splitlines()
    assert len(text) == 3 + len(rows) and all(r.scheme in line for r, line in zip(rows, text[3:], strict=True))
