"""Tests for ddpm_cli.data (sources, batches): built-in Fashion-MNIST, folders, batching, cropping."""

from __future__ import annotations

import gzip
import itertools
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_cli.engine.errors import InputError
from ddpm_cli.data import sources as data
from ddpm_cli.data.sources import BUILTIN_DATASETS, FASHION_MNIST_CLASSES, ArrayImageSet, FolderImageSet, open_dataset, read_idx
from ddpm_cli.data.batches import BatchLoader, EpochBatches, crop_and_flip, default_num_workers

FULL = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------- built-in data set


def test_subset_at_32_is_padded_and_balanced():
    ds = open_dataset("fashion-mnist-subset", 32)
    assert isinstance(ds, ArrayImageSet)
    assert ds.name == "fashion-mnist-subset" and Path(ds.source) == data.SUBSET_DIR
    assert len(ds) == 3000 and ds.channels == 1
    assert ds.class_names == list(FASHION_MNIST_CLASSES) and len(FASHION_MNIST_CLASSES) == 10
    assert sorted(set(ds.labels)) == list(range(10))
    assert all(ds.labels.count(k) == 300 for k in range(10))
    img = ds.load(0)
    assert img.dtype == torch.uint8 and img.shape == (1, 32, 32)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert ds.images[:, :, border].max() == 0  # the 2-pixel padding is black
    at28 = open_dataset("fashion-mnist-subset", 28)
    assert torch.equal(ds.images[:, :, 2:30, 2:30], at28.images)


def test_subset_test_split_and_other_resolutions():
    test = open_dataset("fashion-mnist-subset", 28, split="test")
    assert len(test) == 500 and all(test.labels.count(k) == 50 for k in range(10))
    small = open_dataset("fashion-mnist-subset", 20)  # not 28 + 2k: resized
    assert small.images.shape == (3000, 1, 20, 20) and small.images.dtype == torch.uint8
    rgb = open_dataset("fashion-mnist-subset", 28, channels=3)
    assert rgb.channels == 3 and rgb.load(5).shape == (3, 28, 28)
    assert torch.equal(rgb.load(5)[0], rgb.load(5)[2])


def test_builtin_falls_back_to_subset(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")
    ds = open_dataset("fashion-mnist", 28)
    assert ds.name == "fashion-mnist-subset" and len(ds) == 3000


@pytest.mark.skipif(not FULL.exists(), reason="Debian package dataset-fashion-mnist not installed")
def test_full_debian_set():
    ds = open_dataset("fashion-mnist", 28)
    assert ds.name == "fashion-mnist" and len(ds) == 60000 and ds.source == str(FULL.parent)
    assert all(ds.labels.count(k) == 6000 for k in range(10))
    # The shipped subset is the first 300 of each class, in file order.
    labels = np.array(ds.labels)
    keep = np.sort(np.concatenate([np.flatnonzero(labels == k)[:300] for k in range(10)]))
    subset = open_dataset("fashion-mnist-subset", 28)
    assert torch.equal(subset.images, ds.images[torch.from_numpy(keep)])
    assert subset.labels == labels[keep].tolist()


def test_unknown_name_lists_builtins():
    with pytest.raises(InputError) as exc:
        open_dataset("no-such-dataset", 32)
    message = _one_line(exc)
    assert all(name in message for name in BUILTIN_DATASETS)


# ---------------------------------------------------------------- read_idx


def _idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_read_idx_plain_and_gzip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(_idx_bytes(array))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    assert np.array_equal(read_idx(tmp_path / "a.idx"), array)
    assert np.array_equal(read_idx(tmp_path / "a.idx.gz"), array)


@pytest.mark.parametrize("content", [
    b"\x00\x00\x07\x03garbage",                       # bad type code in the magic number
    b"PNG\x0d\x0a\x1a\x0a....",                        # not IDX at all
    _idx_bytes(np.zeros((2, 3), np.uint8))[:-1],       # truncated payload
    gzip.compress(b"x" * 100, mtime=0)[:-8],           # truncated gzip stream
])
def test_read_idx_rejects_corrupt(tmp_path, content):
    path = tmp_path / "bad.gz"
    path.write_bytes(content)
    with pytest.raises(InputError) as exc:
        read_idx(path)
    assert str(path) in _one_line(exc)


# ---------------------------------------------------------------- folders


def _save(path: Path, size: tuple[int, int], color, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)


def test_folder_with_subfolders_gives_labels(tmp_path):
    _save(tmp_path / "zebra" / "a.png", (40, 30), (255, 0, 0))
    _save(tmp_path / "apple" / "b.png", (30, 50), (0, 255, 0))
    _save(tmp_path / "apple" / "deep" / "c.jpg", (16, 16), (0, 0, 255))
    ds = open_dataset(str(tmp_path), 16)
    assert isinstance(ds, FolderImageSet) and ds.channels == 3 and len(ds) == 3
    assert ds.class_names == ["apple", "zebra"]
    assert [p.name for p in ds.paths] == ["b.png", "c.jpg", "a.png"]
    assert ds.labels == [0, 0, 1]
    assert ds.load(0).shape == (3, 27, 16)  # 30×50 → shorter side 16
    assert ds.load(2).shape == (3, 16, 21)  # 40×30 → shorter side 16
    red = ds.load(2)
    assert red.dtype == torch.uint8 and red[0].min() == 255 and red[1].max() == 0
    grey = open_dataset(str(tmp_path), 16, channels=1)
    assert grey.channels == 1 and grey.load(1).shape == (1, 16, 16)


def test_mixed_flat_folder_ignores_other_files(tmp_path):
    _save(tmp_path / "a.png", (20, 20), (10, 20, 30))
    _save(tmp_path / "b.jpg", (24, 20), (200, 100, 50), "JPEG")
    _save(tmp_path / "sub" / "c.png", (20, 20), (0, 0, 0))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = FolderImageSet(tmp_path, 20)
    assert len(ds) == 3 and ds.labels is None and ds.class_names is None
    assert ds.load(1).shape == (3, 20, 24)


def test_empty_or_missing_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InputError) as exc:
        open_dataset(str(tmp_path), 32)
    assert "no images" in _one_line(exc) and str(tmp_path) in str(exc.value)
    with pytest.raises(InputError):
        FolderImageSet(tmp_path / "missing", 32)
    with pytest.raises(InputError):
        FolderImageSet(tmp_path / "readme.txt", 32)


