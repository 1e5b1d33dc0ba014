"""The seeds of a generating run, from --seed N|random, -n and --seeds LIST, resolved once.

``--seed N -n K`` is N, N+1, ..., N+K-1 (image i uses seed + i, as always). ``--seed random`` draws
N from the operating system's randomness (``os.urandom``), says it on stderr in one line and lets
each image's metadata record the real seed. ``--seeds 3,17,42`` or ``--seeds 0-3,10`` names every
seed; it replaces --seed and -n, so giving either with it is refused.
"""

from __future__ import annotations

import os

from ddpm_cli.cli.errors import EXIT_USAGE, fail

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed
MAX_SEEDS = 100_000  # more images than this from one option is a typo in a range
RANDOM_BITS = 31  # short enough to read and type back


def parse_seed(text: str, flag: str = "--seed") -> int:
    """One seed: a whole number from 0 to MAX_SEED."""
    try:
        seed = int(text.strip())
    except ValueError:
        raise fail(f"{flag} takes a whole number >= 0 or 'random', got {text!r}", EXIT_USAGE) from None
    if not 0 <= seed <= MAX_SEED:
        raise fail(f"{flag} must be between 0 and {MAX_SEED}, got {seed}", EXIT_USAGE)
    return seed


def parse_seeds(spec: str) -> list[int]:
    """``3,17,42`` or ``0-3,10`` -> [3, 17, 42] or [0, 1, 2, 3, 10], in the order given; refuses an
    empty list, a backward range and a seed listed twice (two images would share a file)."""
    seeds: list[int] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        first, dash, last = item.partition("-")
        if dash and first.strip():
            low, high = parse_seed(first, "--seeds"), parse_seed(last, "--seeds")
            if high < low:
                raise fail(f"--seeds range {item} runs backwards; write {high}-{low}", EXIT_USAGE)
            if high - low >= MAX_SEEDS:
                raise fail(f"--seeds range {item} holds {high - low + 1} seeds; at most {MAX_SEEDS}", EXIT_USAGE)
            seeds.extend(range(low, high + 1))
        else:
            seeds.append(parse_seed(item, "--seeds"))
        if len(seeds) > MAX_SEEDS:
            raise fail(f"--seeds lists more than {MAX_SEEDS} seeds", EXIT_USAGE)
    if not seeds:
        raise fail("--seeds is empty; give seeds such as 3,17,42 or 0-3", EXIT_USAGE)
    repeated = next((seed for k, seed in enumerate(seeds) if seed in seeds[:k]), None)
    if repeated is not None:
        raise fail(f"--seeds lists {repeated} twice; each seed makes one image", EXIT_USAGE)
    return seeds


def random_seed() -> int:
    """A seed from the operating system's randomness."""
    return int.from_bytes(os.urandom(8), "big") >> (64 - RANDOM_BITS)


def resolve_seeds(seed: str | int | None, seed_list: str | None, num_images: int, num_images_given: bool,
                  distributed: bool = False) -> tuple[list[int], bool]:
    """(the run's seeds, whether the first was drawn at random), from --seed, --seeds and -n."""
    if seed_list is not None:
        clash = [flag for flag, set_ in (("--seed", seed is not None), ("-n/--num-images", num_images_given)) if set_]
        if clash:
            raise fail(f"--seeds names every seed; drop {' and '.join(clash)}", EXIT_USAGE)
        return parse_seeds(seed_list), False
    drawn = str(seed).strip().lower() == "random" if seed is not None else False
    if drawn and distributed:
        raise fail("--seed random under torchrun would draw a different seed in each process; give a number",
                   EXIT_USAGE)
    first = random_seed() if drawn else (0 if seed is None else parse_seed(str(seed)))
    if first + num_images - 1 > MAX_SEED:
        raise fail(f"--seed {first} with -n {num_images} runs past the largest seed {MAX_SEED}", EXIT_USAGE)
    return list(range(first, first + num_images)), drawn
