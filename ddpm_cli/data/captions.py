"""Captions for training images: caption files beside a folder's images, and the built-in ``emoji`` set.

A folder is captioned by a ``metadata.jsonl`` in its root (one JSON object per line with
``"file_name"``, a path relative to the root as in Hugging Face ImageFolder, and ``"text"``) or,
for an image without an entry there, by a ``.txt`` file with the image's stem beside it
(``cat.png`` + ``cat.txt``). Either every image has a caption or none has.

The ``emoji`` set renders the single-code-point emoji of the Noto Color Emoji font (Debian
package fonts-noto-color-emoji), captioned with their lower-case Unicode names ("cat face"). For
training each emoji also has several alternative captions (:func:`emoji_caption_choices`): its
English name and keywords from Unicode CLDR's emoji annotations (Debian package unicode-cldr-core:
"cat", "pet" for the cat face), each in a few wordings ("an emoji of cat"); without that package
the Unicode name alone, in the same wordings.
Rendering takes about a second, so the 64×64 images (or larger, for resolutions above 64) are
cached under ``$XDG_CACHE_HOME/ddpm-cli`` (default ``~/.cache/ddpm-cli``).
"""

from __future__ import annotations

import json
import os
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import torch

from ddpm_cli.engine.errors import DdpmError, InputError
from ddpm_cli.engine.io.atomic import atomic_output

METADATA_FILE = "metadata.jsonl"
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_FONT_SIZE = 109  # the only size of the font's colour bitmaps (136×128 px)
EMOJI_BLOCKS = ((0x2600, 0x27BF), (0x1F300, 0x1FAFF))  # inclusive code point ranges
EMOJI_CACHE_SIZE = 64
CLDR_ANNOTATIONS = Path("/usr/share/unicode/cldr/common/annotations")
CLDR_LABELS = Path("/usr/share/unicode/cldr/common/properties/labels.txt")
# The ``emoji-everyday`` set: the emoji of these CLDR groups and subgroups (labels.txt), everyday
# things a short prompt names (animals, plants, food, faces, hearts, weather), ~390 of the ~1,280.
EVERYDAY_GROUPS = ("Animals & Nature", "Food & Drink")
EVERYDAY_SUBGROUPS = ("face-positive", "face-neutral", "face-negative", "face-sick", "face-role", "face-fantasy",
                      "cat-face", "monkey-face", "emotion", "sky & weather")
# Wordings of a training caption; none is "a {}", so "a cat" stays a held-out prompt (tests/heldout_prompts.tsv)
EMOJI_CAPTION_TEMPLATES = ("{}", "an emoji of {}", "a picture of {}", "{} emoji", "an icon of {}")
KEYWORD_LIMIT = 24  # a CLDR keyword shared by more training emoji than this ("face", "man") is too vague to caption one
EMOJI_MIN_RESOLUTION = 16
_CACHE_FORMAT = 1


# ---------------------------------------------------------------- folders


