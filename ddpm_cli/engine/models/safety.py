"""Checks that run before any weights load: by content, never by extension.

Pickle files (torch.save, .bin/.ckpt/.pt) are refused unless the user passes --allow-pickle, since
unpickling can run arbitrary code; safetensors headers and sizes are validated so that truncated or
corrupt files fail with a clear message; folders that ship Python code are refused.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from ddpm_cli.engine.errors import ModelError
from ddpm_cli.engine.models.resolve import read_json

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".pkl")
TRUSTED_LIBRARIES = ("diffusers", "transformers")

_MAX_HEADER = 100 * 1024 * 1024  # safetensors itself refuses headers above 100 MB
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
    "C64": 8,
}


def _corrupt(path: Path, reason: str) -> ModelError:
    return ModelError(f"{path} is truncated or corrupt ({reason}); re-download or re-export it")


def _pickle_refused(path: Path) -> ModelError:
    return ModelError(
        f"{path} is a pickle checkpoint, which can run code when loaded; refused. "
        "Convert it to safetensors, or pass --allow-pickle if you trust its source"
    )


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file: u64 header length, then a JSON object starting with '{'."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _looks_like_pickle(head: bytes) -> bool:
    if head.startswith(b"PK\x03\x04"):  # torch.save zip archive (holds data.pkl)
        return True
    return head[:1] == b"\x80" and len(head) > 1 and 1 <= head[1] <= 5  # PROTO opcode


def _read_header(path: Path, size: int) -> tuple[dict, int, str | None]:
    """(header, its length in bytes, None), or ({}, 0, why it cannot be read) for a file of ``size`` bytes."""
    if size == 0:
        return {}, 0, "empty file"
    if size < 8:
        return {}, 0, f"only {size} bytes, shorter than the 8-byte header length"
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n == 0:
            return {}, 0, "header length is 0"
        if n > _MAX_HEADER:
            return {}, 0, f"header length {n} is implausibly large"
        if 8 + n > size:
            return {}, 0, f"header of {n} bytes runs past the end of the {size}-byte file"
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}, 0, "header is not valid JSON"
    if not isinstance(header, dict):
        return {}, 0, "header is not a JSON object"
    return header, n, None


def safetensors_header(path: Path) -> dict:
    """A safetensors file's header (tensor name -> dtype, shape, offsets), read without loading a tensor;
    {} when the file cannot be read or its header is not whole."""
    try:
        header, _, reason = _read_header(path, path.stat().st_size)
    except OSError:
        return {}
    return header if reason is None else {}


def safetensors_damage(path: Path, size: int | None = None) -> str | None:
    """Why a safetensors file is truncated or corrupt, read from its header and size alone (no
    tensor is loaded), or None when it is whole. Each tensor's bytes must lie inside the file and
    match its shape and dtype. Damage inside the data that keeps the size is not seen."""
    size = path.stat().st_size if size is None else size
    header, n, reason = _read_header(path, size)
    if reason is not None:
        return reason
    data_size, end = size - 8 - n, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            return f"tensor {name!r} has no description"
        offsets, shape, dtype = info.get("data_offsets"), info.get("shape"), info.get("dtype")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in offsets)
            or offsets[0] > offsets[1]
        ):
            return f"tensor {name!r} has bad data_offsets"
        if offsets[1] > data_size:
            return f"tensor {name!r} ends at byte {offsets[1]} but only {data_size} data bytes exist"
        if isinstance(shape, list) and all(isinstance(v, int) and v >= 0 for v in shape) and dtype in _DTYPE_BYTES:
            expected = math.prod(shape) * _DTYPE_BYTES[dtype]
            if expected != offsets[1] - offsets[0]:
                return f"tensor {name!r} should take {expected} bytes, not {offsets[1] - offsets[0]}"
        end = max(end, offsets[1])
    if end != data_size:
        return f"{data_size - end} bytes after the last tensor: the header does not cover the file"
    return None


def _validate_safetensors(path: Path, size: int) -> None:
    reason = safetensors_damage(path, size)
    if reason is not None:
        raise _corrupt(path, reason)


def _check_no_code(folder: Path) -> None:
    index = folder / "model_index.json"
    if index.is_file():
        for key, value in read_json(index).items():
            if key.startswith("_") or not isinstance(value, (list, tuple)) or not value:
                continue
            library = value[0]
            if library is not None and library not in TRUSTED_LIBRARIES:
                raise ModelError(
                    f"{folder} ships its own code, which ddpm never runs (component {key!r} comes from "
                    f"{library!r}); use a model built only from diffusers/transformers classes"
                )
    for path in _walk(folder):
        if path.suffix == ".py":
            raise ModelError(
                f"{folder} ships its own code, which ddpm never runs ({path.relative_to(folder)}); "
                "use a model built only from diffusers/transformers classes"
            )


def _walk(folder: Path):
    """Files under folder, skipping hidden folders (such as .cache from the Hub)."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            yield Path(root) / name


def check_weights(folder: Path, allow_pickle: bool = False) -> None:
    """Refuse pickle weights (unless allowed), corrupt safetensors and folders shipping code.

    The format is read from each file's first bytes, never from its extension, and no
    file is unpickled here.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a folder; pass a diffusers model folder")
    _check_no_code(folder)
    for path in _walk(folder):
        if not path.name.lower().endswith(WEIGHT_SUFFIXES):
            continue
        try:
            size = path.stat().st_size
            with path.open("rb") as fh:
                head = fh.read(16)
        except OSError as exc:
            raise ModelError(f"{path} cannot be read ({exc.strerror or exc}); re-download it") from None
        if _looks_like_safetensors(head, size):
            _validate_safetensors(path, size)
        elif _looks_like_pickle(head):
            if not allow_pickle:
                raise _pickle_refused(path)
        elif path.name.lower().endswith(".safetensors"):
            _validate_safetensors(path, size)  # raises with the precise reason
            raise _corrupt(path, "not in safetensors format")
        elif size == 0:
            raise _corrupt(path, "empty file")
        elif not allow_pickle:
            # Neither safetensors nor a recognised torch file: a loader would try to unpickle it.
            raise _pickle_refused(path)


