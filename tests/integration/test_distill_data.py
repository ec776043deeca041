"""Black-box distillation end to end over real HTTP on loopback: `meshtune serve` on a tiny trained checkpoint,
`meshtune distill-data` against it (batched, resumable, retried, the API key never shown), and the output read
by the training data loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-test-5ecret-0f-distill"


def cli(*args, env=None, timeout=120):
    """`meshtune ARGS` in a fresh process; (returncode, stdout, stderr)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("MESHTUNE_API_KEY", "OPENAI_API_KEY")}
    full_env = {**clean, "PYTHONPATH": str(REPO), **(env or {})}
    p = subprocess.run([sys.executable, "-m", "meshtune", *args], capture_output=True, text=True, env=full_env,
                       timeout=timeout, cwd=REPO)
    return p.returncode, p.stdout, p.stderr


def prompts_file(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "response": "ignored"}) + "\n" for p in prompts))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny model trained on `reverse` a few steps, served by `meshtune serve RUN --port 0` in a subprocess."""
    from meshtune.runtime.env import DistEnv
    from meshtune.runtime.run import build_trainer
    from tests.distributed.cases import tiny_config

    root = tmp_path_factory.mktemp("serve")
    build_trainer(tiny_config(str(root / "run"), "train.steps=4", "checkpoint.save_final=true"), DistEnv()).fit()
    proc = subprocess.Popen([sys.executable, "-m", "meshtune", "serve", str(root / "run"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    line = proc.stdout.readline()
    assert "/v1" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    url = line.split(" at ")[1].split()[0]
    yield {"url": url, "run": root / "run", "root": root}
    proc.terminate()
    assert proc.wait(timeout=20) == 0


def post(url, body):
    req = urllib.request.Request(url + "/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def local_greedy(run, prompts, max_tokens):
    import torch

    from meshtune.artifacts import find, load_model
    from meshtune.data import build_tokenizer
    from meshtune.inference import generate

    model = load_model(find(run), torch.device("cpu"))
    return [c.text for c in generate(model, build_tokenizer("byte"), prompts, max_tokens)]


def test_serve_speaks_openai_completions(served):
    url = served["url"]
    with urllib.request.urlopen(url + "/models", timeout=30) as r:
        models = json.loads(r.read())
    assert models["data"][0]["id"] == "run"
    prompts = ["reverse: abcd\n", "reverse: hello\n", "reverse: xy\n"]
    reply = post(url, {"model": "run", "prompt": prompts, "max_tokens": 5, "temperature": 0})
    assert reply["object"] == "text_completion" and [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert [c["text"] for c in reply["choices"]] == local_greedy(served["run"], prompts, 5)
    assert all(c["finish_reason"] in ("stop", "length") for c in reply["choices"])
    assert reply["usage"]["total_tokens"] == reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"]
    one = post(url, {"prompt": "reverse: abcd\n", "max_tokens": 5, "temperature": 0})
    assert one["choices"][0]["text"] == reply["choices"][0]["text"]
    for body, status, param in [({"prompt": "x", "model": "other"}, 404, "model"),
                                ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
                                ({"prompt": [1, 2]}, 400, "prompt"), ({"prompt": "x", "n": 2}, 400, "n")]:
        with pytest.raises(urllib.error.HTTPError) as err:
            post(url, body)
        assert err.value.code == status and json.loads(err.value.read())["error"]["param"] == param


def test_distill_data_over_http_then_trains(served, tmp_path):
    from meshtune.config import DataConfig
    from meshtune.data import build_tokenizer, load_jsonl
    from meshtune.data.datasets import build_datasets

    prompts = [f"reverse: {w}\n" for w in ("abc", "hello", "qwerty", "zz", "meshtune", "kd", "abc")]
    out = tmp_path / "out.jsonl"
    code, stdout, stderr = cli("distill-data", "--prompts", str(prompts_file(tmp_path / "p.jsonl", prompts)),
                               "--out", str(out), "--url", served["url"], "--batch-size", "3", "--max-tokens", "6",
                               env={"MESHTUNE_API_KEY": KEY})
    assert code == 0, stderr
    records = load_jsonl(out)  # the training loader's own reader
    assert [r["prompt"] for r in records] == prompts
    assert [r["response"] for r in records] == local_greedy(served["run"], prompts, 6)
    assert "7/7 prompts answered" in stdout
    assert KEY not in stdout + stderr + out.read_text()
    train, _ = build_datasets(DataConfig(task="", train_path=str(out), seq_len=24, num_eval=2),
                              build_tokenizer("byte"), 0)
    assert len(train) == 5
    # a second run finds everything done and asks nothing
    code, stdout, _ = cli("distill-data", "--prompts", str(tmp_path / "p.jsonl"), "--out", str(out),
                          "--url", served["url"])
    assert code == 0 and "7 already in" in stdout and "0 to ask" in stdout
    assert len(load_jsonl(out)) == 7


class Fake(BaseHTTPRequestHandler):
    """A scripted completions server: each POST pops the next status of `server.script` (200 when empty),
    records the prompts it answered and the Authorization header it saw."""

    protocol_version = "HTTP/1.1"

    def _send(self, status, payload, headers=()):
        data = json.dumps(payload).encode()
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self._send(200, {"data": [{"id": "fake"}]})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.auth.append(self.headers.get("Authorization"))
        status = self.server.script.pop(0) if self.server.script else 200
        if status == 200:
            self.server.answered += body["prompt"]
            self._send(200, {"choices": [{"index": i, "text": p.upper()} for i, p in enumerate(body["prompt"])]})
        elif status == 401:  # a careless server that echoes the credentials it got
            self._send(401, {"error": {"message": f"bad key {self.headers.get('Authorization')}"}})
        else:
            self._send(status, {"error": {"message": "busy"}}, [("Retry-After", "0")] if status == 429 else [])

    def log_message(self, *args):
        pass


@pytest.fixture
def fake():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    server.script, server.answered, server.auth = [], [], []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()
    server.server_close()


def test_resume_asks_only_the_rest(fake, tmp_path):
    prompts = [f"p{i}" for i in range(6)]
    pfile = prompts_file(tmp_path / "p.jsonl", prompts)
    out = tmp_path / "out.jsonl"
    # pre-filled by an earlier run that was killed while writing its third record
    out.write_text(json.dumps({"prompt": "p0", "response": "P0"}) + "\n"
                   + json.dumps({"prompt": "p3", "response": "P3"}) + "\n" + '{"prompt": "p1", "resp')
    code, stdout, stderr = cli("distill-data", "--prompts", str(pfile), "--out", str(out), "--url", fake.url,
                               "--batch-size", "2")
    assert code == 0, stderr
    assert fake.answered == ["p1", "p2", "p4", "p5"]
    got = {r["prompt"]: r["response"] for r in map(json.loads, out.read_text().splitlines())}
    assert got == {p: p.upper() for p in prompts} and len(out.read_text().splitlines()) == 6


def test_stopped_half_way_then_resumed(fake, tmp_path):
    pfile = prompts_file(tmp_path / "p.jsonl", [f"p{i}" for i in range(6)])
    out = tmp_path / "out.jsonl"
    fake.script = [200, 400]  # the second batch fails for good: the first is kept
    code, _, stderr = cli("distill-data", "--prompts", str(pfile), "--out", str(out), "--url", fake.url,
                          "--batch-size", "3")
    assert code == 2 and "HTTP 400" in stderr and len(stderr.strip().splitlines()) == 1
    assert fake.answered == ["p0", "p1", "p2"] and len(out.read_text().splitlines()) == 3
    code, _, _ = cli("distill-data", "--prompts", str(pfile), "--out", str(out), "--url", fake.url,
                     "--batch-size", "3")
    assert code == 0 and fake.answered == [f"p{i}" for i in range(6)]


def test_retries_with_backoff_and_sends_the_key_unseen(fake, tmp_path):
    from meshtune.distill_data import CompletionsClient, distill_data

    fake.script = [503, 429, 502]
    waits, shown = [], []
    client = CompletionsClient(fake.url, api_key=KEY, sleep=waits.append, log=shown.append)
    assert client.model == "fake" and KEY not in repr(client)
    pfile = prompts_file(tmp_path / "p.jsonl", ["a", "b", "c"])
    summary = distill_data(pfile, tmp_path / "out.jsonl", client, batch_size=8, log=shown.append)
    assert summary == {"total": 3, "skipped": 0, "written": 3}
    assert waits == [0.5, 0.0, 2.0]  # 0.5 * 2^attempt, Retry-After: 0 honoured for the 429
    assert fake.auth and all(a == f"Bearer {KEY}" for a in fake.auth)
    assert not any(KEY in m for m in shown)


def test_key_never_leaks_from_errors(fake, tmp_path):
    fake.script = [401]
    pfile = prompts_file(tmp_path / "p.jsonl", ["a"])
    out = tmp_path / "out.jsonl"
    code, stdout, stderr = cli("distill-data", "--prompts", str(pfile), "--out", str(out), "--url", fake.url,
                               env={"OPENAI_API_KEY": KEY})
    assert code == 2 and "HTTP 401" in stderr and "bad key Bearer ***" in stderr
    assert fake.auth[-1] == f"Bearer {KEY}"  # it was sent ...
    assert KEY not in stdout + stderr + (out.read_text() if out.exists() else "")  # ... and never shown


def test_retries_give_up_with_one_line(tmp_path):
    import socket

    from meshtune.config import ConfigError
    from meshtune.distill_data import CompletionsClient

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    waits = []
    with pytest.raises(ConfigError, match=r"^--url: .* failed 3 times"):
        CompletionsClient(f"http://127.0.0.1:{port}/v1", retries=2, sleep=waits.append, log=lambda m: None)
    assert waits == [0.5, 1.0]


def test_local_teacher_without_http(served, tmp_path):
    from meshtune.cli import main

    prompts = ["reverse: abc\n", "reverse: hello\n"]
    out = tmp_path / "out.jsonl"
    assert main(["distill-data", "--prompts", str(prompts_file(tmp_path / "p.jsonl", prompts)), "--out", str(out),
                 "--teacher", str(served["run"]), "--max-tokens", "6"]) == 0
    assert [json.loads(x)["response"] for x in out.read_text().splitlines()] == local_greedy(served["run"], prompts, 6)


def test_cli_errors(tmp_path):
    code, _, stderr = cli("distill-data", "--prompts", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"),
                          "--url", "http://127.0.0.1:9/v1", "--model", "m")
    assert code == 2 and stderr.startswith("meshtune: error: --prompts:")
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt"}\n')
    code, _, stderr = cli("distill-data", "--prompts", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o"),
                          "--url", "ftp://x", "--model", "m")
    assert code == 2 and "--url" in stderr
    code, _, stderr = cli("serve", str(tmp_path / "missing"), "--port", "0")
    assert code == 2 and stderr.startswith("meshtune: error: CHECKPOINT:")
