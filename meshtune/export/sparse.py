"""`--format sparse`: sparse.safetensors, each pruned weight as CSR or the packed 2:4 layout where that is
smaller than dense (meshtune.recipes.prune.export), the layouts in the metadata. Offered by recipes whose
`export_formats()` list it; they provide `sparse_tensors(state, merged) -> (tensors, layouts)`. Loaded back
dense by `meshtune.artifacts`."""

from __future__ import annotations

import json

from meshtune.export.base import Format, merged_state, metadata, register, save_safetensors

FILE = "sparse.safetensors"


def write(run, out, opts) -> list:
    merged = merged_state(run)
    recipe = next(r for r in run.recipes if "sparse" in r.export_formats())
    tensors, layouts, summary = recipe.sparse_tensors(run.state, merged)
    path = save_safetensors(tensors, out / FILE, {**metadata(run, "sparse"), "meshtune.sparse": json.dumps(layouts)})
    if not opts.quiet:
        dense = sum(t.numel() * t.element_size() for t in merged.values())
        print(f"  sparse: {summary}; {path.stat().st_size} bytes on disk vs {dense} bytes of dense tensors "
              f"({path.stat().st_size / dense:.2f}x)")
    return [path]


register(Format("sparse", "pruned weights as CSR or packed 2:4 (sparse.safetensors)", write, merges=True,
                recipe_format="any"))
