"""`meshtune distill-data --prompts F --out O --url U | --teacher CKPT` (meshtune/distill_data.py)."""

from __future__ import annotations

from meshtune.config import ConfigError
from meshtune.distill_data import KEY_ENV


def add(sub):
    p = sub.add_parser("distill-data", help="write a teacher's responses to a prompt file as training JSONL",
                       description="a teacher's responses to a prompt file, as training JSONL (resumable)")
    p.add_argument("--prompts", required=True, help="JSONL file with a \"prompt\" field per line")
    p.add_argument("--out", required=True, help="JSONL to append {prompt, response} records to (resumable)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1 (key from "
                     f"{' or '.join(KEY_ENV)})")
    src.add_argument("--teacher", help="a local checkpoint (run dir, step_N, .safetensors, HF dir) instead of a URL")
    p.add_argument("--model", help="model name to request (default: the first one the server lists)")
    p.add_argument("--tokenizer", help="with --teacher: its data.tokenizer (default: the run's, else byte)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per request")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt at most")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="ask a chat teacher (each prompt a user turn, "
                   "/chat/completions) and write conversations {messages: [...]}")
    p.add_argument("--retries", type=int, default=6, help="retries of a failed request (backoff 0.5 s, doubling)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one request")
    return p


def run(args) -> int:
    from meshtune.distill_data import CompletionsClient, LocalTeacher, api_key_from_env, distill_data

    if args.retries < 0:
        raise ConfigError(f"--retries: must be >= 0, got {args.retries}")
    if args.url:
        teacher = CompletionsClient(args.url, args.model, api_key_from_env(), args.timeout, args.retries)
    else:
        teacher = LocalTeacher(args.teacher, args.tokenizer)
    distill_data(args.prompts, args.out, teacher, args.batch_size, args.max_tokens, args.temperature, args.stop,
                 chat=args.chat)
    return 0
