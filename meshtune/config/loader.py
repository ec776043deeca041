"""Building typed configs: YAML and dotted `key=value` overrides -> a tree of dataclasses, checked per key.

    data = apply_overrides(read_yaml(path), ["optim.lr=1e-3"], schema=Config)
    cfg = build(Config, data)               # unknown key or wrong type: ConfigError naming the key

Each field's docstring (the string literal under it) is its documentation: `help_text(schema)` prints them,
so the help text and the code cannot disagree. Generic over the schema: nothing here knows a section.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A user error in a config file or override; the message names the key and the fix."""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp` and convert lossless cases (int -> float, '1e-3' -> float)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}; pick one of them")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}; write it as [a, b, ...]")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}; write it as {{key: value, ...}}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}; give a value of type {_type_name(tp)}")


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """An instance of the dataclass `cls` from nested plain data, every value type-checked against its field.

    Raises:
        ConfigError: naming the dotted key, for an unknown key or a value of the wrong type.
    """
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(fields)}"
            raise ConfigError(f"{full}: unknown key; {hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, {} if value is None else value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _key_type(schema: type | None, path: list[str]) -> Any:
    """The annotation of the dotted key `path` in the dataclass `schema`, or None where it names no field."""
    tp: Any = schema
    for part in path:
        if tp is None or not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _is_text(tp: Any) -> bool:
    """A str field, or a choice among strings: its value is the text as written, never YAML."""
    if tp is str:
        return True
    return typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp))


def _parse_override(text: str, schema: type | None = None) -> tuple[list[str], Any]:
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected dotted key=value, e.g. optim.lr=1e-3")
    path = key.split(".")
    quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""  # YAML quoting, escapes included
    if _is_text(_key_type(schema, path)) and not quoted:  # `run_dir=runs/x #2`, `run_dir=yes`: those strings
        return path, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: list[str], schema: type | None = None) -> dict:
    """Set dotted `key=value` pairs into the nested dict `data`. A value is parsed as YAML (numbers, lists,
    booleans) unless `schema` types the key as a string, which takes the text as written."""
    for text in overrides:
        path, value = _parse_override(text, schema)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:  # absent, or an empty section (`model:` in YAML)
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        hint = "run `meshtune ls` to see the bundled configs" if not p.exists() else "give a YAML file"
        raise ConfigError(f"{path}: config file not found; {hint}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def resolve_config_path(name: str) -> Path:
    """A path as given, or the name of a bundled config (`pretrain/tiny` or `pretrain/tiny.yaml`)."""
    p = Path(name)
    if p.exists():
        return p
    bundled = bundled_configs_dir() / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    return bundled if bundled.exists() else p


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each dataclass field (its attribute docstring); a class made at run time
    (no source) gives its `__field_docs__`."""
    if hasattr(cls, "__field_docs__"):
        return dict(cls.__field_docs__)
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def help_text(schema: type) -> str:
    """Every key of the dataclass tree `schema` with its type, default and docstring, section by section."""
    lines = []
    top = schema()
    docs = field_docs(schema)
    sections = []
    for f in dataclasses.fields(schema):
        value = getattr(top, f.name)
        if dataclasses.is_dataclass(value):
            sections.append((f.name, value))
            continue
        lines.append(f"  {f.name} = {value!r}\n      {docs.get(f.name, '')}")

    def section_lines(prefix: str, sub: Any) -> None:
        lines.append(f"\n{prefix}: {(type(sub).__doc__ or '').strip()}")
        docs = field_docs(type(sub))
        hints = typing.get_type_hints(type(sub))
        nested = []
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if dataclasses.is_dataclass(value):
                nested.append((f"{prefix}.{f.name}", value))
                continue
            lines.append(f"  {prefix}.{f.name}: {_type_name(hints[f.name])} = {value!r}\n"
                         f"      {docs.get(f.name, '')}")
        for name, value in nested:  # e.g. recipe.lora.*
            section_lines(name, value)

    for name, value in sections:
        section_lines(name, value)
    return "\n".join(lines)


def bundled_configs_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "configs"


def bundled_configs() -> list[str]:
    root = bundled_configs_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def dump_yaml(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
