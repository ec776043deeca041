"""`--format peft`: adapter_config.json + adapter_model.safetensors in Hugging Face PEFT's layout for the
model family's HF model, loadable with `peft.PeftModel.from_pretrained(hf_model, dir)`. Default out: RUN_DIR/peft."""

from __future__ import annotations

import json

from meshtune.config import ConfigError
from meshtune.export.base import Format, register, save_safetensors


def write(run, out, opts) -> list:
    from meshtune.models.hf import is_hf_dir
    from meshtune.recipes import export_state

    (recipe,) = run.recipes  # check_format: every recipe offers peft
    m = run.artifact.model_cfg
    try:
        tensors, conf = recipe.peft_files(export_state(run.state, run.recipes), m)
    except ValueError as e:
        raise ConfigError(f"--format peft: {e}") from None
    from meshtune.config import read_yaml

    init_from = read_yaml(opts.run_dir / "config.yaml").get("init_from") or ""
    if init_from and is_hf_dir(init_from):  # the HF model the adapter belongs on, for peft's loaders
        conf["base_model_name_or_path"] = str(init_from)
    written = [save_safetensors(tensors, out / "adapter_model.safetensors", {"format": "pt"})]
    (out / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    return [out / "adapter_config.json", *written]


register(Format("peft", "Hugging Face PEFT adapter dir (LoRA only)", write, out_dir="peft", recipe_format="all",
                requires="Hugging Face PEFT export covers recipe.name=lora only"))
