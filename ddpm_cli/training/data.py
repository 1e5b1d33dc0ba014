"""Training data: the built-in Fashion-MNIST and emoji sets, folders of images, and deterministic batching.

Every data set implements :class:`ImageSet`; ``load(i)`` gives a uint8 tensor C×H×W whose
shorter side equals the training resolution. :func:`crop_and_flip` makes the square batch;
:class:`EpochBatches` fixes the batch order as a pure function of (seed, step) so a resumed run
sees exactly the same batches; :class:`BatchLoader` fetches them, with workers for folders.
Captions (``ImageSet.captions``) come from :mod:`ddpm_cli.training.captions`.
"""

from __future__ import annotations

import gzip
import itertools
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from ddpm_cli.engine.errors import DdpmError, InputError
from ddpm_cli.training.captions import EMOJI_FONT, folder_captions, load_emoji

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
BUILTIN_DATASETS = ("fashion-mnist", "fashion-mnist-subset", "emoji")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SUBSET_DIR = Path(__file__).resolve().parent.parent / "data" / "fashion-mnist-subset"
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or plain) into a numpy array, checking its header."""
    path = Path(path)
    fix = "reinstall or regenerate the data files"
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except FileNotFoundError:
        raise InputError(f"IDX file not found: {path}; check the path") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"cannot read IDX file {path} ({exc}); {fix}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES or data[3] == 0:
        raise InputError(f"not an IDX file (bad magic number): {path}; {fix}")
    ndim, dtype = data[3], np.dtype(_IDX_TYPES[data[2]])
    head = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:head]) if len(data) >= head else (0,)
    expected = head + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise InputError(f"corrupt IDX file {path}: {len(data)} bytes, header says {expected}; {fix}")
    return np.frombuffer(data, dtype=dtype, offset=head).reshape(dims).astype(dtype.newbyteorder("="))


class ImageSet:
    """Common interface of training data sets.

    Attributes: ``name``, ``source`` (path the data came from), ``channels`` (1 or 3),
    ``labels`` (class index per item, or None), ``class_names`` (or None) and ``captions``
    (one text per item, or None).
    """

    name: str = ""
    source: str = ""
    channels: int = 3
    labels: list[int] | None = None
    class_names: list[str] | None = None
    captions: list[str] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> torch.Tensor:
        """Item ``i`` as uint8 C×H×W, shorter side at the training resolution (not cropped)."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> torch.Tensor:  # map-style, for torch.utils.data.DataLoader
        return self.load(i)


