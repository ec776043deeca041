"""Conversations rendered with the model's own chat template, and the tokens the loss covers.

    template = ChatTemplate(tokenizer.chat_template, tokenizer.special_tokens, "MODEL/tokenizer_config.json")
    text = template.render(messages, add_generation_prompt=True)      # what `apply_chat_template` renders
    ids, mask = encode_chat(messages, tokenizer, template, "assistant")  # mask: tokens that are targets

Templates run in Jinja's immutable sandbox with the environment transformers gives them (`trim_blocks`,
`lstrip_blocks`, `loopcontrols`, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, the
`{% generation %}` tag), so a template from a checkpoint renders exactly as `apply_chat_template` renders it and
cannot reach Python internals. The rendered text is tokenized once with no special tokens added (templates
write BOS themselves), as `apply_chat_template(tokenize=True)` does.

Which tokens are targets (`data.train_on`): `assistant` (every assistant turn), `last` (the last one) or
`all`. A turn's characters come from the template's `{% generation %}` markers where it has them, else from
rendering prefixes: turn i spans from the end of `render(messages[:i], add_generation_prompt=True)` to the end of
`render(messages[:i+1])`, which includes the template's end-of-turn text. A token is a target when it overlaps a
turn's characters (transformers' `return_assistant_tokens_mask` rule).
"""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path

from meshtune.config import ConfigError

ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON = ("assistant", "last", "all")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatError(ConfigError):
    """A conversation the template refuses (its `raise_exception`) or cannot render."""


def load_template(spec: str) -> tuple[str, str]:
    """`data.chat_template`: the path of a Jinja file, or the template text itself. Returns (text, source)."""
    if "{{" in spec or "{%" in spec:
        return spec, "data.chat_template"
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"data.chat_template: no such file {spec}; give a .jinja file or the template text")
    return path.read_text(encoding="utf-8"), f"data.chat_template {spec}"


def _environment():
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tracking: ContextVar = ContextVar("meshtune_generation", default=None)

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}`: records where the enclosed text lands in the output."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            state = tracking.get()
            if state is not None:  # the text already emitted is in `blocks` (render() consumes generate())
                blocks, spans = state
                start = sum(len(b) for b in blocks)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore names (no way to CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"templates cannot set the attribute {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                       namespace=Namespace, dict=lambda *a, **k: dict(*a, **k))
    return env, tracking


class ChatTemplate:
    """A compiled chat template and the variables it reads besides `messages` (`bos_token`, `eos_token`, ...).

    Args:
        text: The Jinja source.
        variables: The tokenizer's special tokens as text (`HFTokenizer.special_tokens`).
        source: Where the template came from, for error messages.

    Raises:
        ConfigError: The template does not compile.
    """

    def __init__(self, text: str, variables: dict[str, str], source: str):
        import jinja2

        self.text, self.variables, self.source = text, dict(variables), source
        self.has_generation = bool(_GENERATION_TAG.search(text))
        env, self._tracking = _environment()
        try:
            self._template = env.from_string(text)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"{source}: the chat template does not compile (line {e.lineno}: {e.message}); "
                              "fix it or give data.chat_template") from e

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as transformers' `apply_chat_template(tokenize=False)` renders it."""
        return self._run(messages, add_generation_prompt, None)

    def render_marked(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as text, and the (start, end) characters of each `{% generation %}` block."""
        spans: list[tuple[int, int]] = []
        return self._run(messages, False, spans), spans

    def _run(self, messages, add_generation_prompt, spans) -> str:
        import jinja2

        kwargs = {**self.variables, "messages": messages, "tools": None, "documents": None,
                  "add_generation_prompt": add_generation_prompt}
        try:
            if spans is None:
                return self._template.render(**kwargs)
            blocks: list[str] = []
            token = self._tracking.set((blocks, spans))
            try:
                for block in self._template.generate(**kwargs):
                    blocks.append(block)
            finally:
                self._tracking.reset(token)
            return "".join(blocks)
        except jinja2.TemplateError as e:
            raise ChatError(f"the chat template ({self.source}) refused it: {e}") from e
        except Exception as e:  # a template bug (a missing key, a bad index): name it, do not show Jinja's stack
            raise ChatError(f"the chat template ({self.source}) failed: {type(e).__name__}: {e}") from e

    def turn_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the characters of each assistant turn, in order.

        Raises:
            ChatError: The template is not prefix-preserving (no `{% generation %}` markers, and rendering the
                conversation up to a turn is not a prefix of rendering all of it).
        """
        if self.has_generation:
            return self.render_marked(messages)
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            for part, whole in ((head, upto), (upto, text)):
                if not whole.startswith(part):
                    at = next((k for k, (a, b) in enumerate(zip(part, whole, strict=False)) if a != b), len(whole))
                    raise ChatError(
                        f"the chat template ({self.source}) is not prefix-preserving: the conversation rendered up to "
                        f"assistant turn {len(spans) + 1} differs from the whole at character {at} "
                        f"({part[at:at + 20]!r} vs {whole[at:at + 20]!r}); give data.chat_template a template with "
                        "{% generation %} markers or one that renders each turn the same way")
            spans.append((len(head), len(upto)))
        return text, spans


def token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token: does its (start, end) characters overlap a span? Both lists are in order."""
    mask, k = [False] * len(offsets), 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        mask[t] = end > spans[k][0]
    return mask


def encode_chat(messages: list[dict], tokenizer, template: ChatTemplate, train_on: str = "assistant"
                ) -> tuple[list[int], list[bool]]:
    """The conversation's token ids and, per token, whether it is a target.

    Raises:
        ChatError: The template refuses the conversation, is not prefix-preserving, or a target turn has none of
            the tokenizer's stop tokens (`stop_ids`) among its targets, so the model would never learn to stop.
    """
    if train_on == "all":
        ids, _ = tokenizer.encode_offsets(template.render(messages))
        return ids, [True] * len(ids)
    text, spans = template.turn_spans(messages)
    if train_on == "last":
        spans = spans[-1:]
    ids, offsets = tokenizer.encode_offsets(text)
    stops = set(tokenizer.stop_ids)
    for n, span in enumerate(spans, start=1):
        turn = [i for i, on in zip(ids, token_mask(offsets, [span]), strict=True) if on]
        if not stops.intersection(turn):
            names = ", ".join(repr(tokenizer.decode_token(i)) for i in tokenizer.stop_ids)
            raise ChatError(
                f"assistant turn {n} of the chat template ({template.source}) leaves the end-of-turn token out of "
                f"the loss (its targets hold none of the stop tokens {names}): the model would not learn to stop; "
                "put the end-of-turn token inside {% generation %}, or add it to generation_config.json eos_token_id")
    return ids, token_mask(offsets, spans)
