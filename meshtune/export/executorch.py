"""`--format executorch`: executorch/model.pte, an ExecuTorch program of the trained decoder that generates, with
model.json (what generation needs: vocabulary, cache length, BOS and stop tokens, scheme) and the run's tokenizer
files and chat template beside it.

    meshtune export runs/tiny --format executorch                        # fp32, or the run's QAT scheme
    meshtune export runs/tiny --format executorch --scheme int8-int4 --max-seq-len 128
    meshtune generate --program runs/tiny/executorch/model.pte --prompt "reverse: abc"

The program is `meshtune.export.program_decoder.ProgramDecoder` (a fixed-size KV cache in mutable buffers; one
`forward(tokens (1, T), input_pos (T,)) -> logits (1, T, V)` method for prefill and decode) lowered with the
XNNPACK delegate and ExecuTorch's LLM kernels (custom_sdpa, update_cache; the runtime needs them registered:
`meshtune.export.program_decoder.load_runtime_ops`). The model is the run's merged (and, for structured pruning,
shrunk) dense decoder, so distillation students and shrunk models export as the smaller decoders they are.
Schemes, as for `--format quantized` (torchao `Int8DynamicActivationIntxWeightConfig` over `recipe.qat.targets`):
    fp32        the weights as trained (default for runs without QAT);
    int8-int4   int8 dynamic per-token activations + int4 weights in groups of recipe.qat.group_size (XNNPACK
                needs a multiple of 32);
    int8-int8   the same with int8 weights, one scale per output channel (XNNPACK's int8 weights are per
                channel only, whatever recipe.qat.group_size says).
Quantized schemes also quantize what `recipe.qat.targets` leaves out by default (`quantize_program_model`): the
output head with the scheme's config (XNNPACK), and the token embedding weight-only with the scheme's weight bits
and groups (ExecuTorch's `quantized_decomposed.embedding_byte` / `embedding_4bit` kernels); a tied head gets its own
quantized copy. model.json records both ("head", "embedding"). On the demo's model (byte vocabulary, dim 128) the
fp32 embedding and head were ~30% of the int8 file. Nothing else of size is in the file: the KV cache is planned
memory (its initial value is not serialized); beyond the weights a program holds its rotary tables (cache rows
only), XNNPACK's graph descriptions and the flatbuffer (measured: +44 KiB on 2.4 MiB fp32, +52 KiB on 678 KiB int8).
A QAT run exports with its trained scheme by default; torchao's convert step equals quantizing the merged
weights with the same config, which is what is done here (so shrinking composes with it).
Needs the optional extra: `pip install 'meshtune[executorch]'`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

from meshtune.config import ConfigError, read_yaml
from meshtune.export.base import Format, human_size, register

FILE = "model.pte"
SCHEMES = ("fp32", "int8-int4", "int8-int8")
EMBEDDING_OP = {8: "byte", 4: "4bit"}  # ExecuTorch's quantized embedding kernel per weight width


def program_scheme(run, scheme: str | None):
    """(scheme, QuantConfig or None) of the program: `--scheme`, else the run's QAT scheme, else fp32.

    Raises:
        ConfigError: for an unknown scheme, a quantized scheme other than the one a QAT run trained with, or an
            int4 group size XNNPACK cannot run.
    """
    c = run.artifact.recipe_cfg.qat
    trained = any("quantized" in r.export_formats() for r in run.recipes)
    if scheme is not None and scheme not in SCHEMES:
        raise ConfigError(f"--scheme: {scheme!r} is not one of {', '.join(SCHEMES)}; pick one of them")
    if scheme is None:
        scheme = c.scheme if trained else "fp32"
    if trained and scheme not in ("fp32", c.scheme):
        raise ConfigError(f"--scheme: this run trained with recipe.qat.scheme={c.scheme}; converting it to "
                          f"{scheme} would discard its QAT; omit --scheme (or give fp32)")
    if scheme == "fp32":
        return scheme, None
    if scheme == "int8-int8":
        return scheme, dataclasses.replace(c, scheme=scheme, group_size=0)
    if c.group_size % 32:
        raise ConfigError(f"--scheme int8-int4: recipe.qat.group_size={c.group_size} but XNNPACK runs int4 groups of "
                          "a multiple of 32 only; use --scheme int8-int8 (or train with group_size=32)")
    return scheme, dataclasses.replace(c, scheme=scheme)


def program_model(run):
    """The dense fp32 decoder to export: recipes merged, structured pruning cut out."""
    from meshtune.export.base import dense_model
    from meshtune.export.shrunk import compressed_state

    state, model_cfg = compressed_state(run)
    assert state is not None, "the format is registered merges=True: recipes were checked mergeable"
    return dense_model(model_cfg, run.artifact.vocab_size, state)


def quantize_program_model(model, qcfg):
    """Quantize `model` in place as its program runs it: the scheme's `recipe.qat.targets` (torchao
    `Int8DynamicActivationIntxWeightConfig`, XNNPACK's kernels), the output head with the same config, and the
    token embedding weight-only with the scheme's weight bits and groups (torchao `IntxWeightOnlyConfig`, lowered to
    ExecuTorch's quantized embedding kernels). A tied head gets its own quantized copy (an int8 head + an int8
    table are half the bytes of the one fp32 table they replace).

    Returns:
        (model, {"head": ..., "embedding": ...}): descriptions for model.json.
    """
    import torch
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    from meshtune.recipes.qat import ptq
    from meshtune.recipes.qat.recipe import WEIGHT_BITS

    targets = qcfg.targets if "output" in qcfg.targets else [*qcfg.targets, "output"]
    model = ptq(model, dataclasses.replace(qcfg, targets=targets))
    bits, group = WEIGHT_BITS[qcfg.scheme], qcfg.group_size
    config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"),
                                  granularity=PerGroup(group) if group else PerAxis(0))
    quantize_(model, config, filter_fn=lambda m, fqn: fqn == "tok_embeddings")
    per = f"groups of {group}" if group else "one scale per row"
    return model, {"head": f"int8 dynamic activations, int{bits} weights ({per}; XNNPACK)",
                   "embedding": f"int{bits} weight-only ({per}; quantized_decomposed.embedding_{EMBEDDING_OP[bits]})"}


def write_program(model, path, max_seq_len: int):
    """Lower `model` with a `max_seq_len` KV cache and write the .pte to `path`."""
    from meshtune.export.program_decoder import lower

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lower(model, max_seq_len).buffer)
    return path


def copy_tokenizer(run_dir, out) -> tuple[str, str | None, list]:
    """Copy the run's tokenizer files (and chat template) to `out`: ("byte" or "." (the folder), the chat
    template's file name or None, the written files)."""
    from meshtune.export.hf import tokenizer_source
    from meshtune.models.hf import COPIED_FILES, TOKENIZER_FILES

    written, tokenizer, template = [], "byte", None
    source = tokenizer_source(run_dir)
    if source is not None:
        for name in (*TOKENIZER_FILES, *COPIED_FILES):
            if (source / name).is_file():
                written.append(shutil.copyfile(source / name, out / name))
        tokenizer = "."
        template = "chat_template.jinja" if (out / "chat_template.jinja").is_file() else None
    spec = (read_yaml(run_dir / "config.yaml").get("data") or {}).get("chat_template")
    if spec:  # the run's own template, the one it trained with
        from meshtune.data.chat import load_template

        (out / "chat_template.jinja").write_text(load_template(spec)[0], encoding="utf-8")
        template = "chat_template.jinja"
        written.append(out / template)
    return tokenizer, template, written


