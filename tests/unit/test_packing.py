"""Packing: best-fit rows whose examples never attend to each other, with positions restarting per example, give the
same per-example losses and the same gradients as one padded row per example."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from meshtune.config import ModelConfig
from meshtune.data import IGNORE_INDEX, ByteTokenizer, PackedDataset, SFTDataset, collate, model_args
from meshtune.data.rows import pack_best_fit
from meshtune.models import build_model


def _examples(n: int = 14, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    word = lambda k: "".join(rng.choice("abcdefgh") for _ in range(k))  # noqa: E731
    return [{"prompt": word(rng.randint(1, 12)) + ":", "response": word(rng.randint(1, 10))} for _ in range(n)]


def test_best_fit_places_every_example_once_within_capacity():
    rng = random.Random(3)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    rows = pack_best_fit(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= 1.1 * sum(lengths) / 64 + 1  # within 10% of the lower bound on this mix
    assert rows == pack_best_fit(lengths, 64)  # deterministic
    # 5 opens a row (2 left), 4 another (3 left); 3 fills the tighter fit exactly (beside 4), 2 beside 5
    assert pack_best_fit([5, 3, 2, 4], 7) == [[0, 2], [3, 1]]


def test_packed_rows_positions_restart_and_labels_are_kept():
    tok = ByteTokenizer()
    examples = _examples()
    flat, packed = SFTDataset(examples, tok, 48), SFTDataset(examples, tok, 48, packing=True)
    assert len(packed) < len(flat) and packed.positions is not None and flat.positions is None
    assert (packed.labels != IGNORE_INDEX).sum() == (flat.labels != IGNORE_INDEX).sum()
    for r, group in enumerate(packed.groups):
        at = 0
        for i in group:
            n = int((flat.input_ids[i] != tok.pad_id).sum())
            assert packed.positions[r, at:at + n].tolist() == list(range(n))
            assert torch.equal(packed.labels[r, at:at + n], flat.labels[i, :n])
            at += n


CONFIGS = {
    "llama": ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48),
    "window+local-rope": ModelConfig(dim=32, n_layers=2, n_heads=4, max_seq_len=48, sliding_window=5,
                                     layer_types=["sliding_attention", "full_attention"], rope_local_theta=100.0),
}


def _per_example_losses(model, ds, per_row_groups):
    """Summed token loss of each example, from batched forwards of the dataset's rows."""
    batch = collate([ds[i] for i in range(len(ds))])
    logits = model(*model_args(batch, torch.device("cpu")))
    tok_loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                               reduction="none").view(batch["labels"].shape)
    out = {}
    for r, group in enumerate(per_row_groups):
        if "positions" not in batch:
            out[group[0]] = tok_loss[r].sum()
            continue
        seg = (batch["positions"][r] == 0).cumsum(0) - 1  # 0, 1, ... per example, then padding
        for k, i in enumerate(group):
            out[i] = tok_loss[r][seg == k].sum()
    return out, tok_loss.sum()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_equals_unpacked_losses_and_gradients(name):
    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = build_model(CONFIGS[name], tok.vocab_size)
    twin = copy.deepcopy(model)
    examples = _examples()
    flat, packed = SFTDataset(examples, tok, 48), SFTDataset(examples, tok, 48, packing=True)
    a, total_a = _per_example_losses(model, flat, flat.groups)
    b, total_b = _per_example_losses(twin, packed, packed.groups)
    assert sorted(a) == sorted(b) == list(range(len(examples)))
    for i in a:
        torch.testing.assert_close(b[i], a[i], atol=1e-5, rtol=1e-5)
    total_a.backward()
    total_b.backward()
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=n)


def test_no_attention_across_documents():
    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = build_model(CONFIGS["llama"], tok.vocab_size)
    ds = PackedDataset(["first document", "second one", "third text here"], tok, 48, packing=True)
    assert len(ds) == 1 and ds.groups[0] == [2, 0, 1]
    x, pos = ds.input_ids[:1].clone(), ds.positions[:1]
    base = model(x, pos)
    starts = (pos[0] == 0).nonzero().flatten().tolist()  # docs 2, 0, 1 then padding
    x[0, starts[1] + 3] = (x[0, starts[1] + 3] + 1) % 256  # perturb document 0 (the row's second)
    out = model(x, pos)
    assert torch.equal(out[0, :starts[1]], base[0, :starts[1]])  # the document before it: unchanged
    assert torch.equal(out[0, starts[2]:starts[3]], base[0, starts[2]:starts[3]])  # the one after it: unchanged
    assert not torch.allclose(out[0, starts[1] + 3], base[0, starts[1] + 3])


def test_prefix_tuning_reads_its_prefix_in_every_packed_example():
    from meshtune.recipes import apply_recipes, build_recipes
    from meshtune.recipes.prefix_tuning import PrefixConfig
    from tests.unit.test_recipes import recipe_cfg

    tok = ByteTokenizer()
    torch.manual_seed(0)
    base = build_model(CONFIGS["llama"], tok.vocab_size)
    torch.manual_seed(1)
    model = apply_recipes(base, build_recipes(recipe_cfg("prefix", prefix=PrefixConfig(length=3))))
    examples = _examples(8)
    flat, packed = SFTDataset(examples, tok, 48), SFTDataset(examples, tok, 48, packing=True)
    a, _ = _per_example_losses(model, flat, flat.groups)
    b, _ = _per_example_losses(model, packed, packed.groups)
    for i in a:
        torch.testing.assert_close(b[i], a[i], atol=1e-5, rtol=1e-5)
