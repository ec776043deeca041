"""Unit tests for meshtune.config (YAML -> typed dataclasses, overrides, errors, help text, bundled configs)
and for the rank layout of meshtune.runtime.mesh.ParallelDims. All in-process and fast."""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from pathlib import Path

import pytest

from meshtune import config as C
from meshtune import schema as S
from meshtune.config import ConfigError
from meshtune.runtime.mesh import AXES, ParallelDims
from meshtune.schema import Config, load_config

TINY = "pretrain/tiny"


def get(cfg: Config, dotted: str):
    return functools.reduce(getattr, dotted.split("."), cfg)


def load_error(*overrides: str, path: str | None = TINY) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg, f"config errors must be one line: {msg!r}"
    return msg


# ---- loading and overrides ----------------------------------------------------------------------------


def test_defaults_load_once_a_data_source_is_chosen():
    cfg = load_config(None, ["data.task=reverse"])
    assert cfg == dataclasses.replace(Config(), run_dir=str(Path("runs") / "default"),
                                      data=dataclasses.replace(C.DataConfig(), task="reverse"))
    # the bare defaults name no data, and say so
    assert load_error(path=None).startswith("data.task")


def test_bundled_tiny_values_and_defaults_for_the_rest():
    cfg = load_config(TINY)
    assert (cfg.model.dim, cfg.model.n_kv_heads, cfg.data.task, cfg.train.steps) == (128, 2, "sort", 300)
    assert cfg.optim.beta1 == C.OptimConfig().beta1  # not in the file: the dataclass default
    assert cfg.run_dir == "runs/tiny"
    assert load_config("pretrain/tiny.yaml") == cfg
    assert load_config(C.bundled_configs_dir() / "pretrain" / "tiny.yaml") == cfg


@pytest.mark.parametrize(
    "override, key, expected, tp",
    [
        ("train.steps=7", "train.steps", 7, int),
        ("optim.lr=1e-3", "optim.lr", 1e-3, float),  # YAML 1.1 reads 1e-3 (no dot) as a string
        ("optim.lr=2.5E-4", "optim.lr", 2.5e-4, float),
        ("optim.lr=2", "optim.lr", 2.0, float),  # int -> float is lossless
        ("metrics.progress=false", "metrics.progress", False, bool),
        ("parallel.compile=true", "parallel.compile", True, bool),
        ("run_dir=/tmp/some run", "run_dir", "/tmp/some run", str),
        ("metrics.wandb_project=123", "metrics.wandb_project", "123", str),  # a number given to a str field
        ("optim.schedule=constant", "optim.schedule", "constant", str),  # Literal
        ("train.dtype=bf16", "train.dtype", "bf16", str),
        ("model.init_device=meta", "model.init_device", "meta", str),
    ],
)
def test_override_each_type(override, key, expected, tp):
    cfg = load_config(TINY, [override])
    value = get(cfg, key)
    assert value == expected and type(value) is tp


def test_later_override_wins_and_whole_section_override():
    cfg = load_config(TINY, ["train.steps=5", "train.steps=6", "optim={lr: 1e-4, beta1: 0.8}"])
    assert cfg.train.steps == 6
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.warmup_steps) == (1e-4, 0.8, C.OptimConfig().warmup_steps)


def test_yaml_file_float_without_dot(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  task: sort\noptim:\n  lr: 1e-3\n  eps: 1e-10\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-3 and cfg.optim.eps == 1e-10 and isinstance(cfg.optim.lr, float)
    assert cfg.run_dir == str(Path("runs") / "c")  # empty run_dir -> runs/<config name>


# ---- key and type errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, suggestion",
    [
        ("model.dimm=3", "model.dimm", "model.dim"),
        ("optim.wieght_decay=0.1", "optim.wieght_decay", "optim.weight_decay"),
        ("run_dri=x", "run_dri", "run_dir"),
        ("checkpoint.keep_lst=3", "checkpoint.keep_lst", "checkpoint.keep_last"),
    ],
)
def test_unknown_key_names_full_dotted_key_and_close_match(override, key, suggestion):
    msg = load_error(override)
    assert msg.startswith(f"{key}:") and "unknown key" in msg
    assert f"'{suggestion}'" in msg


def test_string_overrides_are_taken_as_written(tmp_path):
    """YAML would read `#2` as a comment and `yes` as a boolean; a string field takes the text as written."""
    cfg = S.load_config(None, ["data.task=sort", "run_dir=runs/x #2", "metrics.wandb_project=yes"])
    assert cfg.run_dir == "runs/x #2" and cfg.metrics.wandb_project == "yes"
    assert S.load_config(None, ["data.task=sort", "run_dir=on"]).run_dir == "on"
    assert S.load_config(None, ["data.task=sort", "train.steps=7"]).train.steps == 7  # typed keys: YAML
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  task: [a, b]\n")  # in a file, YAML types stay checked
    assert load_error(path=str(path)).startswith("data.task: expected str")