class ArrayImageSet(ImageSet):
    """Images held in memory as one uint8 tensor N×C×H×W, already at the training resolution."""

    def __init__(self, images: torch.Tensor, labels: list[int] | None = None,
                 class_names: list[str] | None = None, name: str = "array", source: str = "",
                 captions: list[str] | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4 or (labels is not None and len(labels) != len(images)) \
                or (captions is not None and len(captions) != len(images)):
            raise ValueError("ArrayImageSet needs a uint8 tensor N×C×H×W and one label and caption per image")
        self.images, self.labels, self.class_names, self.captions = images, labels, class_names, captions
        self.channels, self.name, self.source = images.shape[1], name, source

    def __len__(self) -> int:
        return self.images.shape[0]

    def load(self, i: int) -> torch.Tensor:
        return self.images[i]


class FileImageSet(ImageSet):
    """Image files given one by one; with a ``resolution``, each is resized so its shorter side is
    that many pixels (None keeps the files' own sizes). Headers are checked up front."""

    def __init__(self, paths: list[Path], resolution: int | None, channels: int = 3, name: str = "files",
                 source: str = ""):
        from ddpm_cli.engine.imageio import probe_image

        if channels not in (1, 3):
            raise InputError(f"--channels must be 1 or 3, got {channels}")
        self.paths = [Path(p) for p in paths]
        for path in self.paths:  # headers only: bad files fail now, not hours into training
            probe_image(path)
        self.resolution = None if resolution is None else int(resolution)
        self.channels, self.name, self.source = channels, name, source

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> torch.Tensor:
        from PIL import Image

        from ddpm_cli.engine.imageio import load_image

        image = load_image(self.paths[i], mode="L" if self.channels == 1 else "RGB")
        w, h, r = image.width, image.height, self.resolution
        if r is not None:
            size = (r, max(r, round(h * r / w))) if w <= h else (max(r, round(w * r / h)), r)
            if size != (w, h):
                image = image.resize(size, Image.BICUBIC)  # Pillow's resize antialiases when shrinking
        array = np.array(image, dtype=np.uint8, copy=True)
        tensor = torch.from_numpy(array)
        return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()


class FolderImageSet(FileImageSet):
    """A folder of images, searched recursively; labels from first-level sub-folder names.

    Labels follow the ImageFolder convention when every image sits in a sub-folder (class
    names sorted); otherwise ``labels`` and ``class_names`` are None. Captions come from a
    ``metadata.jsonl`` in the folder or ``<stem>.txt`` beside each image (see
    :func:`ddpm_cli.training.captions.folder_captions`); None when no image has one.
    """

    def __init__(self, folder: str | os.PathLike, resolution: int | None, channels: int = 3, name: str | None = None):
        from ddpm_cli.engine.imageio import list_images

        root = Path(folder).expanduser()
        if not root.exists():
            raise InputError(f"data folder not found: {root}; pass an existing folder of images or a built-in name")
        if not root.is_dir():
            raise InputError(f"data path is not a folder: {root}; pass a folder of images")
        paths = [Path(p) for p in list_images(root)]
        if not paths:
            raise InputError(f"no images (.png .jpg .jpeg .webp .bmp) found under {root}; "
                             "add images or pick another folder")
        super().__init__(paths, resolution, channels, name or root.resolve().name or str(root), str(root))
        parts = [p.relative_to(root).parts for p in self.paths]
        if all(len(x) >= 2 for x in parts):
            self.class_names = sorted({x[0] for x in parts})
            index = {c: k for k, c in enumerate(self.class_names)}
            self.labels = [index[x[0]] for x in parts]  # else the class defaults: None
        self.captions = folder_captions(root, self.paths)


def _fit_array(images: torch.Tensor, resolution: int, chunk: int = 4096) -> torch.Tensor:
    """Bring square uint8 N×C×S×S images to R×R: as-is, zero-padded evenly, or bicubic-resized."""
    size = images.shape[-1]
    if resolution == size:
        return images
    if resolution > size and (resolution - size) % 2 == 0:
        k = (resolution - size) // 2
        return torch.nn.functional.pad(images, (k, k, k, k), value=0)
    out = torch.empty((*images.shape[:2], resolution, resolution), dtype=torch.uint8)
    for start in range(0, len(images), chunk):  # chunked to bound the float32 working memory
        y = torch.nn.functional.interpolate(images[start:start + chunk].float(), size=(resolution, resolution),
                                            mode="bicubic", align_corners=False, antialias=True)
        out[start:start + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _open_fashion_mnist(folder: Path, name: str, resolution: int, channels: int, split: str) -> ArrayImageSet:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or images.dtype != np.uint8 \
            or images.shape[1] != images.shape[2] or (len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise InputError(f"Fashion-MNIST files under {folder} do not match (shape or labels); reinstall them")
    tensor = _fit_array(torch.from_numpy(images).unsqueeze(1), resolution)
    if channels == 3:  # greyscale replicated as RGB, without copying
        tensor = tensor.expand(-1, 3, -1, -1)
    return ArrayImageSet(tensor, labels.astype(np.int64).tolist(), list(FASHION_MNIST_CLASSES), name, str(folder))


def open_dataset(spec: str, resolution: int, channels: int | None = None, split: str = "train") -> ImageSet:
    """Open a built-in data set by name (see ``BUILTIN_DATASETS``) or a folder of images.

    ``fashion-mnist`` uses the full Debian files when installed, else the shipped subset (see
    ``.source`` and ``.name``); it is 1 channel (``channels=3`` replicates it), zero-padded evenly
    when the resolution is 28 + 2k, else bicubic-resized. ``emoji`` is ~1,280 captioned RGB
    emoji on white (resolution 16 or more; ``channels=1`` makes them greyscale); it has no
    held-out images, so its "test" split is the same as "train". A folder defaults to 3
    channels (RGB); 1 means greyscale. ``split`` ("train" or "test") applies to the built-ins.
    """
    if not isinstance(resolution, int) or resolution < 1:
        raise InputError(f"--resolution must be a positive integer, got {resolution}")
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    if channels is not None and channels not in (1, 3):
        raise InputError(f"--channels must be 1 or 3, got {channels}")
    name = spec.strip()
    if name == "emoji":
        images, captions = load_emoji(resolution, channels or 3)
        return ArrayImageSet(images, name="emoji", source=str(EMOJI_FONT), captions=captions)
    if name in BUILTIN_DATASETS:
        prefix = "train" if split == "train" else "t10k"
        full = [FASHION_MNIST_DIR / f"{prefix}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
        if name == "fashion-mnist" and all(p.is_file() for p in full):
            return _open_fashion_mnist(FASHION_MNIST_DIR, "fashion-mnist", resolution, channels or 1, split)
        return _open_fashion_mnist(SUBSET_DIR, "fashion-mnist-subset", resolution, channels or 1, split)
    if not Path(spec).expanduser().exists():
        raise InputError(f"data set {spec!r} is neither a built-in ({', '.join(BUILTIN_DATASETS)}) "
                         "nor an existing folder; pass one of those names or a folder of images")
    return FolderImageSet(spec, resolution, channels or 3)


class EpochBatches:
    """Deterministic, resumable batch order (drop last): ``indices(step)`` depends only on (seed, step)."""

    def __init__(self, n_items: int, batch_size: int, seed: int):
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
        return self.permutation(epoch)[k * self.batch_size:(k + 1) * self.batch_size].tolist()


def crop_and_flip(images: list[torch.Tensor], resolution: int, center_crop: bool, random_flip: bool,
                  generator: torch.Generator, rows: slice = slice(None), total: int | None = None) -> torch.Tensor:
    """Square-crop each uint8 C×H×W image to R×R and optionally flip it; returns B×C×R×R uint8.

    The random choices are one ``torch.rand((total, 3))`` draw from ``generator`` (per image: top
    and left as fractions of the free room, and a flip when below 0.5), made only when something is
    random. Under torchrun ``images`` are this process's ``rows`` of a global batch of ``total``:
    every process draws the whole batch's choices and keeps its rows, so N processes crop and flip
    the images exactly as one process does. Same generator state → same batch.
    """
    r, total = resolution, len(images) if total is None else total
    draws = (torch.rand((total, 3), generator=generator, dtype=torch.float64)[rows].tolist()
             if random_flip or not center_crop else None)
    out = []
    for k, img in enumerate(images):
        h, w = img.shape[-2:]
        if h < r or w < r:
            raise ValueError(f"image {h}×{w} is smaller than the crop {r}×{r}")
        if center_crop:
            top, left = (h - r) // 2, (w - r) // 2
        else:
            top, left = min(int(draws[k][0] * (h - r + 1)), h - r), min(int(draws[k][1] * (w - r + 1)), w - r)
        img = img[..., top:top + r, left:left + r]
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


def fits_on_device(dataset: ImageSet, resolution: int) -> bool:
    """An in-memory set already at R×R and small enough to be held on the device (see DeviceBatches)."""
    return (isinstance(dataset, ArrayImageSet) and tuple(dataset.images.shape[-2:]) == (resolution, resolution)
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
