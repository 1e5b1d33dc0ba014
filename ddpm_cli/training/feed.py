"""What the training loop eats: endless micro-batches of (x0 on the device, conditioning).

A small in-memory set at the training resolution lives on the device as uint8 (``DeviceBatches``);
anything else is loaded, cropped and flipped on the host by ``BatchLoader``'s workers, through
pinned memory on CUDA. Class labels and caption embeddings are dropped to the null class or the
empty caption with probability --cond-drop, so one model learns both guidance branches. An item
with several captions (``ImageSet.caption_choices``, see :class:`CaptionChoices`) gets one of them,
drawn uniformly per sample.

Under torchrun every process draws the random choices of the whole global batch (flips, crops,
label drops) and keeps its own rows, so the run is the one-process run split up.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from ddpm_cli.engine.runtime.distributed import World
from ddpm_cli.training.config import TrainConfig
from ddpm_cli.data.batches import BatchLoader, DeviceBatches, EpochBatches, crop_and_flip, fits_on_device
from ddpm_cli.training.latents import flip_latents


class CaptionChoices:
    """The embeddings of every item's caption choices, each distinct caption encoded once (an
    ``EmbeddingCache``); ``choose(indices, u)`` picks, for uniform draws u in [0, 1), one choice per
    item. A data set with one caption per item has one choice each and needs no draws (``several``)."""

    def __init__(self, encoder, choices: list[list[str]], batch_size: int = 256):
        from ddpm_cli.engine.models.text import EmbeddingCache

        if any(not c for c in choices):
            raise ValueError("every item needs at least one caption choice")
        self.cache = EmbeddingCache(encoder, [c for item in choices for c in item], batch_size)
        self.captions, self.null_row, self.rows = self.cache.captions, self.cache.null_row, self.cache.rows
        counts = [len(c) for c in choices]
        table = torch.full((len(choices), max(counts)), self.null_row, dtype=torch.long)
        flat = iter(self.cache.index)
        for i, n in enumerate(counts):
            table[i, :n] = torch.tensor([next(flat) for _ in range(n)])
        self.table, self.counts = table, torch.tensor(counts)
        self.several = max(counts) > 1

    def first_captions(self) -> list[str]:
        """Each distinct first choice, in the items' order, without the empty caption."""
        return [self.captions[row] for row in dict.fromkeys(self.table[:, 0].tolist()) if row != self.null_row]

    def choose(self, indices: list[int], u: torch.Tensor | None) -> torch.Tensor:
        """Embedding rows, one per item of ``indices``: choice floor(u * its number of choices), or the
        first choice where ``u`` is None."""
        idx = torch.tensor(indices)
        if u is None:
            return self.table[idx, 0]
        counts = self.counts[idx].to(u.device)
        pick = (u * counts).long().clamp_(max=counts - 1)
        return self.table.to(u.device)[idx.to(u.device), pick]


class Feed:
    """``feed(start)``: micro-batches from micro-step ``start`` on; ``generators`` are the run's own
    ("augment" for flips and crops, "noise" for label drops), so a resumed run draws what it would have."""

    def __init__(self, config: TrainConfig, dataset, batches: EpochBatches, device: torch.device, world: World,
                 generators: dict[str, torch.Generator], memory_format: torch.memory_format,
                 class_names: list[str] | None = None, captions=None):
        self.config, self.dataset, self.batches, self.device, self.world = config, dataset, batches, device, world
        self.generators, self.memory_format = generators, memory_format
        self.class_names, self.captions = class_names, captions
        self.latent = getattr(dataset, "latent", False)

    def __call__(self, start: int) -> Iterator[tuple[torch.Tensor, dict]]:
        c = self.config
        rows = self.world.shard(c.batch_size)
        if not self.latent and fits_on_device(self.dataset, c.image_size):
            fetch = DeviceBatches(self.dataset, self.batches, self.device, c.random_flip, self.generators["augment"], rows)
            for step in itertools.count(start):
                images, labels, indices = fetch(step)
                yield self.scaled(images), self.conditioning(indices, labels)
            return
        loader = BatchLoader(self.dataset, self.batches, c.num_workers, rows, pin_memory=self.device.type == "cuda")
        for step, images, labels in loader.iterate(start):
            yield self._micro_batch(images), self.conditioning(loader.indices(step), labels)

    def scaled(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images on the device to [-1, 1], in the model's memory layout."""
        return (images.float() / 127.5 - 1.0).contiguous(memory_format=self.memory_format)

    def _micro_batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        c = self.config
        total = len(images) * self.world.size  # the global batch, whose crops and flips every process draws
        rows = self.world.shard(total)
        if self.latent:  # already float and scaled; flips are the only augmentation that suits latents
            return flip_latents(images, c.random_flip, self.generators["augment"], rows, total).to(self.device)
        batch = crop_and_flip(images, c.image_size, c.center_crop, c.random_flip, self.generators["augment"], rows, total)
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return self.scaled(batch.to(self.device, non_blocking=True))

    def conditioning(self, indices: list[int], labels: torch.Tensor | None) -> dict:
        """The batch's class labels or caption embeddings, some dropped (--cond-drop); the drops of the
        whole global batch are drawn, and this process keeps its rows."""
        if self.class_names is None and self.captions is None:
            return {}
        total = len(indices) * self.world.size
        if self.captions is not None:
            u = None
            if self.captions.several:  # one draw per item of the global batch, as for the drops
                u = torch.rand((total,), generator=self.generators["noise"], device=self.device)[self.world.shard(total)]
            rows, null = self.captions.choose(indices, u).to(self.device), self.captions.null_row
        else:
            rows, null = labels.to(self.device, non_blocking=True), len(self.class_names)
        drop = torch.rand((total,), generator=self.generators["noise"], device=self.device) < self.config.cond_drop
        drop = drop[self.world.shard(total)]
        rows = torch.where(drop, torch.full_like(rows, null), rows)
        if self.captions is None:
            return {"class_labels": rows}
        hidden, mask = self.captions.rows(rows)
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}
