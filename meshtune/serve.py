"""`meshtune serve CHECKPOINT`: one model behind an OpenAI-compatible completions endpoint, stdlib HTTP only.

    meshtune serve runs/teacher --port 8000          # http://127.0.0.1:8000/v1
    curl -s localhost:8000/v1/completions -d '{"prompt": ["sort: b3a\\n"], "max_tokens": 8, "temperature": 0}'

Endpoints: `GET /v1/models` (the one model) and `POST /v1/completions` with `prompt` (a string or a list of
them, generated as one batch), `max_tokens` (16), `temperature` (1.0; 0 = greedy), `stop` (a string or a list),
`seed`, `n` (1 only) and `model` (must name the served model when given). Responses follow the OpenAI
completions schema (`choices[i].text`, `finish_reason` stop/length, `usage`), so any OpenAI-style client,
`meshtune distill-data` included, talks to it. It binds to loopback by default and has no authentication: it
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
    """A loaded checkpoint, its tokenizer and a lock: what the HTTP handlers call."""

    def __init__(self, checkpoint: str, tokenizer: str | None = None, name: str | None = None):
        from meshtune.inference import load_for_generation

        self.model, self.tokenizer, src = load_for_generation(checkpoint, tokenizer, key="CHECKPOINT")
        self.name = name or src.name
        self.lock = threading.Lock()

    def complete(self, body: dict) -> dict:
        """The completions response for a request body (a parsed JSON object).

        Raises:
            RequestError: for an invalid field, naming it.
        """
        from meshtune.inference import generate

        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        if body.get("model") not in (None, self.name):
            raise RequestError(f"model {body['model']!r} not found; this server has {self.name!r}", 404, "model")
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not prompts or not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise RequestError("prompt must be a string or a non-empty list of strings", param="prompt")
        max_tokens = body.get("max_tokens", 16)
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
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise RequestError("seed must be an integer", param="seed")
        with self.lock:
            try:
                outs = generate(self.model, self.tokenizer, prompts, max_tokens, float(temperature), stop, seed)
            except ValueError as e:  # a prompt longer than the context
                raise RequestError(str(e), param="prompt") from None
        used_prompt = sum(o.prompt_tokens for o in outs)
        used_completion = sum(o.completion_tokens for o in outs)
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": self.name,
                "choices": [{"text": o.text, "index": i, "logprobs": None, "finish_reason": o.finish_reason}
                            for i, o in enumerate(outs)],
                "usage": {"prompt_tokens": used_prompt, "completion_tokens": used_completion,
                          "total_tokens": used_prompt + used_completion}}

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
            self._error(RequestError(f"no route {self.path}; use /v1/models or POST /v1/completions", 404))

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") not in ("/v1/completions", "/completions"):
            self._error(RequestError(f"no route {self.path}; use POST /v1/completions", 404))
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
            self._send(200, self.server.app.complete(body))
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
