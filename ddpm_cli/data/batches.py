"""Batches of a data set, deterministic and resumable.

:func:`crop_and_flip` makes the square batch; :class:`EpochBatches` fixes the batch order as a pure
function of (seed, step) so a resumed run sees exactly the same batches; :class:`BatchLoader`
fetches them, with worker processes for folders; :class:`DeviceBatches` serves small in-memory
sets from the training device.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
import torch

from ddpm_cli.engine.errors import DdpmError, InputError
from ddpm_cli.data.sources import ArrayImageSet, ImageSet


class EpochBatches:
    """Deterministic, resumable batch order (drop last): ``indices(step)`` depends only on (seed, step)."""

    def __init__(self, n_items: int, batch_size: int, seed: int, items: list[int] | None = None):
        """``items``: the item indices to draw from (default all ``n_items``), e.g. those not held out."""
        self.items = None if items is None else torch.tensor(items, dtype=torch.long)
        n_items = n_items if items is None else len(items)
        if batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {batch_size}")
        if batch_size > n_items:
            raise InputError(f"data set has {n_items} images, fewer than --batch-size {batch_size}; "
                             "lower --batch-size or add images")
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.steps_per_epoch = n_items // batch_size
        self._cache: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The item order of one epoch (the latest epoch asked for is cached)."""
        if self._cache is None or self._cache[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.n_items, generator=gen))
        return self._cache[1]

    def indices(self, step: int) -> list[int]:
        """Item indices of global micro-batch ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, k = divmod(step, self.steps_per_epoch)
        chosen = self.permutation(epoch)[k * self.batch_size:(k + 1) * self.batch_size]
        return (chosen if self.items is None else self.items[chosen]).tolist()


def crop_and_flip(images: list[torch.Tensor], resolution: int | tuple[int, int], center_crop: bool, random_flip: bool,
                  generator: torch.Generator, rows: slice = slice(None), total: int | None = None) -> torch.Tensor:
    """Crop each uint8 C×H×W image to R×R (or to (height, width) for a non-square ``resolution``) and
    optionally flip it; returns B×C×R×R uint8.

    The random choices are one ``torch.rand((total, 3))`` draw from ``generator`` (per image: top
    and left as fractions of the free room, and a flip when below 0.5), made only when something is
    random. Under torchrun ``images`` are this process's ``rows`` of a global batch of ``total``:
    every process draws the whole batch's choices and keeps its rows, so N processes crop and flip
    the images exactly as one process does. Same generator state → same batch.
    """
    rh, rw = (resolution, resolution) if isinstance(resolution, int) else resolution
    total = len(images) if total is None else total
    draws = (torch.rand((total, 3), generator=generator, dtype=torch.float64)[rows].tolist()
             if random_flip or not center_crop else None)
    out = []
    for k, img in enumerate(images):
        h, w = img.shape[-2:]
        if h < rh or w < rw:
            raise ValueError(f"image {h}×{w} is smaller than the crop {rh}×{rw}")
        if center_crop:
            top, left = (h - rh) // 2, (w - rw) // 2
        else:
            top, left = min(int(draws[k][0] * (h - rh + 1)), h - rh), min(int(draws[k][1] * (w - rw + 1)), w - rw)
        img = img[..., top:top + rh, left:left + rw]
        if random_flip and draws[k][2] < 0.5:
            img = img.flip(-1)
        out.append(img)
    return torch.stack(out).contiguous()


def default_num_workers() -> int:
    """Loader worker processes by default: ``min(4, cpu_count - 1)``, at least 0."""
    return min(4, max(0, (os.cpu_count() or 1) - 1))


class _StepSampler:
    """Batch sampler yielding ``indices(s)`` for s = start, start + 1, ... (endless)."""

    def __init__(self, indices: Callable[[int], list[int]], start: int):
        self.indices, self.start = indices, start

    def __iter__(self) -> Iterator[list[int]]:
        for step in itertools.count(self.start):
            yield self.indices(step)


class _Loads(torch.utils.data.Dataset):
    """A data set whose items are images or the one-line error that loading one raised.

    Errors travel back from worker processes as values, so the main process re-raises the
    original one-line message instead of DataLoader's wrapped traceback.
    """

    def __init__(self, dataset: ImageSet):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor | DdpmError:
        try:
            return self.dataset.load(i)
        except DdpmError as exc:
            return exc


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT and SIGTERM to the training process, which stops the run after the
    step in progress (training/stop.py); a worker killed by a Ctrl-C meant for it would fail that step."""
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def _raise_errors(items: list) -> list[torch.Tensor]:
    for item in items:
        if isinstance(item, DdpmError):
            raise item
    return items


