"""Seeded, sharded batch loaders with one contract for every dataset.

The contract (both loaders below keep it):

* epoch ``e`` visits the examples in the order ``perm = randperm(N)`` drawn from a generator
  seeded with ``derive_seed(seed, e)`` (identity order when ``train=False``); every rank
  computes the same ``perm``;
* with global batch ``G = batch_size · world_size``, step ``s`` covers the permutation
  positions ``[s·G, (s+1)·G)`` and rank ``r`` takes the positions ``≡ r (mod world_size)``
  among them (strided, like ``DistributedSampler``). So ``world_size`` ranks with batch
  ``b`` see, step by step, exactly the examples one process sees with batch ``b·world_size``;
* augmentation randomness is drawn per *position* from the same generator, after
  ``perm``, so an example is augmented identically whatever the world size or worker count;
* ``drop_last`` (default: ``train``) drops the final partial global batch, so all ranks run
  the same number of steps. Without it (evaluation) every example is visited exactly once
  across ranks and the last step may be partial — ranks can then differ by one batch, so sum
  metrics after the loop rather than all-reducing inside it.

Same ``seed`` and epoch ⇒ identical batches. ``set_epoch`` must be called to get a new
order, as with ``DistributedSampler``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from fullsparse.data.imagefolder import ImageFolderDataset
from fullsparse.data.seeding import generator
from fullsparse.data.tensor import TensorImageDataset
from fullsparse.errors import UserError

__all__ = [
    "Loader",
    "InMemoryLoader",
    "ShardedBatchSampler",
    "WorkerLoader",
    "make_loader",
    "shard_batches",
]

_SEED_BOUND = 1 << 62  # per-example augmentation seeds are drawn in [0, 2^62)


class Loader(Protocol):
    """What :func:`make_loader` returns."""

    batch_size: int

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        """Iterate epoch ``epoch``'s batches from step ``first_step`` on (a mid-epoch
        resume): the same batches, with the same augmentation, as an uninterrupted epoch."""


def shard_batches(
    n: int, batch_size: int, rank: int, world_size: int, drop_last: bool
) -> list[Tensor]:
    """Permutation positions of each of rank ``rank``'s batches for one epoch.

    Returns a list of int64 tensors (one per step, each ``batch_size`` long except maybe the
    last when ``drop_last`` is False) holding positions into the epoch's permutation.
    """
    global_batch = batch_size * world_size
    end = (n // global_batch) * global_batch if drop_last else n
    positions = torch.arange(rank, end, world_size)
    return list(positions.split(batch_size)) if positions.numel() else []


def _check(n: int, batch_size: int, rank: int, world_size: int, drop_last: bool) -> None:
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(
            f"rank must be in [0, world_size): got rank={rank}, world_size={world_size}"
        )
    if drop_last and n < batch_size * world_size:
        raise UserError(
            f"the dataset has {n} examples, fewer than one global batch of "
            f"{batch_size} x {world_size} ranks = {batch_size * world_size}; with drop_last "
            f"there would be no step at all: lower the batch size"
        )


class _EpochPlan:
    """What every loader shares: the epoch's permutation, this rank's batches of positions,
    ``set_epoch`` and ``len``. ``drop_last=None`` means ``train``."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
    ) -> None:
        drop_last = train if drop_last is None else drop_last
        _check(n, batch_size, rank, world_size, drop_last)
        self.n, self.batch_size, self.train, self.seed = n, batch_size, train, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0
        self.first_step = 0
        self._batches = shard_batches(n, batch_size, rank, world_size, drop_last)

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        self.epoch, self.first_step = epoch, first_step

    def __len__(self) -> int:
        return len(self._batches)

    def start(self) -> tuple[torch.Generator, Tensor, list[Tensor]]:
        """Generator (already advanced past the permutation), permutation, the batches from
        ``first_step`` on."""
        g = generator(self.seed, self.epoch)
        perm = torch.randperm(self.n, generator=g) if self.train else torch.arange(self.n)
        return g, perm, self._batches[self.first_step :]


