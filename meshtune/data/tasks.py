"""Bundled synthetic tasks whose answers can be checked exactly, so a tiny run shows learning without data files.

    generate("add", n=3, seed=0)
    # [{"prompt": "add: 12+345\n", "response": "357"}, ...]

Every task is short enough that `[bos] + prompt + response + [eos]` fits `data.seq_len=48` with the byte
tokenizer (the longest, `reverse` with 12 characters, is 36 tokens). Each task also has a `solve`
function that computes the answer from the prompt alone: tests use it to prove the generated answers are
right, and evaluation code can use it to score free-running generations.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from meshtune.config import ConfigError

_MIN_LEN, _MAX_LEN = 4, 12
_MAX_ADDEND = 999


@dataclass(frozen=True)
class Task:
    """A synthetic task: how to draw one example and how to answer a prompt.

    Attributes:
        name: The value of `data.task` that selects it.
        make: Draws one `(prompt, response)` pair from the given random generator.
        solve: The exact answer for a prompt produced by `make`.
    """

    name: str
    make: Callable[[random.Random], tuple[str, str]]
    solve: Callable[[str], str]


def _payload(prompt: str, prefix: str) -> str:
    # Prompts are "<prefix>: <payload>\n"; the newline marks where the answer starts.
    assert prompt.startswith(prefix + ": ") and prompt.endswith("\n"), prompt
    return prompt[len(prefix) + 2 : -1]


def _random_string(rng: random.Random, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(_MIN_LEN, _MAX_LEN)))


def _solve_reverse(prompt: str) -> str:
    return _payload(prompt, "reverse")[::-1]


def _make_reverse(rng: random.Random) -> tuple[str, str]:
    prompt = f"reverse: {_random_string(rng, string.ascii_lowercase)}\n"
    return prompt, _solve_reverse(prompt)


def _sorting_task(word: str, reverse: bool = False) -> Task:
    """`<word>: <payload>` -> the payload's characters in code-point order (digits before letters), descending
    with `reverse`."""

    def solve(prompt: str) -> str:
        return "".join(sorted(_payload(prompt, word), reverse=reverse))

    def make(rng: random.Random) -> tuple[str, str]:
        prompt = f"{word}: {_random_string(rng, string.ascii_lowercase + string.digits)}\n"
        return prompt, solve(prompt)

    return Task(word, make, solve)


def _solve_add(prompt: str) -> str:
    a, b = _payload(prompt, "add").split("+")
    return str(int(a) + int(b))


def _make_add(rng: random.Random) -> tuple[str, str]:
    prompt = f"add: {rng.randint(0, _MAX_ADDEND)}+{rng.randint(0, _MAX_ADDEND)}\n"
    return prompt, _solve_add(prompt)


TASKS: dict[str, Task] = {
    "reverse": Task("reverse", _make_reverse, _solve_reverse),
    "sort": _sorting_task("sort"),
    # descending order: a new skill for a base trained on `sort` (bench_peft.py --task rsort)
    "rsort": _sorting_task("rsort", reverse=True),
    "add": Task("add", _make_add, _solve_add),
    # `sort` under a new, longer prompt word: the fine-tuning task of `meshtune demo` and bench_peft.py. The
    # skill is the base's own; the format is new (a `sort` base scores ~0 exact match on it before fine-tuning)
    "arrange": _sorting_task("arrange"),
}
"""The bundled tasks by name (the values `data.task` accepts)."""


CHAT = "chat"
"""`data.task=chat`: conversations made of the tasks (a system prompt, then 1-3 user/assistant turns), rendered with
the tokenizer's chat template, so a chat fine-tune runs with no data file."""
SYSTEM_PROMPT = "You are a precise assistant. Answer with the result only."


def conversations(n: int, seed: int) -> list[dict]:
    """`n` multi-turn conversations (`{"messages": [...]}`) of random bundled tasks, deterministically from `seed`;
    each user turn is a task prompt and each assistant turn its exact answer."""
    if n < 0:
        raise ConfigError(f"data.num_train/data.num_eval: {n} examples requested; use a count >= 0")
    rng = random.Random(seed)
    names = sorted(TASKS)
    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        for _ in range(rng.randint(1, 3)):
            prompt, response = TASKS[rng.choice(names)].make(rng)
            messages += [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": response}]
        out.append({"messages": messages})
    return out


def get_task(name: str) -> Task:
    """Returns the task named by `data.task`.

    Raises:
        ConfigError: No task has that name.
    """
    if name not in TASKS:
        raise ConfigError(f"data.task: unknown task {name!r}; available: {', '.join(sorted(TASKS))}, or {CHAT} "
                          "(conversations of them)")
    return TASKS[name]


def generate(task: str, n: int, seed: int) -> list[dict[str, str]]:
    """Generates `n` examples of a task, deterministically from `seed`.

    Args:
        task: A name in `TASKS`.
        n: Number of examples (duplicates are possible for tasks with small answer spaces).
        seed: Seed of the `random.Random` that draws them; the same seed gives the same list.

    Returns:
        A list of `{"prompt": ..., "response": ...}` dicts (`{"messages": [...]}` for `chat`).

    Raises:
        ConfigError: The task is unknown or `n` is negative.
    """
    if task == CHAT:
        return conversations(n, seed)
    spec = get_task(task)
    if n < 0:
        raise ConfigError(f"data.num_train/data.num_eval: {n} examples requested; use a count >= 0")
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        prompt, response = spec.make(rng)
        examples.append({"prompt": prompt, "response": response})
    return examples
