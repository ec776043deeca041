"""The artifact layer: find and load any model meshtune reads, for every engine, in one place.

    art = find("runs/tiny", key="recipe.distill.teacher")   # run dir, step_N, merged/shrunk/sparse file,
                                                              # quantized export or Hugging Face directory
    model = load_model(art, device)                           # frozen, eval mode (inference, serve, teachers)
    run = load_run(art)                                       # a checkpoint's model + recipes + state (export)
    load_weights(model, art, expected, recipe_owned)          # init_from into a model being trained

Every pickle on the way is read through an allow-list (`meshtune.artifacts.safe`): a checkpoint from
elsewhere can hold tensors and DCP's metadata, never code.
"""

from meshtune.artifacts.find import Artifact, complete_checkpoints, find, find_checkpoint, run_config
from meshtune.artifacts.load import LoadedRun, build, load_model, load_run, load_weights

__all__ = ["Artifact", "ArtifactLoader", "LoadedRun", "build", "complete_checkpoints", "find", "find_checkpoint",
           "load_model", "load_run", "load_weights", "run_config"]


class ArtifactLoader:
    """What recipes may load (a distillation teacher), handed to `Recipe.setup` by the runtime so that recipes
    do not import this layer (which builds models with recipes applied)."""

    find = staticmethod(find)
    load_model = staticmethod(load_model)
