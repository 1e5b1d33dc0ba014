"""Fingerprints that let an image name exactly what made it: the SHA-256 of a model's U-Net weights
(hashed once per file, then cached), of input files, and the Hub commit a model folder came from.

The weights' hash is cached in ``$XDG_CACHE_HOME/ddpm-cli/sha256/`` (default ``~/.cache``), one small
file per weights file, keyed by the file's real path, size and modification time (ns): a model is
read in full once, and again only when its weights change. A cache that cannot be written is skipped.
Imports no torch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ddpm_cli.engine.errors import InputError
from ddpm_cli.engine.models.safety import WEIGHT_SUFFIXES

CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a file's bytes, read in chunks; InputError when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                digest.update(block)
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm-cli" / "sha256"


def cached_sha256(path: str | os.PathLike) -> str:
    """file_sha256 of ``path``, from the cache when the file's (real path, size, mtime) is known there."""
    from ddpm_cli.engine.io.atomic import atomic_output

    real = Path(path).resolve()
    stat = real.stat()
    key = hashlib.sha256(f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    entry = cache_dir() / f"{key}.txt"
    try:
        known = entry.read_text().strip()
        if len(known) == 64:
            return known
    except OSError:
        pass
    value = file_sha256(real)
    try:
        with atomic_output(entry, overwrite=True) as tmp:
            Path(tmp).write_text(value + "\n")
    except (OSError, InputError):
        pass  # a read-only or full cache costs a re-hash next time, nothing else
    return value


def weights_files(folder: str | os.PathLike) -> list[Path]:
    """The U-Net's weights files of a model folder: those in ``unet/``, or at the top of a flat folder."""
    folder = Path(folder)
    home = folder / "unet" if (folder / "unet").is_dir() else folder
    return sorted(p for p in home.iterdir() if p.is_file() and p.name.lower().endswith(WEIGHT_SUFFIXES))


def weights_sha256(folder: str | os.PathLike) -> str | None:
    """The SHA-256 of a model's U-Net weights: the file's own hash (as ``sha256sum`` prints it) when
    there is one file; for sharded weights, the hash of the lines "NAME HASH" of every file, sorted.
    None when the folder holds no weights file."""
    files = weights_files(folder)
    if not files:
        return None
    if len(files) == 1:
        return cached_sha256(files[0])
    lines = "".join(f"{p.name} {cached_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def hub_commit(folder: str | os.PathLike) -> str | None:
    """The commit hash of a Hugging Face cache snapshot folder (``.../snapshots/<commit>``), else None."""
    folder = Path(folder)
    if folder.parent.name == "snapshots" and len(folder.name) == 40:
        return folder.name
    return None
