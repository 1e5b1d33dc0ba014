"""What tasks add to sampling, outside the samplers: wrappers around the model and step callbacks.

A sampler sees ``model(x, t)`` and a ``callback(info)`` (see ``samplers.py``). Tasks change those,
not the samplers:

- :func:`with_channels`: image conditioning as extra input channels (super-resolution's upsampled
  or low-resolution image; a Stable Diffusion inpainting U-Net's mask and masked-image latents);
- :func:`chain`: several step callbacks as one (inpainting's known-region replacement, then the
  caller's progress callback, which then sees the replaced x).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Model = Callable[[torch.Tensor, int], torch.Tensor]
StepCallback = Callable[[dict], torch.Tensor | None]


def with_channels(model: Model, extra: torch.Tensor) -> Model:
    """``model`` on x with ``extra`` (R×C'×H×W) appended to its channels; extra's R rows are repeated
    to x's batch of k·R rows (the same images in several blocks), in x's dtype."""

    def run(x: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        rows = extra.to(x.dtype).repeat(x.shape[0] // extra.shape[0], 1, 1, 1)
        return model(torch.cat([x, rows], dim=1), t)

    return run


def chain(*callbacks: StepCallback | None) -> StepCallback | None:
    """One step callback running ``callbacks`` in order (None ones skipped); a tensor one returns
    replaces x for the ones after it and for the sampler."""
    present = [callback for callback in callbacks if callback is not None]
    if len(present) <= 1:
        return present[0] if present else None

    def run(info: dict) -> torch.Tensor | None:
        replaced = None
        for callback in present:
            out = callback(info)
            if out is not None:
                replaced = out
                info = {**info, "x": out}
        return replaced

    return run
