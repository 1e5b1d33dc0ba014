"""Which sampler and noise levels `ddpm sample` should use by default at 20 steps, by image quality.

The distance sweep (docs/samplers.md) measures solver error; this measures what a user sees: the
Fréchet distance between the built-in fashion-mnist model's samples and Fashion-MNIST's test images,
in the features of a small classifier trained here on the training split (its 128-d penultimate
layer; the test accuracy is printed), as the issue's "classifier features" distance.

    python benchmarks/sampler_fd.py [--images 1000] [--steps 20]

Prints one row per candidate: sampler, --sigmas, Fréchet distance, seconds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpm_cli.data.sources import open_dataset
from ddpm_cli.engine.models.pipeline import load_pipeline
from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch
from ddpm_cli.evaluation.fid import Stats, frechet_distance

CANDIDATES = [("dpmpp-2m", "default"), ("dpmpp-2m", "karras"), ("unipc", "default"), ("unipc", "karras")]


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
    return images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images


def train_classifier(epochs: int = 1) -> Classifier:
    train = open_dataset("fashion-mnist", 32, 1, split="train")
    x, y = as_input(train.images), torch.tensor(train.labels)
    torch.manual_seed(0)
    net = Classifier()
    optimiser = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(256):
            loss = F.cross_entropy(net(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return net.eval()


@torch.no_grad()
def stats(net: Classifier, images: torch.Tensor):
    features = torch.cat([net.body(as_input(chunk)) for chunk in images.split(500)]).double().numpy()
    return Stats(features.mean(0), np.cov(features, rowvar=False), features.shape[0], "fashion-classifier")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    started = time.time()
    net = train_classifier()
    test = open_dataset("fashion-mnist", 32, 1, split="test")
    with torch.no_grad():
        accuracy = (net(as_input(test.images)).argmax(1) == torch.tensor(test.labels)).float().mean().item()
    reference = stats(net, test.images)
    print(f"classifier: test accuracy {accuracy:.3f} ({time.time() - started:.0f} s); reference: {len(test)} test images")
    pipeline = load_pipeline("fashion-mnist", None, "cpu", "fp32", False, False)
    print(f"{'sampler':<10} {'sigmas':<8} {'FD':>7} {'s':>6}   ({args.images} samples, {args.steps} steps)")
    for sampler, sigmas in CANDIDATES:
        started = time.time()
        settings = SamplerSettings(sampler, args.steps, options={"sigmas": sigmas})
        images = torch.cat([sample_batch(pipeline, list(range(start, min(start + 250, args.images))), settings)
                            for start in range(0, args.images, 250)])
        distance = frechet_distance(stats(net, images), reference)
        print(f"{sampler:<10} {sigmas:<8} {distance:>7.2f} {time.time() - started:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
