"""`meshtune serve CHECKPOINT`: an OpenAI-compatible completions endpoint (meshtune/serve.py)."""

from __future__ import annotations


def add(sub):
    p = sub.add_parser("serve", help="serve a checkpoint behind OpenAI-compatible /v1/completions and "
                       "/v1/chat/completions",
                       description="an OpenAI-compatible completions server for a model, on loopback by default")
    p.add_argument("checkpoint", help="a run dir, step_N checkpoint, merged .safetensors file or HF Llama dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free one; the URL is printed)")
    p.add_argument("--tokenizer", help="data.tokenizer of the model (default: the run's, else byte)")
    p.add_argument("--name", help="the model id clients send (default: the run dir's or file's name)")
    p.add_argument("--chat-template", help="Jinja chat template (file or text) for /v1/chat/completions (default: "
                   "the run's data.chat_template, else the tokenizer folder's)")
    return p


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args) -> int:
    from meshtune.config import ConfigError

    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port: {args.port} is not a port number; give 0-65535 (0 = any free port)")
    from meshtune.serve import CompletionModel, make_server

    app = CompletionModel(args.checkpoint, args.tokenizer, args.name, args.chat_template)
    try:
        server = make_server(app, args.host, args.port)
    except OSError as e:
        raise ConfigError(f"--port: cannot listen on {args.host}:{args.port} ({e.strerror}); pick another port "
                          "or 0") from None
    host, port = server.server_address[:2]
    print(f"meshtune serve: model {app.name!r} at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    import signal

    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: close the socket, exit 0
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