class BatchLoader:
    """Fetches micro-batches in :class:`EpochBatches` order: in-memory sets directly, others
    (folders) through a prefetching ``torch.utils.data.DataLoader`` with ``num_workers`` workers."""

    def __init__(self, dataset: ImageSet, batches: EpochBatches, num_workers: int | None = None,
                 rows: slice = slice(None), pin_memory: bool = False):
        self.dataset, self.batches, self.rows, self.pin_memory = dataset, batches, rows, pin_memory
        self.num_workers = default_num_workers() if num_workers is None else max(0, int(num_workers))

    def indices(self, step: int) -> list[int]:
        """This process's items of micro-batch ``step`` (its ``rows`` of the global batch)."""
        return self.batches.indices(step)[self.rows]

    def labels(self, indices: list[int]) -> torch.Tensor | None:
        """Labels of the items as an int64 tensor, or None when the data set has none."""
        lab = self.dataset.labels
        return None if lab is None else torch.tensor([lab[i] for i in indices], dtype=torch.long)

    def captions(self, indices: list[int]) -> list[str] | None:
        """Captions of the items, or None when the data set has none."""
        texts = self.dataset.captions
        return None if texts is None else [texts[i] for i in indices]

    def batch(self, step: int) -> list[torch.Tensor]:
        """The images of micro-batch ``step``, loaded in this process."""
        idx = self.indices(step)
        if isinstance(self.dataset, ArrayImageSet):
            return list(self.dataset.images[idx].unbind(0))
        return [self.dataset.load(i) for i in idx]

    def iterate(self, start_step: int = 0) -> Iterator[tuple[int, list[torch.Tensor], torch.Tensor | None]]:
        """Endless ``(step, images, labels)`` from ``start_step`` on; images are uint8 C×H×W."""
        if isinstance(self.dataset, ArrayImageSet):
            for step in itertools.count(start_step):
                yield step, self.batch(step), self.labels(self.indices(step))
            return
        loader = torch.utils.data.DataLoader(
            _Loads(self.dataset), batch_sampler=_StepSampler(self.indices, start_step),
            num_workers=self.num_workers, collate_fn=list, prefetch_factor=2 if self.num_workers > 0 else None,
            pin_memory=self.pin_memory, worker_init_fn=_ignore_stop_signals if self.num_workers > 0 else None)
        for step, images in zip(itertools.count(start_step), loader):
            yield step, _raise_errors(images), self.labels(self.indices(step))


RESIDENT_BYTES = 4 << 30  # in-memory data sets up to this size are held on the training device


def fits_on_device(dataset: ImageSet, resolution: int | tuple[int, int]) -> bool:
    """An in-memory set already at R×R (or H×W) and small enough to be held on the device (see DeviceBatches)."""
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    return (isinstance(dataset, ArrayImageSet) and tuple(dataset.images.shape[-2:]) == size
            and dataset.images.numel() <= RESIDENT_BYTES)


class DeviceBatches:
    """An in-memory data set held on the training device as uint8, with its labels.

    A micro-batch is one gather on the device and its random flips one ``where``, with no per-image
    work on the host. The flips of the whole global batch are drawn from ``generator`` (one
    ``torch.rand`` of its size) and each process keeps its ``rows``, so N processes see the same
    images as one.
    """

    def __init__(self, dataset: ArrayImageSet, batches: EpochBatches, device: torch.device, random_flip: bool,
                 generator: torch.Generator, rows: slice = slice(None)):
        self.batches, self.random_flip, self.generator, self.rows = batches, random_flip, generator, rows
        self.device = device
        self.images = dataset.images.to(device)
        self.labels = None if dataset.labels is None else torch.tensor(dataset.labels, device=device)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        """(uint8 images B×C×R×R on the device, their labels or None, their item indices)."""
        indices = self.batches.indices(step)
        flips = torch.rand(len(indices), generator=self.generator)[self.rows] < 0.5 if self.random_flip else None
        indices = indices[self.rows]
        index = torch.tensor(indices)
        index = (index.pin_memory() if self.device.type == "cuda" else index).to(self.device, non_blocking=True)
        images = self.images.index_select(0, index)
        if flips is not None:
            images = torch.where(flips.to(self.device, non_blocking=True)[:, None, None, None], images.flip(-1), images)
        return images, None if self.labels is None else self.labels.index_select(0, index), indices