# ---------------------------------------------------------------- batching


def test_epoch_batches_deterministic_and_complete():
    a, b = EpochBatches(103, 10, seed=7), EpochBatches(103, 10, seed=7)
    assert a.steps_per_epoch == 10
    assert [a.indices(s) for s in range(35)] == [b.indices(s) for s in range(35)]
    assert b.indices(23) == EpochBatches(103, 10, seed=7).indices(23)  # resumable: no state needed
    epoch0 = [i for s in range(10) for i in a.indices(s)]
    assert len(epoch0) == len(set(epoch0)) == 100 and all(0 <= i < 103 for i in epoch0)
    epoch1 = [i for s in range(10, 20) for i in a.indices(s)]
    assert epoch0 != epoch1
    assert EpochBatches(103, 10, seed=8).indices(0) != a.indices(0)


def test_epoch_batches_too_large_batch():
    with pytest.raises(InputError) as exc:
        EpochBatches(5, 8, seed=0)
    assert "5 images" in _one_line(exc) and "--batch-size 8" in str(exc.value)


def test_crop_center_no_flip_matches_manual():
    images = [torch.randint(0, 256, (3, 20, 27), dtype=torch.uint8) for _ in range(3)]
    out = crop_and_flip(images, 16, center_crop=True, random_flip=False, generator=torch.Generator().manual_seed(0))
    expected = torch.stack([img[:, 2:18, 5:21] for img in images])
    assert out.dtype == torch.uint8 and torch.equal(out, expected)


def test_random_crop_and_flip_reproducible():
    images = [torch.randint(0, 256, (1, 24, 30), dtype=torch.uint8) for _ in range(16)]
    run = lambda seed: crop_and_flip(images, 16, False, True, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))
    flips = crop_and_flip([images[0][:, :16, :16]] * 64, 16, True, True, torch.Generator().manual_seed(1))
    flipped = sum(torch.equal(x, images[0][:, :16, :16].flip(-1)) for x in flips)
    assert 10 < flipped < 54  # roughly half


def test_each_process_crops_and_flips_its_rows_as_one_process_does():
    """torchrun: two processes, each with its half of a global batch, make one process's batch."""
    from ddpm_cli.training.latents import flip_latents

    images = [torch.randint(0, 256, (1, 20 + k, 30 - k), dtype=torch.uint8) for k in range(8)]
    whole = crop_and_flip(images, 16, False, True, torch.Generator().manual_seed(5))
    halves = [crop_and_flip(images[rows], 16, False, True, torch.Generator().manual_seed(5), rows, 8)
              for rows in (slice(0, 4), slice(4, 8))]
    assert torch.equal(torch.cat(halves), whole)
    assert len({tuple(x.flatten()[:5].tolist()) for x in whole}) == 8  # crops differ image to image
    latents = [torch.randn(4, 6, 6) for _ in range(8)]
    one = flip_latents(latents, True, torch.Generator().manual_seed(2))
    two = [flip_latents(latents[rows], True, torch.Generator().manual_seed(2), rows, 8) for rows in (slice(0, 4), slice(4, 8))]
    assert torch.equal(torch.cat(two), one) and not torch.equal(one, torch.stack(latents))


def test_batch_loader_array_set():
    ds = open_dataset("fashion-mnist-subset", 28)
    batches = EpochBatches(len(ds), 32, seed=1)
    step, images, labels = next(BatchLoader(ds, batches, num_workers=3).iterate(5))
    idx = batches.indices(5)
    assert step == 5 and len(images) == 32 and torch.equal(torch.stack(images), ds.images[idx])
    assert labels.tolist() == [ds.labels[i] for i in idx]


def test_batch_loader_folder_workers_agree(tmp_path):
    for k in range(12):
        _save(tmp_path / f"c{k % 2}" / f"{k:02d}.png", (18 + k, 18), (k * 20, 0, 255 - k * 20))
    ds = FolderImageSet(tmp_path, 16)
    batches = EpochBatches(len(ds), 4, seed=3)
    loader0, loader1 = BatchLoader(ds, batches, num_workers=0), BatchLoader(ds, batches, num_workers=1)
    got0 = list(itertools.islice(loader0.iterate(2), 5))
    got1 = list(itertools.islice(loader1.iterate(2), 5))
    assert [s for s, _, _ in got0] == [s for s, _, _ in got1] == [2, 3, 4, 5, 6]
    for (s, imgs0, lab0), (_, imgs1, lab1) in zip(got0, got1):
        assert torch.equal(lab0, lab1) and lab0.tolist() == [ds.labels[i] for i in batches.indices(s)]
        assert all(torch.equal(a, b) for a, b in zip(imgs0, imgs1))
        assert all(torch.equal(a, b) for a, b in zip(imgs0, loader0.batch(s)))
    assert default_num_workers() >= 0
