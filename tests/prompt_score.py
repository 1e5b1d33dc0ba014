"""Scores a text-to-emoji model on the held-out prompts of ``heldout_prompts.tsv``: a text-conditional
model, or a class-conditional one given each prompt's nearest class as txt2img gives it.

Each prompt is sampled as ``ddpm txt2img`` samples it by default (dpmpp-2m, 30 steps, cfg 7.5), one
image per seed. An image counts as a top-1 hit when the emoji nearest to it, by pixel distance among
all the training emoji (32x32, 2x2-average-pooled to 16x16, RGB in [-1, 1]), is one the prompt may mean;
a top-5 hit when one of those is among its 5 nearest. The rates are the hits over all images.

    python -m tests.prompt_score [MODEL] [--seeds 4] [--grid grid.png] [--prior nearest|none] [--prompts "a cat" ...]
"""

from __future__ import annotations

import argparse
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

PROMPTS_FILE = Path(__file__).with_name("heldout_prompts.tsv")
SAMPLER, STEPS, CFG = "dpmpp-2m", 30, 7.5  # txt2img's defaults


def heldout_prompts(path: Path = PROMPTS_FILE) -> dict[str, set[str]]:
    """{prompt: the emoji (single code points) it may mean}."""
    prompts: dict[str, set[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        prompt, emoji = line.split("\t")
        assert prompt not in prompts, f"{prompt!r} listed twice"
        prompts[prompt] = set(emoji.strip())
    return prompts


def training_emoji(resolution: int = 32) -> tuple[torch.Tensor, list[str]]:
    """All training emoji as float N×3×R×R in [-1, 1], and each one's code point."""
    from ddpm_cli.data.captions import load_emoji

    images, names = load_emoji(resolution)
    return images.float() / 127.5 - 1, [unicodedata.lookup(name) for name in names]


def _features(images: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(images, 2).flatten(1)


@dataclass
class Score:
    top1: float
    top5: float
    images: int
    per_prompt: dict[str, tuple[int, int, list[str]]]  # prompt: (top-1 hits, top-5 hits, nearest emoji per seed)

    def __str__(self) -> str:
        return f"top-1 {self.top1:.3f}, top-5 {self.top5:.3f} over {self.images} images"


def score(generated: dict[str, torch.Tensor], references: torch.Tensor, code_points: list[str],
          prompts: dict[str, set[str]]) -> Score:
    """Top-1 and top-5 rates of the generated images ({prompt: n×3×32×32 in [-1, 1]})."""
    reference = _features(references)
    missing = {e for p in generated for e in prompts[p]} - set(code_points)
    assert not missing, f"acceptable emoji that are not training emoji: {sorted(missing)}"
    per_prompt, hit1, hit5, total = {}, 0, 0, 0
    for prompt, images in generated.items():
        nearest = torch.cdist(_features(images.float()), reference).topk(5, dim=1, largest=False).indices
        names = [[code_points[k] for k in row] for row in nearest.tolist()]
        h1 = sum(row[0] in prompts[prompt] for row in names)
        h5 = sum(any(e in prompts[prompt] for e in row) for row in names)
        per_prompt[prompt] = (h1, h5, [row[0] for row in names])
        hit1, hit5, total = hit1 + h1, hit5 + h5, total + len(names)
    return Score(hit1 / total, hit5 / total, total, per_prompt)


def generate(model: str, prompts: list[str], seeds: list[int], batch: int = 256, prior: str | None = None,
             sampler: str = SAMPLER, steps: int = STEPS, cfg: float = CFG) -> dict[str, torch.Tensor]:
    """{prompt: images for the seeds}, sampled in batches of up to ``batch`` images in one process, each
    prompt given to the model as ``ddpm txt2img --prior PRIOR`` gives it (None: the model's default)."""
    from ddpm_cli.engine.models.captions import prompt_captions
    from ddpm_cli.engine.models.pipeline import Condition, load_pipeline
    from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch

    pipeline = load_pipeline(model, device="cpu")
    drawn = {p: caption for p, (caption, _) in prompt_captions(pipeline, prompts, prior).items()}
    jobs = [(drawn[p], s) for p in prompts for s in seeds]
    classes = pipeline.class_list if pipeline.class_prompted else None
    images = []
    for start in range(0, len(jobs), batch):
        part = jobs[start:start + batch]
        condition = (Condition(prompt=[p for p, _ in part]) if classes is None
                     else Condition(class_label=[classes.index(p) for p, _ in part]))  # a class model: the nearest class
        images.append(sample_batch(pipeline, [s for _, s in part], SamplerSettings(sampler, steps),
                                   condition=condition, cfg=cfg))
    flat = torch.cat(images)
    return {p: flat[i * len(seeds):(i + 1) * len(seeds)] for i, p in enumerate(prompts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default="emoji")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--prompts", nargs="*", help="a subset of the held-out prompts")
    parser.add_argument("--grid", help="save a grid PNG: one row per prompt, one column per seed")
    parser.add_argument("--prior", choices=("nearest", "none"), help="as txt2img --prior [default: the model's]")
    parser.add_argument("--sampler", default=SAMPLER)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--cfg", type=float, default=CFG)
    args = parser.parse_args()
    prompts = heldout_prompts()
    chosen = args.prompts or list(prompts)
    generated = generate(args.model, chosen, list(range(args.seeds)), prior=args.prior, sampler=args.sampler,
                         steps=args.steps, cfg=args.cfg)
    references, code_points = training_emoji()
    result = score(generated, references, code_points, prompts)
    for prompt, (h1, h5, nearest) in result.per_prompt.items():
        print(f"{prompt:24s} top-1 {h1}/{args.seeds} top-5 {h5}/{args.seeds}  nearest: {' '.join(nearest)}")
    print(f"{args.model}: {len(chosen)} prompts x {args.seeds} seeds: {result}")
    if args.grid:
        from ddpm_cli.engine.io.images import make_grid, save_png

        rows = torch.cat([generated[p] for p in chosen])
        save_png(make_grid(rows, nrow=args.seeds), args.grid, overwrite=True)
        print("grid:", args.grid)


if __name__ == "__main__":
    main()