def test_eval_path_with_a_task_is_refused(tmp_path):
    (tmp_path / "eval.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    msg = load_error("data.task=sort", f"data.eval_path={tmp_path / 'eval.jsonl'}")
    assert msg.startswith("data.eval_path:") and "data.task=sort" in msg


def test_unknown_key_in_yaml_file_without_close_match_lists_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  task: add\ntrain:\n  zzzzzz: 3\n")
    msg = load_error(path=str(path))
    assert msg.startswith("train.zzzzzz:") and "train.steps" not in msg  # lists bare field names
    assert "steps" in msg and "micro_batch_size" in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.steps=abc", "train.steps"),
        ("train.steps=1.5", "train.steps"),  # no silent truncation
        ("train.steps=true", "train.steps"),  # bool is not an int here
        ("metrics.progress=1", "metrics.progress"),
        ("optim.lr=abc", "optim.lr"),
        ("optim.lr=true", "optim.lr"),
        ("recipe.lora.targets=wq", "recipe.lora.targets"),  # a list field still reads YAML: [wq] is right
        ("model=3", "model"),  # a value where a section belongs
    ],
)
def test_wrong_type_names_key(override, key):
    msg = load_error(override)
    assert msg.startswith(f"{key}:")


@pytest.mark.parametrize(
    "override, key",
    [("optim.schedule=linear", "optim.schedule"), ("train.dtype=fp16", "train.dtype"),
     ("model.init_device=cuda", "model.init_device")],
)
def test_literal_wrong_value_lists_choices(override, key):
    msg = load_error(override)
    assert msg.startswith(f"{key}:")
    cls_name, field_name = key.split(".")
    hints = typing.get_type_hints(type(get(Config(), cls_name)))
    for choice in typing.get_args(hints[field_name]):
        assert repr(choice) in msg


# ---- impossible values (validate) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.dim=130"], "model.dim"),  # not divisible by model.n_heads=4
        (["model.dim=12", "model.n_heads=4", "model.n_kv_heads=0"], "model.dim"),  # head dim 3: odd, no rotary
        (["model.n_kv_heads=3"], "model.n_kv_heads"),
        (["model.n_layers=0"], "model.n_layers"),
        (["model.family=gemma2", "model.attn_softcap=-50"], "model.attn_softcap"),
        (["model.family=gemma2", "model.logit_softcap=-1"], "model.logit_softcap"),
        (["data.seq_len=65"], "data.seq_len"),  # > model.max_seq_len=64
        (["data.train_path=train.jsonl"], "data.task"),  # both task and train_path
        (["data.task="], "data.task"),  # neither
        (["train.global_batch_size=40"], "train.global_batch_size"),  # not a multiple of micro 16
        (["train.steps=0"], "train.steps"),
        (["train.log_every=0"], "train.log_every"),
        (["parallel.dp_shard=-2"], "parallel.dp_shard"),
        (["parallel.tp=0"], "parallel.tp"),
        (["parallel.pp=-3"], "parallel.pp"),
        (["parallel.timeout_s=0"], "parallel.timeout_s"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
        (["checkpoint.every=-1"], "checkpoint.every"),
        (["optim.lr=0"], "optim.lr"),
        (["optim.lr=-1e-3"], "optim.lr"),
        (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio"),
        (["optim.beta1=1.0"], "optim.beta1"),
        (["optim.grad_clip=-1"], "optim.grad_clip"),
        (["init_from=/nonexistent/weights.safetensors"], "init_from"),
        (["checkpoint.resume=/nonexistent/step_000010"], "checkpoint.resume"),
        (["recipe.name=nope"], "recipe.name"),
        (["data.task=", "data.train_path=/nonexistent/train.jsonl"], "data.train_path"),
        (["data.eval_path=/nonexistent/eval.jsonl"], "data.eval_path"),
        (["data.tokenizer=/nonexistent/tokenizer.json"], "data.tokenizer"),
    ],
)
def test_impossible_value_names_key(overrides, key):
    msg = load_error(*overrides)
    assert key in msg


