"""`--format hf`: a Hugging Face checkpoint directory of the model's family (config.json + safetensors, sharded
with an index above 5 GiB, recipes folded in as for `merged`) that `AutoModelForCausalLM.from_pretrained(dir)`
loads with the same logits. Weights in `--dtype`, by default the dtype of the run's `init_from` HF checkpoint
(usually bf16: a float32 export would double its size), else fp32. The tokenizer files (chat template included)
and generation_config.json of the run's `data.tokenizer` folder, or else of its `init_from` HF directory, are
copied alongside; a run given `data.chat_template` gets that template as chat_template.jinja, which transformers
reads before tokenizer_config.json's. Default out: RUN_DIR/hf."""

from __future__ import annotations

import shutil
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
    tok_dir = None if tokenizer == "byte" else Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent
    for folder in [tok_dir,
                   Path(init_from) if init_from and is_hf_dir(init_from) else None]:
        if folder is not None and any((folder / f).is_file() for f in TOKENIZER_FILES):
            return folder
    return None


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def hf_source(run_dir: str | Path) -> Path | None:
    """The run's init_from, when it is an HF directory."""
    from meshtune.config import read_yaml
    from meshtune.models.hf import is_hf_dir

    init_from = read_yaml(Path(run_dir) / "config.yaml").get("init_from") or ""
    return Path(init_from) if init_from and is_hf_dir(init_from) else None


def source_dtype(run_dir: str | Path) -> str:
    """The weight dtype of the run's init_from HF checkpoint (config.json `dtype` / `torch_dtype`), else float32."""
    from meshtune.models.hf import read_hf_json

    src = hf_source(run_dir)
    if src is None:
        return "float32"
    hf = read_hf_json(src)
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return name if name in DTYPES.values() else "float32"


def write(run, out, opts) -> list:
    import torch

    from meshtune.config import read_yaml
    from meshtune.models.hf import COPIED_FILES, INDEX_FILE, TOKENIZER_FILES, save_hf_checkpoint

    source = tokenizer_source(opts.run_dir)
    art = run.artifact
    dtype = getattr(torch, DTYPES[opts.dtype] if opts.dtype else source_dtype(opts.run_dir))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in merged_state(run).items()}
    save_hf_checkpoint(state, art.model_cfg, art.vocab_size, out, tokenizer_dir=source)
    init_dir = hf_source(opts.run_dir)
    for fname in COPIED_FILES:  # the release's sampling defaults, also when the tokenizer came from elsewhere
        if init_dir is not None and (init_dir / fname).is_file() and not (out / fname).is_file():
            shutil.copyfile(init_dir / fname, out / fname)
    template = (read_yaml(Path(opts.run_dir) / "config.yaml").get("data") or {}).get("chat_template")
    if template:  # the run's own template, not the folder's: write the one it trained with
        from meshtune.data.chat import load_template

        (out / "chat_template.jinja").write_text(load_template(template)[0], encoding="utf-8")
    if source is None and not opts.quiet:
        print("meshtune export: no tokenizer files copied (the run used the byte tokenizer, or its tokenizer "
              "folder is gone); transformers loads the weights, give it a tokenizer yourself")
    names = ["config.json", *sorted(p.name for p in out.glob("model*.safetensors")), INDEX_FILE, *TOKENIZER_FILES,
             *COPIED_FILES]
    return [out / n for n in names if (out / n).is_file()]


register(Format("hf", "Hugging Face dir of the model's family, recipes folded in, tokenizer copied", write,
                out_dir="hf", merges=True))
