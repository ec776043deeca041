"""`meshtune distill-data`: a teacher's responses to a prompt file, as training data (sequence-level KD).

    meshtune distill-data --prompts prompts.jsonl --out teacher.jsonl --url http://127.0.0.1:8000/v1
    meshtune distill-data --prompts prompts.jsonl --out teacher.jsonl --teacher runs/big     # local, no HTTP
    meshtune train finetune/full data.train_path=teacher.jsonl ...                          # the student

Black-box distillation: the teacher is only a source of text, e.g. a hosted model behind an OpenAI-compatible
completions API (vLLM, TGI, `meshtune serve`). Prompts are read from JSONL (`{"prompt": ...}`, other keys
ignored) and sent in batches (the completions API takes a list of prompts); each answer is appended to OUT as
`{"prompt", "response"}`, the format `data.train_path` reads, and flushed before the next batch. With `--chat`,
a chat teacher gets each prompt as a user turn (`/chat/completions`, or the local teacher's chat template) and
OUT holds conversations (`{"messages": [...]}`).

Resumable: prompts already in OUT are skipped (counted, so a prompt listed twice is asked twice), and a last
line torn by a kill is dropped. Connection errors, timeouts, HTTP 429 and 5xx are retried with exponential
backoff (honouring Retry-After); other HTTP errors stop the run with the server's message. The API key comes
from MESHTUNE_API_KEY or OPENAI_API_KEY, is sent as `Authorization: Bearer ...` and never printed: server
messages are shown with it blanked out. This module needs no torch unless --teacher is used.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from meshtune.config import ConfigError

KEY_ENV = ("MESHTUNE_API_KEY", "OPENAI_API_KEY")
RETRYABLE = (429, 500, 502, 503, 504)


def api_key_from_env(environ=None) -> str | None:
    env = os.environ if environ is None else environ
    return next((env[k] for k in KEY_ENV if env.get(k)), None)


def read_prompts(path: str | Path) -> list[str]:
    """The `prompt` field of each line of a JSONL file.

    Raises:
        ConfigError: naming --prompts and the line, for a missing file or a line without a string prompt.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--prompts: {path}: no such file; give a JSONL file with a \"prompt\" field per line")
    prompts = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--prompts: {path} line {lineno}: invalid JSON ({e.msg}); fix or remove it") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ConfigError(f"--prompts: {path} line {lineno}: needs a string \"prompt\" field")
        prompts.append(record["prompt"])
    if not prompts:
        raise ConfigError(f"--prompts: {path} holds no prompts")
    return prompts


def read_done(path: str | Path) -> Counter:
    """How often each prompt already has a response in OUT; a torn (unparsable) last line is cut off.

    Raises:
        ConfigError: naming --out, for a malformed line other than the last.
    """
    p = Path(path)
    if not p.is_file():
        return Counter()
    text = p.read_text(encoding="utf-8")
    lines = text.splitlines()
    done, torn = Counter(), False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            done[record["prompt"] if "prompt" in record else record["messages"][0]["content"]] += 1
        except (json.JSONDecodeError, KeyError, TypeError, IndexError):
            if i < len(lines) - 1:
                raise ConfigError(f"--out: {path} line {i + 1} is not a prompt/response record; fix it or write "
                                  "to a new file") from None
            torn = True  # killed mid-write: drop the partial record, its prompt is asked again
    if torn:
        p.write_text("".join(line + "\n" for line in lines[:-1]), encoding="utf-8")
    elif text and not text.endswith("\n"):
        with p.open("a", encoding="utf-8") as f:
            f.write("\n")
    return done


