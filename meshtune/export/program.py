"""`--format program`: model.pt2, `torch.export` of the merged (or shrunk) model, tokens (1, T) -> logits,
loadable with `torch.export.load(path).module()` where meshtune is not installed. A run whose recipes cannot
be merged is exported with its recipe modules."""

from __future__ import annotations

from meshtune.config import read_yaml
from meshtune.export.base import Format, register

FILE = "model.pt2"


def write(run, out, opts) -> list:
    import torch

    from meshtune.export.shrunk import compressed_state
    from meshtune.models import build_model
    from meshtune.recipes.prune.export import export_program

    art = run.artifact
    state, model_cfg = compressed_state(run)
    data = read_yaml(opts.run_dir / "config.yaml").get("data") or {}
    seq_len = min(int(data.get("seq_len") or model_cfg.max_seq_len), model_cfg.max_seq_len)
    if state is None:
        model = run.model
    else:
        model = build_model(model_cfg, art.vocab_size)
        model.load_state_dict(state)
        model.eval()
    with torch.no_grad():
        return [export_program(model, seq_len, out / FILE)]


register(Format("program", "torch.export program (model.pt2), runs with torch alone", write))
