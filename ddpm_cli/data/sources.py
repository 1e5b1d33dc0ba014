"""Data sets: the built-in Fashion-MNIST and emoji sets, and folders of images.

Every data set implements :class:`ImageSet`; ``load(i)`` gives a uint8 tensor C×H×W whose
shorter side equals the training resolution (for a non-square resolution H×W: resized, keeping its aspect,
to the smallest size that covers H×W). Batching is in :mod:`ddpm_cli.data.batches`;
captions (``ImageSet.captions``) come from :mod:`ddpm_cli.data.captions`.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ddpm_cli.engine.errors import InputError
from ddpm_cli.data.captions import EMOJI_FONT, emoji_caption_choices, everyday_emoji, folder_captions, load_emoji

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
BUILTIN_DATASETS = ("fashion-mnist", "fashion-mnist-subset", "emoji", "emoji-everyday")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SUBSET_DIR = Path(__file__).resolve().parent / "fashion-mnist-subset"
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
    ``labels`` (class index per item, or None), ``class_names`` (or None), ``captions``
    (one text per item, or None) and ``caption_choices`` (None, or per item the captions that training
    draws one of per sample; ``captions`` then still names each item once).
    """

    name: str = ""
    source: str = ""
    channels: int = 3
    labels: list[int] | None = None
    class_names: list[str] | None = None
    captions: list[str] | None = None
    caption_choices: list[list[str]] | None = None

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
    that many pixels, or for (H, W) to the smallest size of its aspect that covers H×W (None keeps the
    files' own sizes). Headers are checked up front."""

    def __init__(self, paths: list[Path], resolution: int | tuple[int, int] | None, channels: int = 3, name: str = "files",
                 source: str = ""):
        from ddpm_cli.engine.io.images import probe_image

        if channels not in (1, 3):
            raise InputError(f"--channels must be 1 or 3, got {channels}")
        self.paths = [Path(p) for p in paths]
        for path in self.paths:  # headers only: bad files fail now, not hours into training
            probe_image(path)
        self.resolution = None if resolution is None else _size(resolution)
        self.channels, self.name, self.source = channels, name, source

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> torch.Tensor:
        from PIL import Image

        from ddpm_cli.engine.io.images import load_image

        image = load_image(self.paths[i], mode="L" if self.channels == 1 else "RGB")
        w, h = image.width, image.height
        if self.resolution is not None:
            rh, rw = self.resolution
            # the side whose ratio to the target is smaller takes the target's size, the other follows the aspect
            size = (rw, max(rh, round(h * rw / w))) if rh * w <= rw * h else (max(rw, round(w * rh / h)), rh)
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
    :func:`ddpm_cli.data.captions.folder_captions`); None when no image has one.
    """

    def __init__(self, folder: str | os.PathLike, resolution: int | None, channels: int = 3, name: str | None = None):
        from ddpm_cli.engine.io.images import list_images

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


def _size(resolution: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) of a training resolution: R or (H, W), each a positive integer."""
    pair = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if len(pair) != 2 or not all(isinstance(side, int) and side >= 1 for side in pair):
        raise InputError(f"--resolution must be a positive integer or HxW, got {resolution}")
    return pair


def _center_crop(images: torch.Tensor, resolution: int | tuple[int, int]) -> torch.Tensor:
    """The middle H×W of square N×C×S×S images (S = max(H, W)); square resolutions pass through."""
    height, width = _size(resolution)
    top, left = (images.shape[-2] - height) // 2, (images.shape[-1] - width) // 2
    return images[..., top:top + height, left:left + width]


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


def _open_fashion_mnist(folder: Path, name: str, resolution: int | tuple[int, int], channels: int,
                        split: str) -> ArrayImageSet:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or images.dtype != np.uint8 \
            or images.shape[1] != images.shape[2] or (len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise InputError(f"Fashion-MNIST files under {folder} do not match (shape or labels); reinstall them")
    tensor = _center_crop(_fit_array(torch.from_numpy(images).unsqueeze(1), max(_size(resolution))), resolution)
    if channels == 3:  # greyscale replicated as RGB, without copying
        tensor = tensor.expand(-1, 3, -1, -1)
    return ArrayImageSet(tensor, labels.astype(np.int64).tolist(), list(FASHION_MNIST_CLASSES), name, str(folder))


def open_dataset(spec: str, resolution: int | tuple[int, int], channels: int | None = None,
                 split: str = "train") -> ImageSet:
    """Open a built-in data set by name (see ``BUILTIN_DATASETS``) or a folder of images.

    ``fashion-mnist`` uses the full Debian files when installed, else the shipped subset (see
    ``.source`` and ``.name``); it is 1 channel (``channels=3`` replicates it), zero-padded evenly
    when the resolution is 28 + 2k, else bicubic-resized. ``emoji`` is ~1,280 captioned RGB
    emoji on white (resolution 16 or more; ``channels=1`` makes them greyscale), with several
    caption choices each (``emoji_caption_choices``); ``emoji-everyday`` is the ~390 of them that
    CLDR groups as animals, nature, food, faces, hearts and weather (``everyday_emoji``), each captioned
    with its lower-case Unicode name alone. Neither has held-out images, so their "test" split is
    the same as "train". A folder defaults to 3
    channels (RGB); 1 means greyscale. ``split`` ("train" or "test") applies to the built-ins.

    ``resolution`` is R or (H, W). The built-ins are square: at H×W they are made at max(H, W), as
    above, and center-cropped to H×W once, so they stay in memory at the training size; a folder's
    images are resized to cover H×W and cropped per batch (``--center-crop/--random-crop``).
    """
    _size(resolution)
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    if channels is not None and channels not in (1, 3):
        raise InputError(f"--channels must be 1 or 3, got {channels}")
    name = spec.strip()
    if name == "emoji":
        images, captions = load_emoji(max(_size(resolution)), channels or 3)
        images = _center_crop(images, resolution)
        dataset = ArrayImageSet(images, name="emoji", source=str(EMOJI_FONT), captions=captions)
        dataset.caption_choices = emoji_caption_choices(captions)
        return dataset
    if name == "emoji-everyday":
        images, captions = load_emoji(max(_size(resolution)), channels or 3)
        images = _center_crop(images, resolution)
        keep = everyday_emoji(captions)
        return ArrayImageSet(images[keep], name="emoji-everyday", source=str(EMOJI_FONT),
                             captions=[captions[i].lower() for i in keep])
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
