"""Seeded, re-iterable batch loaders; each ``iter()`` is one epoch.

Every rank of a pipeline builds its own loader, and the ranks must agree on the batches
without talking: the rank with the input and the rank with the labels each read the same
batch. So all randomness (order, augmentation) comes from private generators seeded by
``(seed, epoch)``, never from the global RNG, and equal seeds give equal batches.

In-memory datasets are served by index slicing one big tensor, which is far faster than a
``DataLoader`` collating single examples; lazy (on-disk) datasets go through a ``DataLoader``
with worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from parallel_dkp.data.common import TensorImageDataset

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


def random_crop_flip(x_BCHW: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero-padding by 1/8 of each side, then a horizontal flip with p = 1/2.

    Zero is the mean colour of normalised images, so the padding adds no artificial dark
    border. Returns a new ``[B, C, H, W]`` tensor; ``x_BCHW`` is not modified.
    """
    num, _, height, width = x_BCHW.shape
    pad_h, pad_w = height // 8, width // 8
    # Offset of each crop relative to the unpadded image, in [-pad, pad].
    shift_y = torch.randint(-pad_h, pad_h + 1, (num,), generator=generator).tolist()
    shift_x = torch.randint(-pad_w, pad_w + 1, (num,), generator=generator).tolist()
    flip = (torch.rand(num, generator=generator) < 0.5).tolist()
    out = torch.zeros_like(x_BCHW)
    # One slice copy per example, without materialising the padded batch: at 224x224 this is
    # several times faster than one fancy-indexing gather over the whole batch.
    for b in range(num):
        dy, dx = shift_y[b], shift_x[b]
        src_r0, src_r1 = max(0, dy), min(height, height + dy)
        src_c0, src_c1 = max(0, dx), min(width, width + dx)
        dst_c0, dst_c1 = src_c0 - dx, src_c1 - dx
        window = x_BCHW[b, :, src_r0:src_r1, src_c0:src_c1]
        if flip[b]:
            window, dst_c0, dst_c1 = window.flip(-1), width - dst_c1, width - dst_c0
        out[b, :, src_r0 - dy : src_r1 - dy, dst_c0:dst_c1] = window
    return out


class BatchLoader:
    """Yields ``(x [B, *input_shape] float32, y [B] int64)``; each ``iter()`` is the next epoch.

    Args:
        dataset: A :class:`TensorImageDataset` (served by slicing) or any map-style dataset
            returning ``(tensor, int)`` (served by a ``DataLoader``).
        batch_size: Examples per batch.
        shuffle: Reshuffle every epoch with a generator seeded by ``(seed, epoch)``.
        drop_last: Drop the last, smaller batch (fixed shapes for point-to-point buffers).
        seed: Seed of the order and the augmentation; equal seeds give equal batches.
        augment: Random crop + horizontal flip (:func:`random_crop_flip`) of ``[B, C, H, W]``.
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
        augment: bool = False,
        num_workers: int = 0,
    ):
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.augment = augment
        self.seed = seed
        self.sampler = EpochBatchSampler(
            len(dataset), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed
        )
        self._next_epoch = 0
        self._dataloader = None
        if not isinstance(dataset, TensorImageDataset):
            self._dataloader = DataLoader(
                dataset,
                batch_sampler=self.sampler,
                num_workers=num_workers,
                # Without a generator, every epoch draws the workers' base seed from the
                # global RNG, which would make model initialisation depend on data loading.
                generator=torch.Generator().manual_seed(seed),
            )

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` produce epoch ``epoch``."""
        self._next_epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._next_epoch
        self._next_epoch += 1
        batches = self._tensor_batches(epoch) if self._dataloader is None else self._loader_batches(epoch)
        generator = epoch_generator(self.seed, epoch, _AUGMENT_STREAM) if self.augment else None
        for x, y in batches:
            if generator is not None:
                x = random_crop_flip(x, generator=generator)
            yield x, y

    def _tensor_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dataset: TensorImageDataset = self.dataset
        for index in self.sampler.index_batches(epoch):
            yield dataset.resize_batch(dataset.x[index]), dataset.y[index]

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
