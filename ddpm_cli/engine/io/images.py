"""Image input and output: safe loading, tensor conversion, grids, and atomic PNG writing.

Loading refuses decompression bombs before decoding, applies EXIF orientation, rescales
16-bit greyscale, and flattens transparency onto a background colour. Saving writes PNGs
atomically (temporary file, fsync, rename) with the generation parameters embedded both as
the Automatic1111-style "parameters" text and as a "ddpm" JSON chunk.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from ddpm_cli.engine.io.atomic import atomic_output
from ddpm_cli.engine.errors import InputError, NumericalError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # 64 megapixels

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


# --------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _read_errors(path: Path):
    """Map whatever reading an image file raises to one InputError naming the file."""
    try:
        yield
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(
            f"{path}: image too large, refused as a possible decompression bomb ({e}); "
            "downscale it first"
        ) from e
    except FileNotFoundError as e:
        raise InputError(f"{path}: image file not found; check the path") from e
    except IsADirectoryError as e:
        raise InputError(f"{path}: is a folder, not an image file; pass an image file") from e
    except PermissionError as e:
        raise InputError(f"{path}: permission denied reading the image; check its permissions") from e
    except (OSError, ValueError, SyntaxError, EOFError, IndexError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(
            f"{path}: cannot read image ({reason}); the file is corrupt, truncated or not an "
            "image - re-export or remove it"
        ) from e


@contextlib.contextmanager
def _open_checked(path: Path, max_pixels: int):
    """Open lazily (header only) and refuse images above ``max_pixels`` before any decoding."""
    with warnings.catch_warnings():
        # Our own header check is the authority; Pillow's warning would only leak to stderr.
        # Pillow's DecompressionBombError (twice its limit) is still mapped by _read_errors.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise InputError(
                    f"{path}: image is {width}x{height} = {width * height} pixels, above the "
                    f"limit of {max_pixels} (possible decompression bomb); downscale it first"
                )
            yield img


def probe_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header alone, with load_image's checks and errors; decodes nothing."""
    path = Path(path)
    with _read_errors(path), _open_checked(path, max_pixels) as img:
        return img.size


def load_image(
    path: str | os.PathLike,
    mode: str = "RGB",
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Load an image file safely and return it fully decoded in ``mode`` ("RGB" or "L").

    - The pixel count is read from the header before decoding; above ``max_pixels`` the file
      is refused as a possible decompression bomb. Pillow's own bomb limit
      (``Image.MAX_IMAGE_PIXELS``, twice which it raises an error) still applies on top.
    - EXIF orientation is applied, so width and height may swap.
    - 16-bit greyscale is rescaled by its full 16-bit range (value / 257), never clipped.
    - Palette images go through RGBA; any transparency (alpha channel, palette or tRNS
      transparency) is composited onto the opaque ``background`` colour (default white).
    - CMYK and other colour spaces are converted to RGB by Pillow.

    Raises InputError (naming the file) when it is missing, unreadable, truncated, not an
    image, too large, or in a colour mode that cannot be converted.
    """
    if mode not in ("RGB", "L"):
        raise InputError(f"unsupported image mode {mode!r}; use 'RGB' or 'L'")
    path = Path(path)
    with _read_errors(path), _open_checked(path, max_pixels) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        img.load()
    try:
        return _to_mode(img, mode, background)
    except (ValueError, OSError) as e:
        raise InputError(
            f"{path}: cannot convert colour mode {img.mode!r} to {mode} ({e}); "
            "re-export it as RGB"
        ) from e


def _to_mode(img: Image.Image, mode: str, background: tuple[int, int, int]) -> Image.Image:
    """Convert a decoded image to ``mode``, rescaling 16-bit data and flattening alpha."""
    if img.mode in _SIXTEEN_BIT_MODES:
        data = np.asarray(img).astype(np.float64)
        data = np.clip(np.floor(data / 257.0 + 0.5), 0, 255).astype(np.uint8)
        img = Image.fromarray(data, mode="L")
    if img.mode == "P" or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        img = Image.alpha_composite(canvas, rgba).convert("RGB")
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")  # CMYK, YCbCr, 1, F, ...
    if img.mode != mode:
        img = img.convert(mode)
    img.load()
    return img


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Return every image file under ``folder`` (recursive, sorted), by extension.

    Extensions are matched case-insensitively against IMAGE_EXTENSIONS; hidden files and
    hidden folders (names starting with ".") are skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: image folder not found or not a folder; check the path")
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(root) / name)
    return sorted(found)


# --------------------------------------------------------------------------- tensors


def tensor_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map a float tensor in [-1, 1] (any shape, e.g. B×C×H×W) to uint8 on the CPU.

    Computes round((x + 1) / 2 * 255) clamped to [0, 255]. Raises NumericalError on
    non-finite values, which have no meaningful pixel value.
    """
    x = x.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(x).all():
        raise NumericalError("image tensor contains NaN or infinite values; the sampler diverged")
    return ((x + 1.0) / 2.0 * 255.0).round().clamp(0, 255).to(torch.uint8)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """Convert one C×H×W tensor in [-1, 1] to a PIL image (C=1 → "L", C=3 → "RGB")."""
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected a C×H×W tensor with C in (1, 3), got shape {tuple(x.shape)}")
    array = tensor_to_uint8(x).permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        return Image.fromarray(array[:, :, 0], mode="L")
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert a PIL image to a float32 C×H×W tensor in [-1, 1] ("L" → C=1, else RGB, C=3)."""
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    array = np.array(img, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 255.0 * 2.0 - 1.0


def make_grid(
    images: list[Image.Image] | torch.Tensor, nrow: int | None = None, padding: int = 2
) -> Image.Image:
    """Tile images into one picture, ``nrow`` images per row (default ceil(sqrt(n))).

    ``images`` is a list of PIL images or a B×C×H×W tensor in [-1, 1]. Tiles are separated
    by ``padding`` black pixels (between tiles only, no outer border); each cell is as large
    as the largest image. The grid is "L" when every image is, else "RGB".
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"expected a B×C×H×W tensor, got shape {tuple(images.shape)}")
        images = [tensor_to_pil(x) for x in images]
    if not images:
        raise ValueError("make_grid needs at least one image")
    n = len(images)
    ncol = max(1, min(nrow or math.ceil(math.sqrt(n)), n))
    nrows = math.ceil(n / ncol)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    mode = "L" if all(im.mode == "L" for im in images) else "RGB"
    grid = Image.new(mode, (ncol * cell_w + (ncol - 1) * padding, nrows * cell_h + (nrows - 1) * padding))
    for i, im in enumerate(images):
        row, col = divmod(i, ncol)
        grid.paste(im.convert(mode), (col * (cell_w + padding), row * (cell_h + padding)))
    return grid


