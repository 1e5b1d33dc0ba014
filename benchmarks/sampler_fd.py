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

import torch
from fashion_fd import Judge

from ddpm_cli.engine.models.pipeline import load_pipeline
from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch

CANDIDATES = [("dpmpp-2m", "default"), ("dpmpp-2m", "karras"), ("unipc", "default"), ("unipc", "karras")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    judge = Judge()
    print(f"classifier: test accuracy {judge.accuracy:.3f} ({judge.seconds:.0f} s); reference: {judge.test_images} test images")
    pipeline = load_pipeline("fashion-mnist", None, "cpu", "fp32", False, False)
    print(f"{'sampler':<10} {'sigmas':<8} {'FD':>7} {'s':>6}   ({args.images} samples, {args.steps} steps)")
    for sampler, sigmas in CANDIDATES:
        started = time.time()
        settings = SamplerSettings(sampler, args.steps, options={"sigmas": sigmas})
        images = torch.cat([sample_batch(pipeline, list(range(start, min(start + 250, args.images))), settings)
                            for start in range(0, args.images, 250)])
        distance = judge.distance(images)
        print(f"{sampler:<10} {sigmas:<8} {distance:>7.2f} {time.time() - started:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
