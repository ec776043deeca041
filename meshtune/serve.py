"""`meshtune serve CHECKPOINT`: one model behind an OpenAI-compatible completions endpoint, stdlib HTTP only.

    meshtune serve runs/teacher --port 8000          # http://127.0.0.1:8000/v1
    curl -s localhost:8000/v1/completions -d '{"prompt": ["sort: b3a\\n"], "max_tokens": 8, "temperature": 0}'

Endpoints: `GET /v1/models` (the one model), `POST /v1/completions` with `prompt` (a string or a list of
them, generated as one batch), and `POST /v1/chat/completions` with `messages` (rendered with the model's chat
template, the run's `data.chat_template` or `--chat-template`; the reply ends at the template's end-of-turn
token). Both take `max_tokens` (16), `temperature` (1.0; 0 = greedy), `stop` (a string or a list), `seed`, `n`
(1 only) and `model` (must name the served model when given); `stream` is refused. Responses follow the OpenAI
schemas (`choices[i].text` or `choices[i].message`, `finish_reason` stop/length, `usage`), so any OpenAI-style
client, `meshtune distill-data` included, talks to it. It binds to loopback by default and has no authentication: it
is for tests and local black-box distillation, not for exposure to a network. Requests are served one batch
at a time (a lock around the model); the HTTP server itself is `http.server.ThreadingHTTPServer`.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 8 * 2**20


class RequestError(ValueError):
    """A bad request: answered with `status` and an OpenAI-style error object."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


class CompletionModel:
    """A loaded checkpoint, its tokenizer, its chat template and a lock: what the HTTP handlers call."""

    def __init__(self, checkpoint: str, tokenizer: str | None = None, name: str | None = None,
                 chat_template: str | None = None):
        from meshtune.inference import chat_template_of, load_for_generation

        self.model, self.tokenizer, src = load_for_generation(checkpoint, tokenizer, key="CHECKPOINT")
        self.template = chat_template_of(src, self.tokenizer, chat_template)
        self.name = name or src.name
        self.lock = threading.Lock()

    def _params(self, body) -> tuple[int, float, list[str], int | None]:
        """max_tokens, temperature, stop and seed of a request, each checked."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        if body.get("model") not in (None, self.name):
            raise RequestError(f"model {body['model']!r} not found; this server has {self.name!r}", 404, "model")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise RequestError("max_tokens must be an integer >= 0", param="max_tokens")
        temperature = body.get("temperature", 1.0)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
            raise RequestError("temperature must be a number >= 0", param="temperature")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise RequestError("stop must be a string or a list of strings", param="stop")
        if body.get("n", 1) != 1:
            raise RequestError("n must be 1 (one completion per prompt)", param="n")
        if body.get("stream"):
            raise RequestError("stream is not supported by meshtune serve; send stream: false", param="stream")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise RequestError("seed must be an integer", param="seed")
        return max_tokens, float(temperature), stop, seed

    def _generate(self, prompts: list, params, param: str) -> list:
        from meshtune.inference import generate

        with self.lock:
            try:
                return generate(self.model, self.tokenizer, prompts, *params)
            except ValueError as e:  # a prompt longer than the context
                raise RequestError(str(e), param=param) from None

    @staticmethod
    def _usage(outs) -> dict:
        used_prompt = sum(o.prompt_tokens for o in outs)
        used_completion = sum(o.completion_tokens for o in outs)
        return {"prompt_tokens": used_prompt, "completion_tokens": used_completion,
                "total_tokens": used_prompt + used_completion}

    def complete(self, body: dict) -> dict:
        """The completions response for a request body (a parsed JSON object).

        Raises:
            RequestError: for an invalid field, naming it.
        """
        params = self._params(body)
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not prompts or not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise RequestError("prompt must be a string or a non-empty list of strings", param="prompt")
        outs = self._generate(prompts, params, "prompt")
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.name,
                "choices": [{"text": o.text, "index": i, "logprobs": None, "finish_reason": o.finish_reason}
                            for i, o in enumerate(outs)],
                "usage": self._usage(outs)}

    def chat(self, body: dict) -> dict:
        """The chat completions response: `messages` rendered with the model's chat template, the reply ending at
        the template's end-of-turn token.

        Raises:
            RequestError: for an invalid field, naming it, or a model without a chat template.
        """
        from meshtune.data.chat import ROLES, ChatError
        from meshtune.inference import chat_prompt

        params = self._params(body)
        messages = body.get("messages")
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages)
        if not ok:
            raise RequestError(f"messages must be a non-empty list of {{role, content}} objects with role one of "
                               f"{', '.join(ROLES)} and string content", param="messages")
        if self.template is None:
            raise RequestError("this model has no chat template; use /v1/completions, or start meshtune serve with "
                               "--chat-template FILE", param="messages")
        try:
            ids = chat_prompt(self.tokenizer, self.template, [{"role": m["role"], "content": m["content"]}
                                                              for m in messages])
        except ChatError as e:
            raise RequestError(str(e), param="messages") from None
        out = self._generate([ids], params, "messages")[0]
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "logprobs": None, "finish_reason": out.finish_reason}],
                "usage": self._usage([out])}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0,
                                            "owned_by": "meshtune"}]}


class Handler(BaseHTTPRequestHandler):
    """Routes /v1/models and /v1/completions to `self.server.app` (a CompletionModel)."""

    protocol_version = "HTTP/1.1"
    server_version = "meshtune-serve"

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: RequestError) -> None:
        kind = "not_found_error" if e.status == 404 else "invalid_request_error"
        self._send(e.status, {"error": {"message": str(e), "type": kind, "param": e.param, "code": None}})

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send(200, self.server.app.models())
        else:
            self._error(RequestError(f"no route {self.path}; use /v1/models, or POST /v1/completions or "
                                     "/v1/chat/completions", 404))

    def do_POST(self) -> None:  # noqa: N802
        route = self.path.rstrip("/").removeprefix("/v1")
        if route not in ("/completions", "/chat/completions"):
            self._error(RequestError(f"no route {self.path}; use POST /v1/completions or /v1/chat/completions", 404))
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._error(RequestError(f"request body over {MAX_BODY} bytes", 413))
            return
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self._error(RequestError(f"the body is not JSON ({e})"))
            return
        try:
            app = self.server.app
            self._send(200, app.chat(body) if route == "/chat/completions" else app.complete(body))
        except RequestError as e:
            self._error(e)

    def log_message(self, format: str, *args) -> None:  # one short line per request on stderr, no headers
        sys.stderr.write(f"meshtune serve: {self.address_string()} {format % args}\n")


def make_server(app: CompletionModel, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for `app`, bound (port 0 = a free port: read `server.server_address`) but not started."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.app = app
    return server
