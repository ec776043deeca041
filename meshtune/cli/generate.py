"""`meshtune generate RUN_OR_EXPORT --prompt TEXT`: greedy text from a model, eager or through an ExecuTorch program.

    meshtune generate runs/tiny --prompt "reverse: abc" --max-new-tokens 16         # meshtune's eager model
    meshtune generate --program runs/tiny/executorch/model.pte --prompt "reverse: abc"   # the ExecuTorch runtime

Both use the same tokenizer, BOS and stop tokens, and give the same tokens for an fp32 program.
"""

from __future__ import annotations

from meshtune.config import ConfigError


def add(sub):
    p = sub.add_parser("generate", help="greedy generation from a run or export, or from an ExecuTorch program "
                       "(--program)")
    p.add_argument("model", nargs="?", help="a run dir, step_N checkpoint, exported file or HF dir (eager PyTorch)")
    p.add_argument("--program", help="a .pte written by `meshtune export --format executorch` (model.json and the "
                   "tokenizer beside it), run in the ExecuTorch runtime instead")
    p.add_argument("--prompt", required=True, help="the text to continue (encoded as in training: BOS + text)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generate at most this many tokens (default 32)")
    return p


def run(args) -> int:
    if (args.model is None) == (args.program is None):
        raise ConfigError("meshtune generate: give a model (RUN_OR_EXPORT) or --program model.pte, one of them")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if args.program is not None:
        from meshtune.inference_pte import PteProgram

        program = PteProgram(args.program)
        text = program.tokenizer.decode(program.greedy(program.encode(args.prompt), args.max_new_tokens))
    else:
        from meshtune.inference import generate, load_for_generation

        model, tokenizer, _ = load_for_generation(args.model, key="RUN_OR_EXPORT")
        try:
            text = generate(model, tokenizer, [args.prompt], args.max_new_tokens)[0].text
        except ValueError as e:  # a prompt longer than the model's context
            raise ConfigError(f"--prompt: {e}") from None
    print(text)
    return 0