def read_metadata(root: str | os.PathLike) -> dict[Path, tuple[str, int]]:
    """Captions from ``root/metadata.jsonl`` as {normalised image path: (text, line number)}; {} if absent."""
    path = Path(root) / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc}); check its permissions") from None
    entries: dict[Path, tuple[str, int]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{where}: invalid JSON ({exc.msg}); write one JSON object per line") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) \
                or not isinstance(entry.get("text"), str):
            raise InputError(f'{where}: needs an object with string "file_name" and "text", '
                             'e.g. {"file_name": "cat.png", "text": "a cat"}')
        key = Path(os.path.normpath(Path(root) / entry["file_name"]))
        if key in entries:
            raise InputError(f"{where}: second entry for {entry['file_name']!r} (first on line "
                             f"{entries[key][1]}); keep one caption per image")
        entries[key] = (entry["text"], number)
    return entries


def _read_sidecar(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        raise InputError(f"{path}: caption file is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read caption ({exc.strerror or exc}); check its permissions") from None


def folder_captions(root: str | os.PathLike, paths: list[Path]) -> list[str] | None:
    """One caption per image in ``paths`` (files under ``root``), or None when no image has one.

    ``metadata.jsonl`` entries come first, then ``<stem>.txt`` beside the image (stripped).
    Raises InputError when only some images are captioned, on a bad ``metadata.jsonl`` line,
    or for an entry naming a file that is not one of the images.
    """
    root = Path(root)
    metadata = read_metadata(root)
    images = {Path(os.path.normpath(p)) for p in paths}
    for key, (_, number) in metadata.items():
        if key not in images:
            problem = "names a file that is not an image (.png .jpg .jpeg .webp .bmp)" if key.exists() \
                else "names a file that does not exist"
            raise InputError(f"{root / METADATA_FILE} line {number}: {key} {problem}; "
                             "fix the file_name or remove the line")
    captions: list[str | None] = []
    for p in paths:
        entry = metadata.get(Path(os.path.normpath(p)))
        sidecar = p.with_suffix(".txt")
        captions.append(entry[0] if entry else _read_sidecar(sidecar) if sidecar.is_file() else None)
    missing = [p for p, c in zip(paths, captions) if c is None]
    if len(missing) == len(paths):
        return None
    if missing:
        p = missing[0]
        raise InputError(f"{p}: has no caption ({METADATA_FILE} entry or {p.stem}.txt), while "
                         f"{len(paths) - len(missing)} of {len(paths)} images have one; caption every image or none")
    return captions  # type: ignore[return-value]  # no None left


# ---------------------------------------------------------------- emoji


def emoji_cache_path(size: int = EMOJI_CACHE_SIZE, font: str | os.PathLike = EMOJI_FONT) -> Path:
    """Cache file of the rendered emoji: ``$XDG_CACHE_HOME/ddpm-cli/emoji-<fontsize>-<font bytes>-<size>.npz``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddpm-cli" / f"emoji-{EMOJI_FONT_SIZE}-{os.path.getsize(font)}-{size}.npz"


def render_emoji(size: int = EMOJI_CACHE_SIZE, font: str | os.PathLike = EMOJI_FONT) -> tuple[np.ndarray, list[str]]:
    """Render every named single-code-point emoji in ``EMOJI_BLOCKS`` that the font draws.

    Each glyph is cropped to its alpha bounding box, padded to a centred square, composited on
    white and resized to ``size`` (Lanczos). Returns (uint8 N×3×size×size, captions), in code
    point order; a caption is the lower-case Unicode name ("cat face"). Code points the font lacks draw nothing (its notdef glyph is empty).
    """
    from PIL import Image, ImageDraw, ImageFont

    face = ImageFont.truetype(str(font), EMOJI_FONT_SIZE)
    images, captions = [], []
    for first, last in EMOJI_BLOCKS:
        for code in range(first, last + 1):
            ch = chr(code)
            if unicodedata.name(ch, None) is None:
                continue
            canvas = Image.new("RGBA", (192, 160), (0, 0, 0, 0))  # the bitmaps are 136×128
            ImageDraw.Draw(canvas).text((0, 0), ch, font=face, embedded_color=True)
            box = canvas.getchannel("A").getbbox()
            if box is None:
                continue
            glyph = canvas.crop(box)
            side = max(glyph.size)
            square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
            square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
            square = square.convert("RGB").resize((size, size), Image.LANCZOS)
            images.append(np.asarray(square).transpose(2, 0, 1))
            captions.append(unicodedata.name(ch).lower())
    return np.ascontiguousarray(np.stack(images)), captions


def _read_cache(path: Path) -> tuple[np.ndarray, list[str]] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if int(npz["format"]) != _CACHE_FORMAT:
                return None
            images, captions = npz["images"], npz["captions"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # missing, unreadable or corrupt: render again
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3 or len(captions) != len(images) \
            or captions.dtype.kind != "U":
        return None
    return images, captions.tolist()


def _write_cache(path: Path, images: np.ndarray, captions: list[str]) -> None:
    """Write the cache atomically (see ``atomic.atomic_output``); a cache that cannot be written is skipped."""
    try:
        with atomic_output(path, overwrite=True) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, format=np.int64(_CACHE_FORMAT), images=images, captions=np.asarray(captions, dtype=str))
    except DdpmError:
        pass


def emoji_images(size: int = EMOJI_CACHE_SIZE, font: str | os.PathLike = EMOJI_FONT) -> tuple[np.ndarray, list[str]]:
    """The emoji at size×size (uint8 N×3×size×size) and their captions, from the cache or rendered and cached."""
    if not Path(font).is_file():
        raise InputError("the emoji data set needs the Debian package fonts-noto-color-emoji "
                         "(apt-get install -y fonts-noto-color-emoji)")
    path = emoji_cache_path(size, font)
    cached = _read_cache(path)
    if cached is not None and cached[0].shape[-1] == size:
        return cached
    images, captions = render_emoji(size, font)
    _write_cache(path, images, captions)
    return images, captions


def load_emoji(resolution: int, channels: int = 3,
               font: str | os.PathLike = EMOJI_FONT) -> tuple[torch.Tensor, list[str]]:
    """The emoji as uint8 N×C×R×R (C = 3, or 1 for greyscale) and their captions.

    Up to 64, resized from the cached 64×64 images (bicubic, antialiased); above 64 rendered
    and cached at the resolution itself. Captions are the lower-case Unicode names ("cat face").
    """
    if resolution < EMOJI_MIN_RESOLUTION:
        raise InputError(f"the emoji data set needs --resolution {EMOJI_MIN_RESOLUTION} or more, got {resolution}")
    images, captions = emoji_images(max(EMOJI_CACHE_SIZE, resolution), font)
    tensor = torch.from_numpy(images)
    if resolution != images.shape[-1]:
        y = torch.nn.functional.interpolate(tensor.float(), size=(resolution, resolution), mode="bicubic",
                                            align_corners=False, antialias=True)
        tensor = y.round_().clamp_(0, 255).to(torch.uint8)
    if channels == 1:  # Pillow's "L" conversion: ITU-R 601-2 luma, in the same fixed point
        weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32).view(1, 3, 1, 1)
        tensor = (((tensor.to(torch.int32) * weights).sum(1, keepdim=True) + 0x8000) >> 16).to(torch.uint8)
    return tensor.contiguous(), captions


def cldr_labels(path: str | os.PathLike = CLDR_LABELS) -> dict[str, tuple[str, str]]:
    """CLDR's emoji labels: {single-code-point emoji: (group, subgroup)}, e.g. "🐱": ("Smileys & People",
    "cat-face"); {} when the file is absent (the Debian package unicode-cldr-core is not installed).
    A line is ``[set] ; group ; subgroup`` where the set lists characters and ranges (a-b); multi-code-point
    sequences in braces are skipped."""
    import re

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    labels: dict[str, tuple[str, str]] = {}
    for line in lines:
        parts = [part.strip() for part in line.split(";")]
        if line.startswith("#") or len(parts) != 3 or not parts[0].startswith("["):
            continue
        chars = list(re.sub(r"\{[^}]*\}", "", parts[0][1:-1]).replace(" ", ""))
        i = 0
        while i < len(chars):
            if i + 2 < len(chars) and chars[i + 1] == "-":
                labels.update((chr(c), (parts[1], parts[2])) for c in range(ord(chars[i]), ord(chars[i + 2]) + 1))
                i += 3
            else:
                labels[chars[i]] = (parts[1], parts[2])
                i += 1
    return labels


def everyday_emoji(names: list[str], labels: dict[str, tuple[str, str]] | None = None) -> list[int]:
    """Indices of the emoji (given by Unicode name) in the ``emoji-everyday`` set: those whose CLDR group is
    one of EVERYDAY_GROUPS or whose subgroup is one of EVERYDAY_SUBGROUPS."""
    labels = cldr_labels() if labels is None else labels
    if not labels:
        raise InputError("the emoji-everyday data set needs the Debian package unicode-cldr-core "
                         "(apt-get install -y unicode-cldr-core)")
    chosen = []
    for i, name in enumerate(names):
        group, subgroup = labels.get(unicodedata.lookup(name), ("", ""))
        if group in EVERYDAY_GROUPS or subgroup in EVERYDAY_SUBGROUPS:
            chosen.append(i)
    return chosen


def cldr_annotations(language: str = "en", folder: str | os.PathLike = CLDR_ANNOTATIONS) -> dict[str, tuple[str | None, list[str]]]:
    """CLDR's emoji annotations in ``language``: {emoji: (its short name or None, its keywords)}; {} when
    the file is absent or unreadable (the Debian package unicode-cldr-core is not installed)."""
    from xml.etree import ElementTree

    try:
        root = ElementTree.parse(Path(folder) / f"{language}.xml").getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    names: dict[str, str] = {}
    keywords: dict[str, list[str]] = {}
    for node in root.iter("annotation"):
        emoji, text = node.get("cp"), (node.text or "").strip()
        if not emoji or not text:
            continue
        if node.get("type") == "tts":
            names[emoji] = text
        else:
            keywords[emoji] = [k.strip() for k in text.split("|") if k.strip()]
    return {e: (names.get(e), keywords.get(e, [])) for e in set(names) | set(keywords)}


def emoji_caption_phrases(names: list[str], annotations: dict[str, tuple[str | None, list[str]]] | None = None,
                          keyword_limit: int = KEYWORD_LIMIT) -> list[list[str]]:
    """Per emoji (given by lower-case Unicode name), the phrases that may caption it, lower-case and distinct:
    the Unicode name first, then CLDR's short name and the keywords that caption at most ``keyword_limit``
    of these emoji. Without annotations (``cldr_annotations()`` by default) each has its Unicode name only."""
    annotations = cldr_annotations() if annotations is None else annotations
    found = [annotations.get(unicodedata.lookup(name), (None, [])) for name in names]
    uses: dict[str, int] = {}
    for _, keywords in found:
        for k in {k.lower() for k in keywords}:
            uses[k] = uses.get(k, 0) + 1
    phrases = []
    for name, (short, keywords) in zip(names, found):
        mine = [name] + ([short.lower()] if short else []) + [k.lower() for k in keywords if uses[k.lower()] <= keyword_limit]
        phrases.append(list(dict.fromkeys(mine)))
    return phrases


def emoji_caption_choices(names: list[str], templates: tuple[str, ...] = EMOJI_CAPTION_TEMPLATES,
                          annotations: dict[str, tuple[str | None, list[str]]] | None = None) -> list[list[str]]:
    """Per emoji, its alternative training captions: every phrase (:func:`emoji_caption_phrases`) in every
    wording of ``templates``, phrase by phrase, so that a uniform draw picks phrase and wording uniformly."""
    return [[t.format(p) for p in phrases for t in templates] for phrases in emoji_caption_phrases(names, annotations)]
