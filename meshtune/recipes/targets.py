"""Which modules a recipe's `targets` patterns select: matched against the end of module names."""

from __future__ import annotations

import fnmatch


def matches(name: str, pattern: str) -> bool:
    """Whether the module name ends with `pattern` at a dot boundary (`wq`, `attention.wq`), fnmatch globs
    allowed (`layers.0.*.w1`)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")


def matches_any(name: str, patterns: list[str]) -> bool:
    return any(matches(name, p) for p in patterns)
