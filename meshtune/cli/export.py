"""`meshtune export RUN_DIR --format FORMAT`: a run's checkpoint in a format other tools load."""

from __future__ import annotations

from meshtune.config import ConfigError


def add(sub):
    p = sub.add_parser("export", help="write a run's checkpoint as merged safetensors, an adapter, a PEFT or HF "
                       "dir, a sparse, shrunk or quantized model, or a torch.export program")
    p.add_argument("run_dir", help="the run_dir of a training run (it holds config.yaml and checkpoints/)")
    p.add_argument("--format", dest="fmt", metavar="FORMAT",
                   help="merged (full weights, LoRA folded in), adapter (only the recipe's tensors), peft "
                        "(Hugging Face PEFT dir; LoRA only), hf (Hugging Face dir of the model's family, LoRA "
                        "folded in, tokenizer files copied), sparse / shrunk (pruned runs), program "
                        "(torch.export .pt2), quantized (torchao int8/int4; QAT runs converted, others PTQ) or "
                        "executorch (.pte program with a KV cache for the ExecuTorch runtime; pip install "
                        "'meshtune[executorch]')")
    p.add_argument("--out", help="output directory (default: the run dir; for peft: RUN_DIR/peft, hf: RUN_DIR/hf)")
    p.add_argument("--step", help="export this checkpoint step (default: the newest complete one)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="--format hf: weight dtype (default: that of the run's init_from HF checkpoint, else fp32)")
    p.add_argument("--scheme", choices=("fp32", "int8-int4", "int8-int8"),
                   help="--format quantized / executorch: weight scheme (default: the run's recipe.qat.scheme; "
                        "executorch: fp32 for runs without QAT)")
    p.add_argument("--max-seq-len", type=int, help="--format executorch: KV-cache length, the most tokens (prompt + "
                   "generated) the program holds (default: model.max_seq_len)")
    return p


def run(args) -> int:
    from meshtune.export import FORMATS, export

    if args.fmt is None:
        raise ConfigError(f"--format: missing; give one of {', '.join(FORMATS)}")
    if args.max_seq_len is not None and args.fmt != "executorch":
        raise ConfigError(f"--max-seq-len: only for --format executorch (a program's KV-cache length), not {args.fmt}; "
                          "drop it")
    step = None
    if args.step is not None:
        if not args.step.isdigit():
            raise ConfigError(f"--step: {args.step!r} is not a step number; give e.g. --step 100")
        step = int(args.step)
    export(args.run_dir, args.fmt, args.out, step, scheme=args.scheme, dtype=args.dtype, max_seq_len=args.max_seq_len)
    return 0
