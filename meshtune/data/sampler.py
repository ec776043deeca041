"""A resumable distributed sampler whose data order does not depend on the data-parallel layout.

    sampler = StepSampler(len(train_ds), global_batch_size=32, micro_batch_size=4, dp_rank=r, dp_size=4, seed=1)
    for micro in sampler.next_step():          # sampler.accum_steps lists of 4 indices
        batch = collate([train_ds[i] for i in micro])

The sampler works in global terms: each optimizer step takes the next `global_batch_size` indices of one
seeded stream (a fresh permutation per epoch), and rank r takes the r-th contiguous slice of them, cut into
micro-batches. So N ranks x k accumulation steps see exactly the samples that 1 rank sees in one big batch,
and because the state (`epoch`, `consumed`) is global too, a checkpoint resumes on another world size with
the same data order. This is what lets the loss, normalised by the global token count, give the same
gradients whatever the layout.
"""

from __future__ import annotations

import torch

from meshtune.config import ConfigError


def _multiples_near(value: int, unit: int) -> str:
    lower = max(unit, value // unit * unit)
    return f"{lower} or {lower + unit}" if lower != value else str(lower)


class StepSampler:
    """Yields, per optimizer step, this rank's micro-batches of dataset indices.

    Args:
        num_samples: Size of the training set.
        global_batch_size: Samples per optimizer step over all data-parallel ranks.
        micro_batch_size: Samples per forward pass on one rank.
        dp_rank: This rank's coordinate on the data-parallel axes (0 <= dp_rank < dp_size).
        dp_size: Data-parallel degree (replicate x shard).
        seed: Seeds the per-epoch permutation (epoch e uses `seed + e`).
        shuffle: Permute each epoch; False keeps the dataset order.

    Raises:
        ConfigError: The batch sizes do not divide, or the dataset is smaller than one global batch.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
    ):
        assert dp_size >= 1 and 0 <= dp_rank < dp_size, (dp_rank, dp_size)
        if micro_batch_size < 1 or global_batch_size < 1:
            raise ConfigError(
                f"train.global_batch_size={global_batch_size}, train.micro_batch_size={micro_batch_size}: "
                "both must be >= 1"
            )
        per_step = micro_batch_size * dp_size
        if global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={global_batch_size} is not divisible by train.micro_batch_size="
                f"{micro_batch_size} x data-parallel degree {dp_size} (= {per_step}); set "
                f"train.global_batch_size={_multiples_near(global_batch_size, per_step)}, or a "
                "train.micro_batch_size that divides it"
            )
        if num_samples < global_batch_size:
            raise ConfigError(
                f"the training set has {num_samples} samples, fewer than train.global_batch_size="
                f"{global_batch_size}; add data (data.num_train or data.train_path) or lower "
                "train.global_batch_size"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = 0
        self._consumed = 0
        self._order: list[int] | None = None  # the current epoch's permutation, built lazily

    @property
    def accum_steps(self) -> int:
        """Micro-batches per optimizer step on each rank: global / (micro x dp)."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    @property
    def epoch(self) -> int:
        """The epoch of the most recent step (0-based)."""
        return self._epoch

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch; the last incomplete global batch is dropped."""
        return self.num_samples // self.global_batch_size

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            if self.shuffle:
                # A fresh generator per epoch: the order depends only on (seed, epoch), never on history.
                generator = torch.Generator().manual_seed(self.seed + self._epoch)
                self._order = torch.randperm(self.num_samples, generator=generator).tolist()
            else:
                self._order = list(range(self.num_samples))
        return self._order

    def next_step(self) -> list[list[int]]:
        """Advances one optimizer step; rolls into the next epoch when this one is used up.

        Returns:
            `accum_steps` lists of `micro_batch_size` dataset indices for this rank.
        """
        if self._consumed + self.global_batch_size > self.num_samples:
            self._epoch += 1
            self._consumed = 0
            self._order = None
        step = self._epoch_order()[self._consumed : self._consumed + self.global_batch_size]
        self._consumed += self.global_batch_size
        per_rank = self.global_batch_size // self.dp_size
        mine = step[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        m = self.micro_batch_size
        return [mine[i : i + m] for i in range(0, per_rank, m)]

    def state_dict(self) -> dict[str, int]:
        """The position in the global stream, independent of the data-parallel layout."""
        return {"epoch": self._epoch, "consumed": self._consumed, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resumes from `state_dict()`, possibly saved under another data-parallel degree.

        Raises:
            ConfigError: The state was saved with another seed, or does not fit this dataset.
        """
        if int(state["seed"]) != self.seed:
            raise ConfigError(
                f"train.seed: the checkpoint's data order was seeded with {state['seed']}, this run uses "
                f"{self.seed}; set train.seed={state['seed']} to resume, or start a new run_dir"
            )
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if epoch < 0 or not 0 <= consumed <= self.num_samples:
            raise ConfigError(
                f"data: the checkpoint consumed {consumed} samples of epoch {epoch}, but the training set has "
                f"{self.num_samples}; resume with the same data, or start a new run_dir"
            )
        self._epoch, self._consumed, self._order = epoch, consumed, None


def eval_batches(num_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> list[list[int]]:
    """Splits a whole evaluation set over data-parallel ranks, in order, with no sample repeated.

    Each round takes the next `micro_batch_size * dp_size` indices and gives rank r the r-th slice of
    `micro_batch_size`, like a training step. Every rank gets the same number of micro-batches, so that
    collectives inside the forward (FSDP all-gathers, tensor parallelism) stay matched; only the last round
    can be short, and there a rank's batch may be smaller or empty. Run a forward on one all-padding row
    (labels -100) for an empty batch, and all-reduce the sums of loss, tokens and correct answers.

    Args:
        num_samples: Size of the evaluation set.
        micro_batch_size: Samples per forward pass on one rank.
        dp_rank: This rank's data-parallel coordinate.
        dp_size: Data-parallel degree.

    Returns:
        This rank's micro-batches of indices; their union over ranks is `range(num_samples)`.
    """
    assert micro_batch_size >= 1 and 0 <= dp_rank < dp_size, (micro_batch_size, dp_rank, dp_size)
    per_round = micro_batch_size * dp_size
    batches = []
    for start in range(0, num_samples, per_round):
        lo = start + dp_rank * micro_batch_size
        batches.append(list(range(lo, min(lo + micro_batch_size, num_samples))))
    return batches