def test_existing_paths_are_accepted(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    cfg = load_config(TINY, [f"init_from={weights}", f"checkpoint.resume={tmp_path}"])
    assert cfg.init_from == str(weights) and cfg.checkpoint.resume == str(tmp_path)
    assert load_config(TINY, ["checkpoint.resume=never"]).checkpoint.resume == "never"


# ---- files and override syntax -------------------------------------------------------------------------


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = load_error(path=str(missing))
    assert str(missing) in msg and "not found" in msg and "meshtune ls" in msg
    msg = load_error(path="pretrain/tinyy")
    assert "pretrain/tinyy" in msg and "not found" in msg
    assert "give a YAML file" in load_error(path=str(tmp_path))  # a directory


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  task: reverse\n  seq_len: 32\n\tmodel: 3\n")
    msg = load_error(path=str(path))
    assert msg.startswith(f"{path} line 4:") and "invalid YAML" in msg


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert "mapping" in load_error(path=str(path))


@pytest.mark.parametrize("override", ["train.steps", "=3", "train..steps=3", ".steps=3", "train.=3"])
def test_override_syntax_error(override):
    msg = load_error(override)
    assert repr(override) in msg and "key=value" in msg


def test_override_below_a_value():
    msg = load_error("model.dim.x=3")
    assert "model.dim.x=3" in msg and "'dim' is a value" in msg


def test_override_into_empty_yaml_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  task: reverse\nmodel:\n")
    assert load_config(path, ["model.dim=32"]).model.dim == 32


# ---- help text, round trip, bundled configs -------------------------------------------------------------


def _doc(text: str) -> str:
    return " ".join(text.split())


def test_help_text_documents_every_field():
    text = S.help_text()
    top_docs = C.field_docs(Config)
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if f.name in S.SECTIONS:
            cls = hints[f.name]
            assert cls.__doc__ and f"\n{f.name}: {cls.__doc__.strip()}" in text
            _check_section_documented(text, f.name, cls)
        else:
            assert top_docs.get(f.name), f"{f.name} has no docstring"
            assert f"  {f.name} = " in text and _doc(top_docs[f.name]) in text
    assert "'cosine' | 'constant'" in text  # Literal choices are shown as the type


def _check_section_documented(text: str, prefix: str, cls: type) -> None:
    docs, hints = C.field_docs(cls), typing.get_type_hints(cls)
    for sub in dataclasses.fields(cls):
        assert docs.get(sub.name), f"{prefix}.{sub.name} has no docstring"
        if dataclasses.is_dataclass(hints[sub.name]):  # a nested section such as recipe.lora
            assert f"\n{prefix}.{sub.name}: {hints[sub.name].__doc__.strip()}" in text
            _check_section_documented(text, f"{prefix}.{sub.name}", hints[sub.name])
        else:
            assert f"  {prefix}.{sub.name}: " in text
            assert _doc(docs[sub.name]) in text


def test_sections_are_every_dataclass_field():
    hints = typing.get_type_hints(Config)
    assert set(S.SECTIONS) == {f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}


@pytest.mark.parametrize("overrides", [[], ["optim.lr=1e-4", "train.dtype=bf16", "metrics.progress=false",
                                            "parallel.dp_replicate=-1", "parallel.dp_shard=1", "run_dir=/x y"]])
def test_dump_yaml_round_trips(tmp_path, overrides):
    cfg = load_config(TINY, overrides)
    path = tmp_path / "config.yaml"
    path.write_text(C.dump_yaml(cfg))
    again = load_config(path)
    assert again == cfg
    assert C.to_dict(again) == C.to_dict(cfg)


def test_bundled_configs_are_listed():
    names = C.bundled_configs()
    assert TINY in names
    on_disk = sorted(C.bundled_configs_dir().rglob("*.yaml"))
    assert len(names) == len(on_disk)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny trained run for the configs that name a distillation teacher (`meshtune validate` checks it)."""
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer

    run = tmp_path_factory.mktemp("teacher") / "run"
    build_trainer(load_config(None, ["data.task=sort", "model.dim=32", "train.steps=1", "train.global_batch_size=8",
                                     "train.micro_batch_size=8", "train.eval_every=0", "metrics.progress=false",
                                     "data.num_train=16", "data.num_eval=8", f"run_dir={run}"]), DistEnv()).fit()
    return run


@pytest.mark.parametrize("name", C.bundled_configs())
@pytest.mark.parametrize("world_size", [1, 2])
def test_bundled_config_validates(name, world_size, teacher, tmp_path):
    from meshtune.runtime.plan_report import describe_plan
    from tests.chat_tokenizers import write_tokenizer

    cfg = load_config(name)
    if "distill" in cfg.recipe.name.split("+"):  # the bundled path (runs/tiny) exists once you trained it
        cfg = load_config(name, [f"recipe.distill.teacher={teacher}"])
    if cfg.data.task == "chat":  # conversations need a chat model's tokenizer (init_from's, given at launch)
        with pytest.raises(C.ConfigError, match=r"data.task=chat makes conversations but data.tokenizer=byte"):
            describe_plan(cfg, world_size=world_size)
        cfg = load_config(name, [f"data.tokenizer={write_tokenizer(tmp_path, 'chatml')}"])
    if cfg.model.init_device == "meta" and world_size == 1:  # the plan the trainer would refuse, refused here too
        with pytest.raises(C.ConfigError, match=r"^model\.init_device: meta needs a sharded model"):
            describe_plan(cfg, world_size=world_size)
        return
    text = describe_plan(cfg, world_size=world_size)
    assert f"= {world_size} ranks" in text


def test_describe_plan_errors_name_the_key():
    from meshtune.runtime.plan_report import describe_plan

    cfg = load_config(TINY)
    with pytest.raises(ConfigError, match=r"^train\.global_batch_size"):
        describe_plan(cfg, world_size=3)  # dp_shard=-1 -> 3, 32 % (16 * 3) != 0
    with pytest.raises(ConfigError, match=r"^parallel"):
        describe_plan(load_config(TINY, ["parallel.dp_replicate=2"]), world_size=3)
    with pytest.raises(ConfigError, match=r"parallel\.pp_schedule"):
        describe_plan(load_config(TINY, ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=x"]), 2)
    assert "tp=2" in describe_plan(load_config(TINY, ["parallel.tp=2", "parallel.dp_shard=1"]), world_size=2)
    with pytest.raises(ConfigError, match="--world-size"):
        describe_plan(cfg, world_size=0)


# ---- ParallelDims ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dims, world, expected, mode",
    [
        (ParallelDims(), 4, dict(dp_replicate=1, dp_shard=4, tp=1, pp=1), "fsdp"),
        (ParallelDims(dp_replicate=2), 8, dict(dp_replicate=2, dp_shard=4, tp=1, pp=1), "hsdp"),
        (ParallelDims(dp_replicate=-1, dp_shard=1), 2, dict(dp_replicate=2, dp_shard=1, tp=1, pp=1), "ddp"),
        (ParallelDims(dp_shard=2, tp=2, pp=-1), 8, dict(dp_replicate=1, dp_shard=2, tp=2, pp=2), "fsdp"),
        (ParallelDims(), 1, dict(dp_replicate=1, dp_shard=1, tp=1, pp=1), "none"),
    ],
)
def test_parallel_dims_resolve(dims, world, expected, mode):
    resolved = dims.resolve(world)
    assert {a: getattr(resolved, a) for a in AXES} == {a: expected[a] for a in AXES}
    assert resolved.world_size == world and resolved.dp_mode == mode
    assert resolved.dp == expected["dp_replicate"] * expected["dp_shard"]


@pytest.mark.parametrize(
    "dims, world, pattern",
    [
        (ParallelDims(dp_replicate=2, dp_shard=2), 3, r"^parallel: .*4 ranks.*world size is 3"),  # product != world
        (ParallelDims(dp_replicate=-1, dp_shard=-1), 4, r"parallel\.dp_replicate and parallel\.dp_shard are both -1"),
        (ParallelDims(dp_replicate=2), 3, r"^parallel: .*cannot fill world size 3"),  # -1 does not divide
        (ParallelDims(tp=0), 2, r"^parallel\.tp: must be >= 1 or -1"),
        (ParallelDims(pp=-2), 2, r"^parallel\.pp"),
    ],
)
def test_parallel_dims_resolve_errors(dims, world, pattern):
    with pytest.raises(ValueError, match=pattern):
        dims.resolve(world)


@pytest.mark.parametrize("degrees", [(2, 2, 2, 2), (3, 1, 2, 2), (1, 2, 3, 4)])  # (pp, dp_replicate, dp_shard, tp)
def test_coordinates_match_row_major_mesh(degrees):
    import torch

    dims = ParallelDims(**dict(zip(AXES, degrees, strict=True)))
    world = math.prod(degrees)
    mesh = torch.arange(world).reshape(degrees)  # what init_device_mesh lays out for these dims
    seen = set()
    for rank in range(world):
        coord = dims.coordinate(rank)
        assert list(coord) == list(AXES)
        assert mesh[tuple(coord[a] for a in AXES)].item() == rank
        seen.add(tuple(coord.values()))
    assert len(seen) == world
    assert dims.coordinate(1)["tp"] == (1 if degrees[-1] > 1 else 0)  # tp varies fastest


@pytest.mark.parametrize("override,key", [("data.task=nosuch", "data.task"),
                                          ("model.vocab_size=100", "model.vocab_size")])
def test_plan_catches_what_only_the_runtime_knows(override, key):
    from meshtune.runtime.plan_report import describe_plan

    with pytest.raises(ConfigError, match=key):
        describe_plan(load_config(TINY, [override]), world_size=2)