# --------------------------------------------------------------------------- PNG output


def format_parameters(params: dict) -> str:
    """Format generation parameters as the Automatic1111-style "parameters" text.

    Line 1 is the "prompt" (if present), line 2 "Negative prompt: ..." (key
    "negative_prompt", if present), then one line such as
    ``Steps: 50, Sampler: ddim, Seed: 42, Size: 32x32`` from the remaining keys in dict
    order: underscores become spaces and the first letter is capitalised ("model_hash" →
    "Model hash"); list/tuple values are joined with "x"; None values are skipped; values
    containing "," ":" or a newline are JSON-quoted so the line stays parseable.
    """
    lines = []
    if params.get("prompt") is not None:
        lines.append(str(params["prompt"]))
    if params.get("negative_prompt") is not None:
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    fields = []
    for key, value in params.items():
        if key in ("prompt", "negative_prompt") or value is None:
            continue
        name = str(key).replace("_", " ").strip()
        name = name[:1].upper() + name[1:]
        if isinstance(value, (list, tuple)):
            text = "x".join(str(v) for v in value)
        else:
            text = str(value)
        if any(c in text for c in ",:\n"):
            text = json.dumps(text)
        fields.append(f"{name}: {text}")
    if fields:
        lines.append(", ".join(fields))
    return "\n".join(lines)


def save_png(
    image: Image.Image,
    path: str | os.PathLike,
    params: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``image`` as a PNG at ``path`` atomically and return the path.

    With ``params``, embeds text chunks "parameters" (format_parameters) and "ddpm"
    (``json.dumps(params, sort_keys=True)``). Written through ``atomic.atomic_output``: readers
    never see a half-written file, the file gets the umask's ordinary permissions, and without
    ``overwrite`` an existing file is never replaced, even one another process created meanwhile.

    Raises OutputExistsError (an InputError) if the target exists and ``overwrite`` is False,
    InputError if it cannot be written, ResourceError when the disk is full or over quota.
    """
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    if params is not None:
        info.add_text("parameters", format_parameters(params))  # falls back to iTXt if not latin-1
        info.add_text("ddpm", json.dumps(params, sort_keys=True, default=str))
    with atomic_output(path, overwrite) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_png_metadata(path: str | os.PathLike) -> dict:
    """Return the parsed "ddpm" JSON chunk of a PNG written by save_png, or {} if absent."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            text = getattr(img, "text", None) or img.info
            raw = text.get("ddpm")
    except FileNotFoundError as e:
        raise InputError(f"{path}: image file not found; check the path") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{path}: cannot read PNG metadata ({e}); the file is corrupt or not a PNG") from e
    if raw is None:
        return {}
    try:
        return json.loads(raw)
    except ValueError as e:
        raise InputError(f"{path}: the 'ddpm' metadata chunk is not valid JSON; re-save the image") from e