class CompletionsClient:
    """An OpenAI-compatible completions endpoint at `url` (e.g. http://127.0.0.1:8000/v1), stdlib only.

    The key is kept in the request headers only; `redact` blanks it out of anything shown to the user."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 6, backoff: float = 0.5, sleep: Callable[[float], None] = time.sleep,
                 log: Callable[[str], None] | None = None):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--url: {url!r} is not an http(s) URL; give the API base, e.g. http://127.0.0.1:8000/v1")
        self.url = url.rstrip("/")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self._key = api_key
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.timeout, self.retries, self.backoff, self.sleep = timeout, retries, backoff, sleep
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.model = model or self._default_model()

    def __repr__(self) -> str:
        return f"CompletionsClient({self.url!r}, model={self.model!r})"

    def redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _request(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        url = self.url + path
        last = ""
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, data=data, headers=self._headers,
                                         method="GET" if data is None else "POST")
            wait = self.backoff * 2 ** attempt
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = resp.read()
                try:
                    return json.loads(payload)
                except json.JSONDecodeError:
                    raise ConfigError(f"--url: {url} answered with something that is not JSON; give an "
                                      "OpenAI-compatible API base URL") from None
            except urllib.error.HTTPError as e:
                detail = self.redact(_error_text(e))
                if e.code not in RETRYABLE:
                    raise ConfigError(f"--url: {url} answered HTTP {e.code}: {detail[:300]}") from None
                retry_after = e.headers.get("Retry-After", "") if e.headers else ""
                if retry_after.replace(".", "", 1).isdigit():
                    wait = min(float(retry_after), 60.0)
                last = f"HTTP {e.code}: {detail[:200]}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                last = self.redact(str(getattr(e, "reason", e)))
            if attempt < self.retries:
                self.log(f"meshtune distill-data: {last}; retry {attempt + 1}/{self.retries} in {wait:.1f} s")
                self.sleep(wait)
        raise ConfigError(f"--url: {url} failed {self.retries + 1} times (last: {last}); check the server, or "
                          "run again later: finished prompts are kept in --out")

    def _default_model(self) -> str:
        listing = self._request("/models")
        ids = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)]
        if not ids or not isinstance(ids[0], str):
            raise ConfigError(f"--model: {self.url}/models lists no model; give --model NAME")
        return ids[0]

    def complete(self, prompts: list[str], max_tokens: int, temperature: float, stop: list[str]) -> list[str]:
        body = {"model": self.model, "prompt": prompts, "max_tokens": max_tokens, "temperature": temperature}
        if stop:
            body["stop"] = stop
        reply = self._request("/completions", body)
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or len(choices) != len(prompts):
            raise ConfigError(f"--url: {self.url}/completions did not return one choice per prompt "
                              f"({len(prompts)} sent); is it an OpenAI-compatible completions endpoint?")
        texts = [None] * len(prompts)
        for pos, c in enumerate(choices):
            texts[c.get("index", pos)] = c.get("text")
        if not all(isinstance(t, str) for t in texts):
            raise ConfigError(f"--url: {self.url}/completions returned choices without text")
        return texts

    def chat(self, prompts: list[str], max_tokens: int, temperature: float, stop: list[str]) -> list[str]:
        """Each prompt as a user turn to /chat/completions (one conversation per request), the assistant's replies."""
        texts = []
        for prompt in prompts:
            body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens, "temperature": temperature}
            if stop:
                body["stop"] = stop
            reply = self._request("/chat/completions", body)
            try:
                text = reply["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                text = None
            if not isinstance(text, str):
                raise ConfigError(f"--url: {self.url}/chat/completions returned no choices[0].message.content; is "
                                  "it an OpenAI-compatible chat endpoint?")
            texts.append(text)
        return texts


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read().decode("utf-8", "replace")
        return json.loads(body).get("error", {}).get("message") or body
    except Exception:  # noqa: BLE001 - an error body is only for the message
        return str(e.reason)


class LocalTeacher:
    """A checkpoint generating in this process: the same interface as CompletionsClient, no HTTP."""

    def __init__(self, checkpoint: str, tokenizer: str | None = None):
        from meshtune.inference import load_for_generation

        self.model, self.tokenizer, self.artifact = load_for_generation(checkpoint, tokenizer, key="--teacher")

    def complete(self, prompts: list[str], max_tokens: int, temperature: float, stop: list[str]) -> list[str]:
        from meshtune.inference import generate

        try:
            return [c.text for c in generate(self.model, self.tokenizer, prompts, max_tokens, temperature, stop)]
        except ValueError as e:
            raise ConfigError(f"--prompts: {e}") from None

    def chat(self, prompts: list[str], max_tokens: int, temperature: float, stop: list[str]) -> list[str]:
        """Each prompt as a user turn rendered with the teacher's chat template; replies end at its end of turn."""
        from meshtune.inference import chat_prompt, chat_template_of

        template = chat_template_of(self.artifact, self.tokenizer)
        if template is None:
            raise ConfigError("--chat: the teacher has no chat template (its tokenizer folder has none); drop --chat")
        ids = [chat_prompt(self.tokenizer, template, [{"role": "user", "content": p}]) for p in prompts]
        return self.complete(ids, max_tokens, temperature, stop)


def distill_data(prompts_path: str | Path, out_path: str | Path, teacher, batch_size: int = 8,
                 max_tokens: int = 64, temperature: float = 0.0, stop: list[str] = (),
                 log: Callable[[str], None] = print, chat: bool = False) -> dict:
    """Ask `teacher` (a CompletionsClient or LocalTeacher) for every prompt not yet in OUT; append the answers.

    With `chat`, each prompt is a user turn in the teacher's chat format and OUT gets conversations
    (`{"messages": [user, assistant]}`), which the student renders with its own chat template.

    Returns:
        {"total", "skipped", "written"} prompt counts.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")
    if max_tokens < 1:
        raise ConfigError(f"--max-tokens: must be >= 1, got {max_tokens}")
    prompts = read_prompts(prompts_path)
    out = Path(out_path)
    done = read_done(out)
    todo = []
    for p in prompts:
        if done[p] > 0:
            done[p] -= 1
        else:
            todo.append(p)
    skipped = len(prompts) - len(todo)
    log(f"meshtune distill-data: {len(prompts)} prompts, {skipped} already in {out}, {len(todo)} to ask")
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with out.open("a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            texts = (teacher.chat if chat else teacher.complete)(batch, max_tokens, temperature, list(stop))
            f.write("".join(json.dumps(_record(p, t, chat)) + "\n" for p, t in zip(batch, texts, strict=True)))
            f.flush()
            os.fsync(f.fileno())
            written += len(batch)
            log(f"meshtune distill-data: {skipped + written}/{len(prompts)} prompts answered")
    return {"total": len(prompts), "skipped": skipped, "written": written}


def _record(prompt: str, text: str, chat: bool) -> dict:
    if chat:
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]}
    return {"prompt": prompt, "response": text}
