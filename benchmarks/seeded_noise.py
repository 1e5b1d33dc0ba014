"""Host time of one sampling step's seeded noise, per batch size (see ddpm_cli/engine/noise.py).

    python benchmarks/seeded_noise.py [--device cuda] [--batches 64 256 1024] [--repeats 10] [--rounds 7]

Compares drawing one seed at a time and concatenating (what ddpm did before) with
``SeededNoise`` on one thread and on its default number of threads; all three give the same
tensor bit for bit, which the script checks. The three are timed in turn, round after round, and
each figure is the median round (the machines this runs on are shared). On CUDA the time includes the copy to the device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ddpm_cli.engine.diffusion.noise import SeededNoise, default_workers  # noqa: E402


class Concatenated:
    """The reference: one (1, *shape) draw per seed, concatenated, then moved to the device."""

    def __init__(self, seeds, shape, device):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.shape, self.device = shape, torch.device(device)

    def __call__(self):
        draws = torch.cat([torch.randn((1, *self.shape), generator=g) for g in self.generators])
        if self.device.type == "cuda":
            return draws.pin_memory().to(self.device, non_blocking=True)
        return draws.to(self.device)


def milliseconds(draw, device: str, repeats: int) -> float:
    draw()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        draw()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--shape", type=int, nargs="+", default=[3, 32, 32])
    parser.add_argument("--repeats", type=int, default=10, help="draws per timing")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timings of each way; the median is shown")
    args = parser.parse_args()
    shape = tuple(args.shape)
    print(f"seeded noise per sampling step, shape {'x'.join(map(str, shape))}, device {args.device}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}")
    print("| batch | concatenated, ms | SeededNoise 1 thread, ms | SeededNoise N threads, ms | N | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for batch in args.batches:
        seeds = list(range(batch))
        makers = [lambda: Concatenated(seeds, shape, args.device),
                  lambda: SeededNoise(seeds, shape, args.device, workers=1),
                  lambda: SeededNoise(seeds, shape, args.device)]
        first = [make()().cpu() for make in makers]
        if not all(torch.equal(first[0], other) for other in first[1:]):
            raise SystemExit("the three ways of drawing disagree")
        draws = [make() for make in makers]
        rounds = [[milliseconds(draw, args.device, args.repeats) for draw in draws] for _ in range(args.rounds)]
        reference, single, threaded = (statistics.median(column) for column in zip(*rounds))
        print(f"| {batch} | {reference:.1f} | {single:.1f} | {threaded:.1f} | {default_workers(batch)} "
              f"| {reference / threaded:.2f}x |")


if __name__ == "__main__":
    main()
