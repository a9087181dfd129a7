"""Seeded, re-iterable batch loaders; each ``iter()`` is one epoch.

Every rank of a pipeline builds its own loader, and the ranks must agree on the batches
without talking: the rank with the input and the rank with the labels each read the same
batch. So all randomness (order, augmentation) comes from private generators seeded by
``(seed, epoch)``, never from the global RNG, and equal seeds give equal batches. Augmentation
numbers are drawn in the main process in batch order (:meth:`View.draw`) even when worker
processes apply them, so batches do not depend on ``num_workers``.

In-memory datasets are served by index slicing one big tensor, which is far faster than a
``DataLoader`` collating single examples; lazy (on-disk) datasets go through a ``DataLoader``
with worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from parallel_dkp.data.common import TensorImageDataset
from parallel_dkp.data.transforms import Params, Resize, View

# Separate random streams per epoch, so the order does not change when augmentation is
# switched on.
_ORDER_STREAM = 0
_AUGMENT_STREAM = 1


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, epoch, stream)``, well mixed by ``SeedSequence``."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class EpochBatchSampler:
    """Batches of example indices; a fresh seeded permutation per epoch when shuffling.

    Usable as a ``DataLoader`` ``batch_sampler``: ``iter()`` yields lists of ints for the
    epoch last given to :meth:`set_epoch`.
    """

    def __init__(self, num_examples: int, *, batch_size: int, shuffle: bool, drop_last: bool, seed: int):
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        epoch_generator(seed, 0, _ORDER_STREAM)  # validates the seed now rather than mid-training

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)

    def index_batches(self, epoch: int) -> Iterator[torch.Tensor | slice]:
        """Index tensors ``[B]`` (shuffled) or slices (in order) of the epoch's batches."""
        order = None
        if self.shuffle:
            order = torch.randperm(self.num_examples, generator=epoch_generator(self.seed, epoch, _ORDER_STREAM))
        for i in range(len(self)):
            start, stop = i * self.batch_size, min((i + 1) * self.batch_size, self.num_examples)
            yield slice(start, stop) if order is None else order[start:stop]

    def __iter__(self) -> Iterator[list[int]]:
        for index in self.index_batches(self.epoch):
            yield list(range(index.start, index.stop)) if isinstance(index, slice) else index.tolist()


def _length(index: torch.Tensor | slice | list) -> int:
    return index.stop - index.start if isinstance(index, slice) else len(index)


@dataclass(frozen=True)
class Shard:
    """Which part of every epoch one data-parallel replica reads: ``index`` of ``count``.

    ``split_batches`` (training): every global batch is cut into ``count`` equal consecutive
    parts and replica ``index`` takes its part, so the replicas together train on exactly the
    batches one process would, whatever the layout. Otherwise (evaluation, whose last batch may
    be small) whole batches are dealt out in turn: batch ``i`` goes to replica ``i % count``.
    """

    index: int = 0
    count: int = 1
    split_batches: bool = True

    def num_batches(self, total: int) -> int:
        if self.split_batches or self.count == 1:
            return total
        return len(range(self.index, total, self.count))

    def select(self, i: int, batch):
        """This replica's part of global batch ``i`` (a tensor, list or slice), or ``None``."""
        if self.count == 1:
            return batch
        if not self.split_batches:
            return batch if i % self.count == self.index else None
        size = _length(batch)
        if size % self.count:
            raise ValueError(f"a batch of {size} examples cannot be split evenly over {self.count} replicas")
        part = size // self.count
        if isinstance(batch, slice):
            return slice(batch.start + self.index * part, batch.start + (self.index + 1) * part)
        return batch[self.index * part:(self.index + 1) * part]


class _ViewBatchSampler:
    """Batches of ``(index, params)`` keys for :class:`_ViewedDataset`: the indices of
    :class:`EpochBatchSampler`, each with its example's random numbers for ``view``.

    Iterated by the ``DataLoader`` in the main process, in batch order, so the numbers drawn do
    not depend on the number of workers or on which worker reads which batch.
    """

    def __init__(self, sampler: EpochBatchSampler, view: View):
        self.sampler = sampler
        self.view = view
        self.shard = Shard()

    def __len__(self) -> int:
        return self.shard.num_batches(len(self.sampler))

    def __iter__(self) -> Iterator[list[tuple[int, Params]]]:
        sampler = self.sampler
        generator = epoch_generator(sampler.seed, sampler.epoch, _AUGMENT_STREAM) if self.view.random else None
        for i, index in enumerate(sampler):
            # Numbers are drawn for the whole global batch, then sharded: layout-independent.
            keys = self.shard.select(i, list(zip(index, self.view.draw(len(index), generator), strict=True)))
            if keys is not None:
                yield keys


