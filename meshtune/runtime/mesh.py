"""ParallelDims (validated degrees) and ParallelMesh (named DeviceMesh axes).

Ranks map to coordinates in the order `pp, dp_replicate, dp_shard, tp` (tp fastest-varying, so a tensor-
parallel group sits on neighbouring ranks, i.e. inside one node; pp slowest, so pipeline hops cross nodes).
Rank r has coordinate (r // (R*S*T), r // (S*T) % R, r // T % S, r % T) for degrees (P, R, S, T).

`ParallelMesh.get(axis)` returns the 1-D DeviceMesh of an axis or None when its degree is 1, so callers write
`if (tp := mesh.get("tp")) is not None:` and a degree-1 axis costs nothing. Derived axes:
  dp    dp_replicate x dp_shard flattened: the data-loading and loss-reduction axis
  fsdp  the mesh FSDP2 shards over: ("dp_replicate", "dp_shard") for HSDP, else ("dp_shard",)
This is the one module that touches private torch API: DeviceMesh's `_flatten` and the fake backend.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

AXES = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1

    def resolve(self, world_size: int) -> ParallelDims:
        """Fill in the one -1 degree and check that the degrees multiply to the world size.

        Raises:
            ValueError: naming the parallel.* keys and the world size, with a fix.
        """
        degrees = {a: getattr(self, a) for a in AXES}
        free = [a for a, d in degrees.items() if d == -1]
        bad = [a for a, d in degrees.items() if d != -1 and d < 1]
        if bad:
            raise ValueError(f"parallel.{bad[0]}: must be >= 1 or -1, got {degrees[bad[0]]}")
        if len(free) > 1:
            raise ValueError(f"parallel.{free[0]} and parallel.{free[1]} are both -1; at most one degree may be "
                             "-1 (the rest of the world)")
        fixed = math.prod(d for d in degrees.values() if d != -1)
        layout = " x ".join(f"{a}={d}" for a, d in degrees.items())
        if free:
            if world_size % fixed:
                raise ValueError(f"parallel: {layout} cannot fill world size {world_size}: {fixed} does not divide "
                                 f"it; change the degrees or the number of processes")
            degrees[free[0]] = world_size // fixed
        elif fixed != world_size:
            raise ValueError(f"parallel: {layout} = {fixed} ranks, but the world size is {world_size}; make the "
                             f"degrees multiply to {world_size} (set one of them to -1)")
        return replace(self, **degrees)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def dp_mode(self) -> str:
        """'hsdp', 'fsdp', 'ddp' or 'none' for the data-parallel axes."""
        if self.dp_shard > 1:
            return "hsdp" if self.dp_replicate > 1 else "fsdp"
        return "ddp" if self.dp_replicate > 1 else "none"

    def coordinate(self, rank: int) -> dict[str, int]:
        """This rank's position on each axis (the layout DeviceMesh builds for a row-major arange)."""
        coord = {}
        for axis in reversed(AXES):
            degree = getattr(self, axis)
            coord[axis] = rank % degree
            rank //= degree
        return {a: coord[a] for a in AXES}


class ParallelMesh:
    """Named axes of one DeviceMesh over all ranks; None for axes of degree 1."""

    def __init__(self, dims: ParallelDims, device_type: str = "cpu", rank: int = 0):
        from torch.distributed.device_mesh import init_device_mesh

        assert all(getattr(dims, a) >= 1 for a in AXES), "resolve() the dims first"
        self.dims = dims
        self.rank = rank
        self.coordinate = dims.coordinate(rank)
        self.mesh = None
        self._axes = {}
        if dims.world_size == 1:
            return
        self.mesh = init_device_mesh(device_type, tuple(getattr(dims, a) for a in AXES), mesh_dim_names=AXES)
        for axis in AXES:
            if getattr(dims, axis) > 1:
                self._axes[axis] = self.mesh[axis]
        if dims.dp_replicate > 1 and dims.dp_shard > 1:
            self._axes["dp"] = self.mesh["dp_replicate", "dp_shard"]._flatten("dp")
            self._axes["fsdp"] = self.mesh["dp_replicate", "dp_shard"]
        elif dims.dp > 1:
            axis = "dp_shard" if dims.dp_shard > 1 else "dp_replicate"
            self._axes["dp"] = self._axes[axis]
            if dims.dp_shard > 1:
                self._axes["fsdp"] = self._axes["dp_shard"]

    @property
    def uses_fsdp(self) -> bool:
        """Whether parameters go through FSDP2: sharded data parallelism, or DDP x TP (see replicate_mesh)."""
        return "fsdp" in self._axes or (self.dims.dp_mode == "ddp" and self.dims.tp > 1)

    def replicate_mesh(self):
        """The 2-D ("dp_replicate", "dp_shard") mesh even when dp_shard is 1: FSDP2 over it replicates
        parameters and all-reduces gradients like DDP, and unlike DDP it accepts tensor-parallel DTensors."""
        return self.mesh["dp_replicate", "dp_shard"] if self.mesh is not None else None

    def get(self, axis: str):
        """The DeviceMesh of `axis` (an axis name, 'dp' or 'fsdp'), or None when its degree is 1."""
        if axis not in AXES + ("dp", "fsdp"):
            raise KeyError(f"unknown mesh axis {axis!r}; axes are {AXES + ('dp', 'fsdp')}")
        return self._axes.get(axis)

    @property
    def dp_rank(self) -> int:
        return self.coordinate["dp_replicate"] * self.dims.dp_shard + self.coordinate["dp_shard"]

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    def describe(self) -> str:
        return " x ".join(f"{a}={getattr(self.dims, a)}" for a in AXES) + f" ({self.dims.dp_mode})"


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int):
    """Pretend to be `rank` of `world_size` in this one process: collectives do nothing, but DeviceMesh,
    DTensor sharding and FSDP2 build exactly the layout that rank would have. For plans at any scale."""
    import torch.distributed as dist
    from torch._C._distributed_c10d import FakeProcessGroup  # torch's own fake backend, not yet public

    if dist.is_initialized():
        raise RuntimeError("a process group already exists; plan in a fresh process")
    if "fake" not in dist.Backend.backend_list:
        def create(common_opts, backend_opts):
            return FakeProcessGroup._create_internal(common_opts.group_rank, common_opts.group_size, backend_opts)

        dist.Backend.register_backend("fake", create, extended_api=True, devices=["cpu", "cuda"])
    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