class InMemoryLoader(_EpochPlan):
    """Batches of a :class:`TensorImageDataset` by tensor indexing, augmentation vectorised.

    No worker processes: indexing a uint8 tensor and one gather per batch is faster than
    pickling examples to workers.
    """

    def __init__(
        self, dataset: TensorImageDataset, batch_size: int, *, train: bool, **shard: Any
    ) -> None:
        """``shard``: ``seed``, ``rank``, ``world_size``, ``drop_last`` of :func:`make_loader`."""
        super().__init__(len(dataset), batch_size, train=train, **shard)
        self.dataset = dataset

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        g, perm, batches = self.start()
        aug = self.dataset.augmentation if self.train else None
        offsets = flips = None
        if aug is not None and not aug.is_identity:
            offsets, flips = aug.draw(len(perm), g)  # per permutation position
        for pos in batches:
            if offsets is None or flips is None:
                yield self.dataset.batch(perm[pos])
            else:
                yield self.dataset.batch(perm[pos], offsets[pos], flips[pos])


class ShardedBatchSampler(_EpochPlan, Sampler[list]):
    """``batch_sampler`` for a ``DataLoader`` keeping the module's sharding contract.

    Yields lists of dataset indices, or of ``(index, seed)`` pairs when ``with_seeds`` (for
    datasets such as :class:`ImageFolderDataset` that take a per-example augmentation seed).
    """

    def __init__(
        self, n: int, batch_size: int, *, train: bool, with_seeds: bool = False, **shard: Any
    ) -> None:
        """``shard``: ``seed``, ``rank``, ``world_size``, ``drop_last`` of :func:`make_loader`."""
        super().__init__(n, batch_size, train=train, **shard)
        self.with_seeds = with_seeds

    def __iter__(self) -> Iterator[list]:
        g, perm, batches = self.start()
        seeds = (
            torch.randint(0, _SEED_BOUND, (len(perm),), generator=g) if self.with_seeds else None
        )
        for pos in batches:
            idx = perm[pos].tolist()
            yield list(zip(idx, seeds[pos].tolist(), strict=True)) if seeds is not None else idx


class WorkerLoader:
    """A ``DataLoader`` with worker processes over any map-style dataset (imagefolder)."""

    def __init__(
        self, dataset: Dataset, batch_size: int, *, train: bool, workers: int = 0, **shard: Any
    ) -> None:
        """``shard``: ``seed``, ``rank``, ``world_size``, ``drop_last`` of :func:`make_loader`."""
        if workers < 0:
            raise UserError(f"workers must be >= 0, got {workers}")
        self.dataset = dataset
        self.batch_size = batch_size
        with_seeds = train and isinstance(dataset, ImageFolderDataset)
        self.sampler = ShardedBatchSampler(
            len(dataset),  # type: ignore[arg-type]
            batch_size,
            train=train,
            with_seeds=with_seeds,
            **shard,
        )
        self._loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        self.sampler.set_epoch(epoch, first_step)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self._loader:
            yield x.to(torch.float32), torch.as_tensor(y, dtype=torch.int64)


def make_loader(
    dataset: Dataset, batch_size: int, *, train: bool, workers: int = 0, **shard: Any
) -> Loader:
    """A loader yielding ``(x [B, C, H, W] float32, y [B] int64)``; see the module contract.

    Args:
        dataset: a :class:`TensorImageDataset` (Fashion-MNIST, CIFAR, synthetic: batched by
            indexing, ``workers`` ignored) or any map-style dataset (imagefolder: a
            ``DataLoader`` with ``workers`` processes).
        batch_size: per-rank batch size b.
        train: shuffle and augment; also the default of ``drop_last``.
        workers: DataLoader worker processes for non-tensor datasets.
        shard: keywords of the epoch plan, each optional —
            ``seed`` (0): base seed; the order of epoch e is a function of (seed, e) only;
            ``rank``, ``world_size`` (0, 1): this process's shard (rank r of world_size);
            ``drop_last`` (None = ``train``): drop the final partial global batch.

    Raises:
        UserError: bad rank/world_size/batch size, or ``drop_last`` with fewer examples
            than one global batch.
    """
    if isinstance(dataset, TensorImageDataset):
        return InMemoryLoader(dataset, batch_size, train=train, **shard)
    return WorkerLoader(dataset, batch_size, train=train, workers=workers, **shard)
