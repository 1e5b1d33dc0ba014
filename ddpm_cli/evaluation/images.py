"""Image sets for evaluation: a folder or a built-in data set as one uint8 tensor at a given size."""

from __future__ import annotations

import torch


def read_images(spec: str, size: int, channels: int, split: str = "train", limit: int | None = None):
    """(N×C×size×size uint8 images of a folder or built-in, centre-cropped; the set's name)."""
    from ddpm_cli.data.sources import open_dataset
    from ddpm_cli.data.batches import crop_and_flip

    dataset = open_dataset(spec, size, channels, split=split)
    count = len(dataset) if not limit else min(limit, len(dataset))
    images = crop_and_flip([dataset.load(i) for i in range(count)], size, True, False, torch.Generator())
    return images, dataset.name