class _ViewedDataset(Dataset):
    """``ds[(i, params)]`` is ``(view.apply(x_i, params), y_i)``: the view is applied where the
    image is read (in a worker process when there are workers)."""

    def __init__(self, dataset: Dataset, view: View):
        self.dataset = dataset
        self.view = view

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, Params]) -> tuple[torch.Tensor, int]:
        index, params = key
        x, y = self.dataset[index]
        return self.view.apply(x, params), y


class BatchLoader:
    """Yields ``(x [B, *input_shape] float32, y [B] int64)``; each ``iter()`` is the next epoch.

    Args:
        dataset: A :class:`TensorImageDataset` (served by slicing) or any map-style dataset
            returning ``(tensor, int)`` (served by a ``DataLoader``).
        batch_size: Examples per batch.
        shuffle: Reshuffle every epoch with a generator seeded by ``(seed, epoch)``.
        drop_last: Drop the last, smaller batch (fixed shapes for point-to-point buffers).
        seed: Seed of the order and the augmentation; equal seeds give equal batches.
        view: How each stored example becomes a model input (resize, crop, flip; see
            :mod:`parallel_dkp.data.transforms`); random views draw from a generator seeded by
            ``(seed, epoch)``. Default: examples as stored.
        num_workers: ``DataLoader`` worker processes for lazy datasets; in-memory ones ignore it.

    The first ``iter()`` is epoch 0, the next epoch 1, and so on; :meth:`set_epoch` chooses the
    epoch of the next ``iter()`` (e.g. when resuming).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        view: View | None = None,
        num_workers: int = 0,
    ):
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.view = view if view is not None else Resize(None)
        self.seed = seed
        self.sampler = EpochBatchSampler(
            len(dataset), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed
        )
        self._next_epoch = 0
        self._shard = Shard()
        self._dataloader = None
        if not isinstance(dataset, TensorImageDataset):
            self._view_sampler = _ViewBatchSampler(self.sampler, self.view)
            self._dataloader = DataLoader(
                _ViewedDataset(dataset, self.view),
                batch_sampler=self._view_sampler,
                num_workers=num_workers,
                # Without a generator, every epoch draws the workers' base seed from the
                # global RNG, which would make model initialisation depend on data loading.
                generator=torch.Generator().manual_seed(seed),
            )

    def __len__(self) -> int:
        return self._shard.num_batches(len(self.sampler))

    def shard(self, index: int, count: int, *, split_batches: bool) -> None:
        """From now on yield only replica ``index`` of ``count``'s part of every epoch (see
        :class:`Shard`); batches hold ``batch_size / count`` examples when ``split_batches``."""
        if not 0 <= index < count:
            raise ValueError(f"shard {index} of {count} does not exist")
        if split_batches and self.batch_size % count:
            raise ValueError(f"data.batch_size ({self.batch_size}) cannot be split evenly over {count} replicas")
        self._shard = Shard(index, count, split_batches)
        if self._dataloader is not None:
            self._view_sampler.shard = self._shard

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` produce epoch ``epoch``."""
        self._next_epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._next_epoch
        self._next_epoch += 1
        yield from self._tensor_batches(epoch) if self._dataloader is None else self._loader_batches(epoch)

    def _tensor_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dataset: TensorImageDataset = self.dataset
        generator = epoch_generator(self.seed, epoch, _AUGMENT_STREAM) if self.view.random else None
        for i, index in enumerate(self.sampler.index_batches(epoch)):
            # Numbers are drawn for the whole global batch, then sharded: layout-independent.
            params = self.view.draw(_length(index), generator) if generator is not None else None
            mine = self._shard.select(i, index)
            if mine is None:
                continue
            if params is not None:
                params = self._shard.select(i, params)
            x = dataset.x[mine]
            yield self.view.apply_batch(x, params), dataset.y[mine]

    def _loader_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch)
        try:
            yield from self._dataloader
        except ValueError as err:
            # A reader's error in a worker process (a corrupt image file) arrives re-raised as "Caught
            # ValueError in DataLoader worker process N. Original Traceback (most recent call last): ...";
            # keep the reader's own message, which names the file and the fix.
            text, marker = str(err), "\nValueError: "
            if "DataLoader worker" in text and marker in text:
                raise ValueError(text.rsplit(marker, 1)[1].strip()) from None
            raise
