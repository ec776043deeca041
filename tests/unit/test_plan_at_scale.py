"""Rank layouts at scale on a fake process group (one process pretends to be any rank of a big world)."""

import pytest

from meshtune.runtime.mesh import AXES, ParallelDims, ParallelMesh, fake_process_group
from meshtune.runtime.plan_report import describe_plan
from meshtune.schema import load_config

DIMS = ParallelDims(dp_replicate=4, dp_shard=8, tp=8, pp=4).resolve(1024)


@pytest.mark.parametrize("rank", [0, 1, 7, 8, 63, 64, 255, 256, 511, 777, 1023])
def test_device_mesh_layout_matches_coordinates_at_1024_ranks(rank):
    with fake_process_group(rank, 1024):
        mesh = ParallelMesh(DIMS, "cpu", rank)
        coord = DIMS.coordinate(rank)
        assert tuple(mesh.mesh.get_coordinate()) == tuple(coord[a] for a in AXES)
        for axis in AXES:  # each axis group: the ranks that differ from this one only on that axis
            stride = {"tp": 1, "dp_shard": 8, "dp_replicate": 64, "pp": 256}[axis]
            base = rank - coord[axis] * stride
            expected = [base + i * stride for i in range(getattr(DIMS, axis))]
            assert mesh.get(axis).mesh.flatten().tolist() == expected
            assert mesh.get(axis).get_local_rank() == coord[axis]
        dp = mesh.get("dp")  # data loading: replicate x shard flattened, in that order
        assert dp.size() == 32 and dp.get_local_rank() == mesh.dp_rank
        assert mesh.dp_rank == coord["dp_replicate"] * 8 + coord["dp_shard"]


def test_validate_a_1024_rank_3d_plan_counts_exact_shards():
    cfg = load_config("pretrain/llama-1b", ["parallel.pp=4", "parallel.tp=8", "parallel.dp_replicate=4",
                                            "train.global_batch_size=512", "model.tie_embeddings=false",
                                            "parallel.pp_schedule=Interleaved1F1B"])
    text = describe_plan(cfg, world_size=1024)
    assert "pp=4 x dp_replicate=4 x dp_shard=8 x tp=8 = 1024 ranks (hsdp)" in text
    assert "dp_replicate  degree     4" in text
    # rank 768 = last pipeline rank: stages 3 and 7 of 8 (4 of 16 layers) + the head, split 64 ways
    line = next(x for x in text.splitlines() if x.startswith("per rank"))
    assert "rank 768, 4 layers" in line
    params = int(line.split("): ")[1].split(" parameters")[0].replace(",", ""))
    layer = (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192) // 64 + 2 * 2048 // 8  # norms: dp-sharded only
    head = 2048 * 32000 // 64 + 2048 // 8
    assert params == 4 * layer + head
