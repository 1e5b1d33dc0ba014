"""Use ddpm-cli's engine from Python, without the CLI.

    python examples/sample_with_the_engine.py MODEL OUT.png [--steps 25]

MODEL is anything ``ddpm sample`` takes: a run folder from ``ddpm train``, a diffusers DDPMPipeline
folder, a built-in name or a Hub id. Samples 16 images with DDIM and writes them as one grid.
"""

import argparse

from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch
from ddpm_cli.engine.io.images import make_grid, save_png
from ddpm_cli.engine.models.pipeline import load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()

    pipeline = load_pipeline(args.model, device="auto")
    settings = SamplerSettings("ddim", steps=args.steps)
    images = sample_batch(pipeline, seeds=list(range(16)), settings=settings)  # (16, C, H, W) in [-1, 1]
    path = save_png(make_grid(images, nrow=4), args.out, {"model": args.model, "sampler": "ddim", "steps": args.steps},
                    overwrite=True)
    print(path)


if __name__ == "__main__":
    main()
