"""The Fréchet distance the benchmarks use on Fashion-MNIST: in the 128-d penultimate features of a
small classifier trained here on the training split (its test accuracy is reported), against the
test split. Imported by sampler_fd.py and recipe_proof.py (run them from the repository root).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpm_cli.data.sources import open_dataset
from ddpm_cli.evaluation.fid import Stats, frechet_distance

__all__ = ["Classifier", "Judge", "frechet_distance"]


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.body(x))


def as_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> [-1, 1]; float images are taken as already in [-1, 1]."""
    return images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()


def train_classifier(epochs: int = 1, seed: int = 0) -> Classifier:
    train = open_dataset("fashion-mnist", 32, 1, split="train")
    x, y = as_input(train.images), torch.tensor(train.labels)
    torch.manual_seed(seed)
    net = Classifier()
    optimiser = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(256):
            loss = F.cross_entropy(net(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return net.eval()


class Judge:
    """The classifier, its test accuracy and the test split's feature statistics (the reference)."""

    def __init__(self, epochs: int = 1, cache: Path | None = None):
        """``cache``: a file for the classifier's weights, trained once (seeded, so the same each time)."""
        started = time.perf_counter()
        if cache is not None and cache.is_file():
            self.net = Classifier()
            self.net.load_state_dict(torch.load(cache, weights_only=True))
            self.net.eval()
        else:
            self.net = train_classifier(epochs)
            if cache is not None:
                torch.save(self.net.state_dict(), cache)
        test = open_dataset("fashion-mnist", 32, 1, split="test")
        with torch.no_grad():
            predicted = torch.cat([self.net(as_input(chunk)).argmax(1) for chunk in test.images.split(1000)])
        self.accuracy = (predicted == torch.tensor(test.labels)).float().mean().item()
        self.reference = self.stats(test.images)
        self.test_images = len(test)
        self.seconds = time.perf_counter() - started

    @torch.no_grad()
    def stats(self, images: torch.Tensor) -> Stats:
        features = torch.cat([self.net.body(as_input(chunk)) for chunk in images.split(500)]).double().numpy()
        return Stats(features.mean(0), np.cov(features, rowvar=False), features.shape[0], "fashion-classifier")

    def distance(self, images: torch.Tensor) -> float:
        """Fréchet distance of ``images`` (uint8, or float in [-1, 1]) to the test split."""
        return frechet_distance(self.stats(images), self.reference)
