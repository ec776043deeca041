"""The bad-input battery: every case through `meshtune train` and through `meshtune launch` (2 ranks) must print
exactly one line `meshtune: error: ...` naming the key or file, exit with code 2, start no rank, and leave the
run dir it points at (which holds a good checkpoint) untouched.

The CLI runs in-process (`meshtune.cli.main`, the same code the console script runs); `launch` has torchrun
replaced by a tripwire, so a case that passed the parent's checks would fail loudly instead of training. A
few cases also run as real subprocesses (tests/unit/test_cli.py covers the process boundary more).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.cases import TINY

REPO = Path(__file__).resolve().parents[2]


class _Payload:
    def __reduce__(self):
        return (exec, ("open('/tmp/meshtune-canary-battery', 'w').write('pwned')",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A good run (with a checkpoint), a run of another model shape, broken files, an HF dir that disagrees."""
    from meshtune.export import export
    from meshtune.models import build_model
    from meshtune.models.hf import save_hf_checkpoint
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer
    from meshtune.schema import load_config

    root = tmp_path_factory.mktemp("battery")
    base = ["train.steps=1", "checkpoint.save_final=true"]
    build_trainer(load_config(None, [*TINY, f"run_dir={root / 'good'}", *base]), DistEnv()).fit()
    build_trainer(load_config(None, [*TINY, f"run_dir={root / 'wide'}", "model.dim=64", *base]), DistEnv()).fit()
    (wide,) = export(root / "wide", "merged", quiet=True)
    (root / "empty.safetensors").write_bytes(b"")
    (root / "cut.safetensors").write_bytes(wide.read_bytes()[:200])
    (root / "junk.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with (root / "evil.pt").open("wb") as f:
        pickle.dump({"tok_embeddings.weight": _Payload()}, f)
    (root / "nometa").mkdir()
    (root / "a_file").write_text("x")
    (root / "ds.json").write_text(json.dumps({"train_batch_size": 7}))
    (root / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    from tests.chat_tokenizers import CONVERSATIONS, write_tokenizer

    write_tokenizer(root, "chatml")
    write_tokenizer(root, "mistral")
    chat = [json.dumps({"messages": c}) for c in CONVERSATIONS]
    (root / "chat.jsonl").write_text("\n".join(chat * 4) + "\n")
    (root / "noassist.jsonl").write_text(chat[0] + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]})
                                         + "\n")
    (root / "narrator.jsonl").write_text(json.dumps({"messages": [{"role": "narrator", "content": "x"}]}) + "\n")
    (root / "drops.jinja").write_text(
        "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}{{ '<|im_start|>' + m.role + '\\n' + "
        "m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "a"}]), root / "bad.parquet")
    from meshtune.schema import load_config as load

    hf_cfg = load(None, [*TINY, "model.dim=48", "model.n_heads=4"]).model
    model = build_model(hf_cfg, 264)
    save_hf_checkpoint(model.state_dict(), hf_cfg, 264, root / "hf")
    tiny = load(None, TINY).model  # HF dirs that agree with TINY's model.* but are broken otherwise
    tiny_state = build_model(tiny, 264).state_dict()
    save_hf_checkpoint(tiny_state, tiny, 264, root / "hf_shards", max_shard_bytes=40_000)
    sorted((root / "hf_shards").glob("model-*.safetensors"))[-1].unlink()
    shutil.copytree(root / "hf", root / "hf_swapped")  # config.json of another model than the weights
    save_hf_checkpoint(tiny_state, tiny, 264, root / "hf_tiny")
    shutil.copy(root / "hf_tiny" / "config.json", root / "hf_swapped" / "config.json")
    save_hf_checkpoint(tiny_state, tiny, 264, root / "hf_rope")
    conf = json.loads((root / "hf_rope" / "config.json").read_text())
    conf["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0]}
    (root / "hf_rope" / "config.json").write_text(json.dumps(conf))
    (quantized,) = export(root / "good", "quantized", out=root / "q", quiet=True)
    build_trainer(load_config(None, [*TINY, f"run_dir={root / 'bigvocab'}", "model.vocab_size=512", *base]),
                  DistEnv()).fit()
    return {"root": root, "good": root / "good", "step": next((root / "good" / "checkpoints").iterdir()),
            "wide": wide, "quantized": quantized, "bigvocab": root / "bigvocab"}


def snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(run_dir.rglob("*"))}


# (id, overrides with {root}/{good}/... placeholders, the key or file the one line must name)
CASES = [
    ("steps not a number", ["train.steps=abc"], "train.steps"),
    ("steps zero", ["train.steps=0"], "train.steps"),
    ("lr negative", ["optim.lr=-1"], "optim.lr"),
    ("unknown key", ["train.stepz=3"], "train.stepz"),
    ("not key=value", ["bogus"], "override 'bogus'"),
    ("dim not divisible", ["model.dim=34"], "model.dim"),
    ("kv heads", ["model.n_kv_heads=3"], "model.n_kv_heads"),
    ("seq_len too long", ["data.seq_len=1000"], "data.seq_len"),
    ("vocab too small", ["model.vocab_size=10"], "model.vocab_size"),
    ("unknown task", ["data.task=nope"], "data.task"),
    ("no data", ["data.task="], "data.task"),
    ("train file missing", ["data.task=", "data.train_path={root}/nope.jsonl"], "data.train_path"),
    ("train file malformed", ["data.task=", "data.train_path={root}/bad.jsonl"], "bad.jsonl"),
    ("conversation without an assistant turn",
     ["data.task=", "data.train_path={root}/noassist.jsonl", "data.tokenizer={root}/chatml"],
     "line 2: the conversation has no assistant"),
    ("conversation with an unknown role", ["data.task=", "data.train_path={root}/narrator.jsonl",
                                           "data.tokenizer={root}/chatml"], "unknown role 'narrator'"),
    ("chat template raises", ["data.task=", "data.train_path={root}/chat.jsonl", "data.tokenizer={root}/mistral"],
     "Conversation roles must alternate"),
    ("chat template not prefix-preserving", ["data.task=", "data.train_path={root}/chat.jsonl",
                                             "data.tokenizer={root}/chatml", "data.chat_template={root}/drops.jinja"],
     "not prefix-preserving"),
    ("conversations without a chat template", ["data.task=", "data.train_path={root}/chat.jsonl"],
     "has no chat template"),
    ("parquet without the columns", ["data.task=", "data.train_path={root}/bad.parquet"],
     "has columns question, answer"),
    ("eval_path with a task", ["data.eval_path={root}/bad.jsonl"], "data.eval_path"),
    ("tokenizer missing", ["data.tokenizer={root}/nope.json"], "data.tokenizer"),
    ("layout does not fit", ["parallel.dp_shard=3"], "parallel"),
    ("tp splits no heads", ["parallel.tp=3"], "parallel.tp"),
    ("bogus schedule", ["parallel.pp_schedule=Bogus"], "parallel.pp_schedule"),
    ("unknown engine", ["parallel.engine=nope"], "parallel.engine"),
    ("zero stage", ["parallel.engine=deepspeed", "parallel.zero_stage=4"], "parallel.zero_stage"),
    ("deepspeed json missing", ["parallel.deepspeed_config={root}/nope.json"], "parallel.deepspeed_config"),
    ("fairscale sharded", ["parallel.engine=fairscale", "parallel.dp_shard=2"], "parallel.dp_shard"),
    ("timeout", ["parallel.timeout_s=0"], "parallel.timeout_s"),
    ("batch split", ["train.global_batch_size=12"], "train.global_batch_size"),
    ("keep_last", ["checkpoint.keep_last=0"], "checkpoint.keep_last"),
    ("meta without sharding", ["model.init_device=meta", "parallel.dp_replicate=-1", "parallel.dp_shard=1"],
     "model.init_device"),
    ("resume missing", ["checkpoint.resume={root}/nope"], "checkpoint.resume"),
    ("resume not a checkpoint", ["checkpoint.resume={root}/nometa"], "checkpoint.resume"),
    ("resume into another model", ["checkpoint.resume=auto", "model.dim=64"], "checkpoint.resume"),
    ("resume with another engine", ["checkpoint.resume=auto", "parallel.engine=fairscale", "parallel.dp_replicate=-1",
                                    "parallel.dp_shard=1"], "parallel.engine=native"),
    ("init_from missing", ["init_from={root}/nope"], "init_from"),
    ("init_from empty file", ["init_from={root}/empty.safetensors"], "empty.safetensors"),
    ("init_from truncated", ["init_from={root}/cut.safetensors"], "cut.safetensors"),
    ("init_from corrupt", ["init_from={root}/junk.safetensors"], "junk.safetensors"),
    ("init_from another shape", ["init_from={wide}"], "init_from"),
    ("init_from a checkpoint of another shape", ["init_from={root}/wide"], "init_from"),
    ("init_from a pickle with code", ["init_from={root}/evil.pt"], "evil.pt: refused to load"),
    ("init_from HF config mismatch", ["init_from={root}/hf"], "model.dim=48"),
    ("init_from HF weights not of its config", ["init_from={root}/hf_swapped"], "does config.json belong"),
    ("init_from HF shard missing", ["init_from={root}/hf_shards"], "model.safetensors.index.json: lists model-"),
    ("init_from HF unknown rope type", ["init_from={root}/hf_rope"], "rope_type 'longrope' is not supported"),
    ("init_from a quantized export", ["init_from={quantized}"], "init_from"),
    ("run_dir is a file", ["run_dir={root}/a_file"], "run_dir"),
    ("unknown recipe", ["recipe.name=nope"], "recipe.name"),
    ("recipe twice", ["recipe.name=lora+lora"], "recipe.name"),
    ("lora rank", ["recipe.name=lora", "recipe.lora.rank=0"], "recipe.lora.rank"),
    ("lora targets match nothing", ["recipe.name=lora", "recipe.lora.targets=[nothing]"], "recipe.lora.targets"),
    ("teacher missing", ["recipe.name=distill", "recipe.distill.teacher={root}/nope"], "recipe.distill.teacher"),
    ("teacher of another vocabulary", ["recipe.name=distill", "recipe.distill.teacher={bigvocab}"],
     "recipe.distill.teacher"),
    ("qat under tp", ["recipe.name=qat", "parallel.tp=2", "parallel.dp_shard=1"], "recipe.name"),
    ("qat group size", ["recipe.name=qat", "recipe.qat.group_size=7"], "recipe.qat.group_size"),
    ("prune sparsity", ["recipe.name=prune", "recipe.prune.sparsity=1.5"], "recipe.prune.sparsity"),
    ("structured removes all heads", ["recipe.name=prune", "recipe.prune.method=structured",
                                      "recipe.prune.sparsity=0.9"], "recipe.prune.sparsity"),
    ("prefix length", ["recipe.name=prefix", "recipe.prefix.length=-1"], "recipe.prefix.length"),
    ("adapter bottleneck", ["recipe.name=adapters", "recipe.adapters.bottleneck=0"], "recipe.adapters.bottleneck"),
]
LAUNCH_ONLY = [  # 2 ranks needed, or checks the launcher makes that a lone `meshtune train` makes later
    ("packing under pipeline parallelism", ["data.packing=true", "parallel.pp=2", "parallel.dp_shard=1"],
     "data.packing"),
    ("distill under pipelining", ["recipe.name=distill", "recipe.distill.teacher={good}", "parallel.pp=2",
                                  "parallel.dp_shard=1"], "recipe.name"),
    ("deepspeed json contradicts", ["parallel.engine=deepspeed", "parallel.deepspeed_config={root}/ds.json"],
     "train_batch_size"),
]


def fill(overrides: list[str], files: dict) -> list[str]:
    names = {k: str(v) for k, v in files.items()}
    return [o.format(**names) for o in overrides]


def run_in_process(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    from meshtune.cli import main
    from meshtune.launch import torchrun

    def tripwire(argv, env, checks=None):
        if checks is not None:
            checks()  # held torchrun: the checks run before any rank may start
        raise AssertionError("torchrun started: the parent accepted a bad input")

    monkeypatch.setattr(torchrun, "run_torchrun", tripwire)
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "launch"])
@pytest.mark.parametrize("case, overrides, key", CASES + LAUNCH_ONLY, ids=[c[0] for c in CASES + LAUNCH_ONLY])
def test_bad_input_is_one_line_exit_2_and_the_run_dir_untouched(files, tmp_path, capsys, monkeypatch, command,
                                                                case, overrides, key):
    if command == "train" and (case, overrides, key) in LAUNCH_ONLY:
        pytest.skip("needs 2 ranks, or is checked by the launcher (a lone rank checks it building the engine)")
    run = tmp_path / "run"
    shutil.copytree(files["good"], run)
    before = snapshot(run)
    extra = ["--nproc-per-node", "2"] if command == "launch" else []
    two = ["train.micro_batch_size=4"] if command == "launch" else []  # the same global batch over 2 ranks
    argv = [command, "pretrain/tiny", *extra, *TINY, *two, f"run_dir={run}", *fill(overrides, files)]
    code, err = run_in_process(argv, capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("meshtune: error: "), lines
    assert fill([key], files)[0] in lines[0], lines[0]
    assert snapshot(run) == before  # nothing written, nothing lost
    assert not Path("/tmp/meshtune-canary-battery").exists()


def test_battery_is_large_enough():
    assert len(CASES) + len(LAUNCH_ONLY) >= 40


@pytest.mark.parametrize("command", ["train", "launch"])
def test_a_subprocess_sees_the_same_one_line(files, tmp_path, command):
    """The process boundary: exit code 2, one stderr line, no traceback, no torchrun banner."""
    extra = ["--nproc-per-node", "2"] if command == "launch" else []
    two = ["train.micro_batch_size=4"] if command == "launch" else []
    evil = files["root"] / "evil.pt"  # also: the pickle refusal comes with no torch warning before it
    result = subprocess.run([sys.executable, "-m", "meshtune", command, "pretrain/tiny", *extra, *TINY, *two,
                             f"run_dir={tmp_path / 'run'}", f"init_from={evil}"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"meshtune: error: {evil}: refused to load"), lines
    assert not Path("/tmp/meshtune-canary-battery").exists()
    assert not (tmp_path / "run").exists()
