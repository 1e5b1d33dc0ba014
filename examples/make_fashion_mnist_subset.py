#!/usr/bin/env python3
"""Make the small Fashion-MNIST subset shipped in ``ddpm_cli/data/fashion-mnist-subset/``.

Reads the full Fashion-MNIST IDX gzip files (Debian package ``dataset-fashion-mnist``) and
writes, in the same IDX gzip format and under the same file names:

* train: the first 300 images of each of the 10 classes, in file order (3,000 images);
* t10k:  the first 50 images of each class, in file order (500 images).

The selected images keep their original relative order. Output is byte-for-byte reproducible:
gzip is written with ``mtime=0`` and no file name in the header.

Usage (from the repository root)::

    python examples/make_fashion_mnist_subset.py
    python examples/make_fashion_mnist_subset.py --source DIR --out DIR

Depends only on numpy and the standard library.
"""

from __future__ import annotations

import argparse
import gzip
import io
import struct
import sys
from pathlib import Path

import numpy as np

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "ddpm_cli" / "data" / "fashion-mnist-subset"
PER_CLASS = {"train": 300, "t10k": 50}


def read_idx_gz(path: Path) -> np.ndarray:
    """Read a gzip IDX file holding unsigned bytes (type code 0x08)."""
    data = gzip.decompress(path.read_bytes())
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise SystemExit(f"{path}: not a uint8 IDX file")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a reproducible gzip IDX file (mtime 0, no stored file name)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(header + array.tobytes())
    path.write_bytes(buffer.getvalue())


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` items of each class, sorted in file order."""
    picked = []
    for cls in np.unique(labels):
        where = np.flatnonzero(labels == cls)
        if len(where) < per_class:
            raise SystemExit(f"class {cls} has only {len(where)} items, fewer than {per_class}")
        picked.append(where[:per_class])
    return np.sort(np.concatenate(picked))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder of the full IDX .gz files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write the subset into")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    for split, per_class in PER_CLASS.items():
        images_name = f"{split}-images-idx3-ubyte.gz"
        labels_name = f"{split}-labels-idx1-ubyte.gz"
        images = read_idx_gz(args.source / images_name)
        labels = read_idx_gz(args.source / labels_name)
        if len(images) != len(labels):
            raise SystemExit(f"{split}: {len(images)} images but {len(labels)} labels")
        keep = first_per_class(labels, per_class)
        write_idx_gz(args.out / images_name, images[keep])
        write_idx_gz(args.out / labels_name, labels[keep])
        print(f"{split}: kept {len(keep)} of {len(labels)} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