def write(run, out, opts) -> list:
    from meshtune.data import build_tokenizer
    from meshtune.export.program_decoder import check_program_model
    from meshtune.export.quantized import fp32_bytes
    from meshtune.export.static_cache import require_executorch

    art = run.artifact
    check_program_model(art.model_cfg)  # before the install check: no install makes it work
    require_executorch()
    scheme, qcfg = program_scheme(run, opts.scheme)
    model = program_model(run)
    max_seq_len = opts.max_seq_len or model.cfg.max_seq_len
    fp32 = fp32_bytes(dict(model.state_dict()))
    quantized = {"head": "fp32", "embedding": "fp32"}
    if qcfg is not None:
        model, quantized = quantize_program_model(model, qcfg)
    path = write_program(model, out / FILE, max_seq_len)
    tokenizer, template, files = copy_tokenizer(opts.run_dir, out)
    tok = build_tokenizer(art.tokenizer if tokenizer == "byte" else str(out))
    meta = {"format": "meshtune.executorch", "program": FILE, "method": "forward", "scheme": scheme,
            "group_size": qcfg.group_size if qcfg else None, **quantized, "max_seq_len": max_seq_len,
            "vocab_size": art.vocab_size, "tokenizer": tokenizer, "bos": list(tok.bos),
            "stop_ids": list(tok.stop_ids), "pad_id": tok.pad_id, "chat_template": template, "step": art.step,
            "model": dataclasses.asdict(model.cfg),
            "inputs": "tokens (1, T) int64, input_pos (T,) int64: consecutive positions < max_seq_len",
            "outputs": "logits (1, T, vocab_size) float32"}
    (out / "model.json").write_text(json.dumps(meta, indent=1))
    if not opts.quiet:
        size = path.stat().st_size
        group = f" group_size={qcfg.group_size}" if qcfg else ""
        print(f"meshtune export: ExecuTorch program, {scheme}{group}, KV cache of {max_seq_len} positions: "
              f"{human_size(size)}, {size / fp32:.2f}x the {human_size(fp32)} of its fp32 weights")
    return [path, out / "model.json", *files]



register(Format("executorch", "ExecuTorch program (XNNPACK) that generates, with a static KV cache "
                "(executorch/model.pte); fp32, int8-int8 or int8-int4", write, out_dir="executorch", merges=True))
