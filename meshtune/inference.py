"""A trained model for inference, from any checkpoint form, and batched generation from it.

    src = resolve_source("runs/tiny", key="recipe.distill.teacher")   # reads configs/metadata only
    model = load_model(src, torch.device("cpu"))                      # frozen, eval mode
    outs = generate(model, build_tokenizer(src.tokenizer), ["sort: b3a\\n"], max_tokens=16)  # greedy

A source is a meshtune run dir (config.yaml + its newest complete checkpoint), one step_N checkpoint folder,
a .safetensors file written by `meshtune export --format merged` (its metadata holds the model config), or a
Hugging Face Llama directory. Used by the distillation recipe (the teacher), `meshtune serve` and
`meshtune distill-data --teacher`.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from meshtune.config import ConfigError, ModelConfig, RecipeConfig, read_yaml


@dataclass
class ModelSource:
    """Where a model's weights are and what they need, read without loading a tensor.

    Attributes:
        weights: the step_N checkpoint folder, .safetensors file or Hugging Face directory to load.
        model_cfg: the model section the weights were trained with.
        vocab_size: rows of the embedding table.
        recipe_cfg: the run's recipe section (a LoRA teacher keeps its adapters), or None.
        tokenizer: `data.tokenizer` of the run (`byte` when unknown; tokenizer.json of an HF directory).
        name: a short name for the model (the run dir's or file's name).
    """

    weights: Path
    model_cfg: ModelConfig
    vocab_size: int
    recipe_cfg: RecipeConfig | None
    tokenizer: str
    name: str


_WHAT = "a meshtune run dir, a step_N checkpoint folder, a .safetensors file or a Hugging Face Llama directory"


def _run_tokenizer(run_dir: Path) -> str:
    data = read_yaml(run_dir / "config.yaml").get("data") or {}
    return data.get("tokenizer") or "byte"


def _dcp_vocab(ckpt: Path, key: str) -> int:
    import torch.distributed.checkpoint as dcp

    shapes = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    for name in ("model.tok_embeddings.weight", "model.output.weight"):
        if name in shapes:
            return int(shapes[name].size[0])
    raise ConfigError(f"{key}: {ckpt} holds no model.tok_embeddings.weight; it is not a meshtune model checkpoint")


def resolve_source(spec: str | Path, key: str = "checkpoint") -> ModelSource:
    """Find the weights, model config, vocabulary and tokenizer of `spec`; `key` names it in errors.

    Raises:
        ConfigError: naming `key`, for a missing path or one that is none of the supported forms.
    """
    from meshtune.export import find_checkpoint, run_config
    from meshtune.models.hf import is_hf_dir, read_hf_config

    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"{key}: {spec} does not exist; give {_WHAT}")
    if is_hf_dir(path):
        cfg = read_hf_config(path)
        tok = path / "tokenizer.json"
        return ModelSource(path, cfg, cfg.vocab_size, None, str(tok) if tok.is_file() else "byte", path.name)
    if path.is_dir() and (path / "meta.json").is_file() and (path.parent.parent / "config.yaml").is_file():
        run_dir, ckpt = path.parent.parent, path  # run_dir/checkpoints/step_N
    elif path.is_dir() and (path / "config.yaml").is_file():
        run_dir = path
        try:
            ckpt = find_checkpoint(path)
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
    elif path.is_file() and path.suffix == ".safetensors":
        return _safetensors_source(path, key)
    else:
        raise ConfigError(f"{key}: {spec} is not {_WHAT}")
    cfg = run_config(run_dir)
    return ModelSource(ckpt, cfg.model, _dcp_vocab(ckpt, key), cfg.recipe, _run_tokenizer(run_dir),
                       run_dir.resolve().name)


def _safetensors_source(path: Path, key: str) -> ModelSource:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "meshtune.model" not in meta:
        raise ConfigError(f"{key}: {path} has no meshtune model config in its metadata; give the run dir, or a "
                          "file written by `meshtune export --format merged`")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in json.loads(meta["meshtune.model"]).items() if k in fields})
    # `meshtune export` writes into the run dir by default: take the tokenizer from its config when it is there
    tok = _run_tokenizer(path.parent) if (path.parent / "config.yaml").is_file() else "byte"
    return ModelSource(path, cfg, cfg.vocab_size, None, tok, path.parent.resolve().name)


def load_model(src: ModelSource, device: torch.device, shard_mesh=None, key: str = "checkpoint") -> nn.Module:
    """Build the model of `src` and load its weights: frozen (no gradients), in eval mode.

    Built on meta and materialised once, without drawing random numbers (the caller's RNG stream is
    untouched). With `shard_mesh` (a 1-D DeviceMesh) every block and the root are FSDP2-sharded over it and
    resharded after each forward, so a rank holds 1/N of the weights between forwards.

    Raises:
        ConfigError: naming `key`, when the weights do not fit the config.
    """
    from meshtune.models import build_model
    from meshtune.models.llama import rope_tables
    from meshtune.recipes import apply_recipes, build_recipes
    from meshtune.runtime.checkpoint import load_model_weights

    model = build_model(src.model_cfg, src.vocab_size, device="meta")
    if src.recipe_cfg is not None:  # the run's own recipes (a LoRA teacher); never its distillation
        names = [n for n in src.recipe_cfg.name.split("+") if n and n != "distill"]
        model = apply_recipes(model, build_recipes(dataclasses.replace(src.recipe_cfg, name="+".join(names))))
    model.requires_grad_(False)
    if shard_mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers.values():
            fully_shard(block, mesh=shard_mesh, reshard_after_forward=True)
        fully_shard(model, mesh=shard_mesh, reshard_after_forward=True)
    model.to_empty(device=device)
    m = src.model_cfg
    cos, sin = rope_tables(m.dim // m.n_heads, m.max_seq_len, m.rope_theta, device=device)
    with torch.no_grad():
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)
    try:
        with warnings.catch_warnings():  # DCP warns that there is no process group: one process is fine here
            warnings.simplefilter("ignore", UserWarning)
            load_model_weights(model, src.weights, strict=True, model_cfg=m, vocab_size=src.vocab_size)
    except ConfigError as e:
        raise ConfigError(f"{key}: {str(e).removeprefix('init_from: ')}") from None
    except Exception as e:  # DCP wraps a missing or misshapen tensor in its own exceptions
        from meshtune.runtime.checkpoint import _first_failure

        raise ConfigError(f"{key}: {src.weights} does not fit its model config ({_first_failure(e)})") from None
    return model.eval()


@dataclass
class Completion:
    """One generated continuation: its text, why it ended (`stop` or `length`) and token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], max_tokens: int = 16, temperature: float = 0.0,
             stop: list[str] | tuple[str, ...] = (), seed: int | None = None) -> list[Completion]:
    """Continue each prompt (encoded as `[bos] + prompt`, as in training) by up to `max_tokens` tokens.

    All prompts run as one right-padded batch: a causal decoder's logits at a position never see later
    positions, so padding on the right changes nothing. temperature 0 = greedy (argmax), else sampling from
    softmax(logits / temperature) (seeded by `seed`). A sequence ends at EOS, at a `stop` string (cut before
    it), after `max_tokens` or at model.max_seq_len.

    Raises:
        ValueError: a prompt longer than the model's context.
    """
    device = next(model.parameters()).device
    limit = model.cfg.max_seq_len
    seqs = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
    for p, s in zip(prompts, seqs, strict=True):
        if len(s) >= limit:
            raise ValueError(f"prompt {p[:40]!r} has {len(s)} tokens: no room left in the model's {limit}-token "
                             "context")
    n_prompt = [len(s) for s in seqs]
    done: list[Completion | None] = [None] * len(prompts)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for _ in range(max_tokens):
        active = [i for i, d in enumerate(done) if d is None]
        if not active:
            break
        width = max(len(seqs[i]) for i in active)
        x = torch.full((len(active), width), tokenizer.pad_id, dtype=torch.long)
        for row, i in enumerate(active):
            x[row, : len(seqs[i])] = torch.tensor(seqs[i])
        logits = model(x.to(device))
        last = logits[torch.arange(len(active)), torch.tensor([len(seqs[i]) - 1 for i in active])].float().cpu()
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=gen).squeeze(1)
        else:
            nxt = last.argmax(-1)
        for row, i in enumerate(active):
            tok = int(nxt[row])
            if tok == tokenizer.eos_id:
                done[i] = _finish(tokenizer, seqs[i], n_prompt[i], "stop", stop)
                continue
            seqs[i].append(tok)
            text = tokenizer.decode(seqs[i][n_prompt[i]:])
            if any(s and s in text for s in stop):
                done[i] = _finish(tokenizer, seqs[i], n_prompt[i], "stop", stop)
            elif len(seqs[i]) >= limit:
                done[i] = _finish(tokenizer, seqs[i], n_prompt[i], "length", stop)
    return [d or _finish(tokenizer, seqs[i], n_prompt[i], "length", stop) for i, d in enumerate(done)]


def _finish(tokenizer, seq: list[int], n_prompt: int, reason: str, stop) -> Completion:
    text = tokenizer.decode(seq[n_prompt:])
    cuts = [text.find(s) for s in stop if s and s in text]
    if cuts:
        text, reason = text[: min(cuts)], "stop"
    return Completion(text, reason, n_prompt, len(seq) - n_prompt)
