"""`--format hf`: a Hugging Face Llama checkpoint directory (config.json + model.safetensors, recipes folded
in as for `merged`) that `transformers.LlamaForCausalLM.from_pretrained(dir)` loads with the same logits. The
tokenizer files of the run's `data.tokenizer` folder, or else of its `init_from` HF directory, are copied
alongside. Default out: RUN_DIR/hf."""

from __future__ import annotations

from pathlib import Path

from meshtune.export.base import Format, merged_state, register


def tokenizer_source(run_dir: str | Path) -> Path | None:
    """The folder whose tokenizer files an HF export copies: the run's `data.tokenizer` file's folder (the
    tokenizer it trained with), else its `init_from` when that is an HF directory; None for the byte tokenizer."""
    from meshtune.config import read_yaml
    from meshtune.models.hf import TOKENIZER_FILES, is_hf_dir

    raw = read_yaml(Path(run_dir) / "config.yaml")
    tokenizer = (raw.get("data") or {}).get("tokenizer") or "byte"
    init_from = raw.get("init_from") or ""
    for folder in [Path(tokenizer).parent if tokenizer != "byte" else None,
                   Path(init_from) if init_from and is_hf_dir(init_from) else None]:
        if folder is not None and any((folder / f).is_file() for f in TOKENIZER_FILES):
            return folder
    return None


def write(run, out, opts) -> list:
    from meshtune.models.hf import INDEX_FILE, TOKENIZER_FILES, save_hf_checkpoint

    source = tokenizer_source(opts.run_dir)
    art = run.artifact
    save_hf_checkpoint(merged_state(run), art.model_cfg, art.vocab_size, out, tokenizer_dir=source)
    if source is None and not opts.quiet:
        print("meshtune export: no tokenizer files copied (the run used the byte tokenizer, or its tokenizer "
              "folder is gone); transformers loads the weights, give it a tokenizer yourself")
    names = ["config.json", *sorted(p.name for p in out.glob("model*.safetensors")), INDEX_FILE, *TOKENIZER_FILES]
    return [out / n for n in names if (out / n).is_file()]


register(Format("hf", "Hugging Face Llama dir for transformers, recipes folded in, tokenizer copied", write,
                out_dir="hf", merges=True))
