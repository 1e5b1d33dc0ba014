"""Animated GIF and WebP files from a sequence of frames, written through ``atomic.atomic_output``."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from ddpm_cli.engine.io.atomic import atomic_output

ANIMATION_FORMATS = ("gif", "webp")


def save_animation(frames: list[Image.Image], path: str | os.PathLike, seconds_per_frame: float = 0.15,
                   overwrite: bool = False) -> Path:
    """Write ``frames`` as an endlessly looping animation, GIF or (lossless) WebP by ``path``'s suffix."""
    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    if kind not in ANIMATION_FORMATS:
        raise ValueError(f"an animation is one of {', '.join(ANIMATION_FORMATS)}, not {path.suffix!r}")
    first, *rest = frames
    options = {"lossless": True} if kind == "webp" else {"optimize": False, "disposal": 1}
    with atomic_output(path, overwrite) as tmp:
        first.save(tmp, format=kind.upper(), save_all=True, append_images=rest, loop=0,
                   duration=round(seconds_per_frame * 1000), **options)
    return path
