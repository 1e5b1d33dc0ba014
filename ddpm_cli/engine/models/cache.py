"""Networks kept loaded by a warm worker (``ddpm serve``), for the calls it forks.

The worker loads a network once (``fill``: weights only, no computation) and every call forked after that
finds it in memory: ``load`` hands the worker's copy to the first load with the same arguments in a call,
as long as the files it came from have the same sizes and modification times (changed files on disk are
read again). A forked call owns its memory copy-on-write, so it may change what it was handed (LoRA, moving
it to a GPU) without the worker or other calls seeing it; a second load in the same call reads the files.
Outside a worker's calls ``load`` just runs the loader.

What a load printed on stderr or warned about in the worker is repeated in the call that takes it, so a
warm call's output equals a cold one's.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_loaders: dict[str, Callable] = {}
_entries: OrderedDict[str, _Entry] = OrderedDict()
_report: Callable[[dict], None] | None = None  # set in a worker's call: tells the worker what it loaded
_shown: dict = {}  # the warnings registry of the replays in this process
capacity = 3


@dataclass
class _Entry:
    value: object
    stamp: tuple
    kind: str
    args: dict
    stderr: bytes = b""
    warnings: list = field(default_factory=list)


def register(kind: str, loader: Callable) -> None:
    """Name a loader; ``load(kind, files, **args)`` calls ``loader(**args)`` with JSON-able args."""
    _loaders[kind] = loader


def stamp(files: str | os.PathLike) -> tuple:
    """(name, size, mtime) of the files directly in a folder: a network's config and weights."""
    rows = []
    try:
        with os.scandir(files) as entries:
            for entry in entries:
                if entry.is_file():
                    info = entry.stat()
                    rows.append((entry.name, info.st_size, info.st_mtime_ns))
    except OSError:
        return ()
    return tuple(sorted(rows))


def _key(kind: str, args: dict) -> str:
    return json.dumps([kind, args], sort_keys=True)


def load(kind: str, files: str | os.PathLike, **args):
    """``loader(**args)``, or in a worker's call the worker's copy loaded while ``files`` were as now."""
    if _report is None:
        return _loaders[kind](**args)
    key = _key(kind, args)
    entry = _entries.pop(key, None)
    if entry is not None and entry.stamp == stamp(files) and entry.stamp:
        _replay(entry)
        _report({"used": key})
        return entry.value
    value = _loaders[kind](**args)
    _report({"kind": kind, "files": str(files), "args": args})
    return value


def _replay(entry: _Entry) -> None:
    if entry.stderr:
        sys.stderr.flush()
        os.write(2, entry.stderr)
    for caught in entry.warnings:
        warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno, registry=_shown)


def start_call(report: Callable[[dict], None]) -> None:
    """In a call forked from the worker: take from the worker's copies and report what was loaded."""
    global _report
    _report = report
    _shown.clear()


def fill(kind: str, files: str, args: dict) -> bool:
    """In the worker: load a network a call asked for, keeping at most ``capacity`` (least recently used out);
    False when the same files are kept already."""
    key = _key(kind, args)
    current = stamp(files)
    if key in _entries and _entries[key].stamp == current:
        _entries.move_to_end(key)
        return False
    _entries.pop(key, None)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        os.dup2(captured.fileno(), 2)
        try:
            value = _loaders[kind](**args)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read()
    _entries[key] = _Entry(value, current, kind, args, text, list(caught))
    while len(_entries) > capacity:
        _entries.popitem(last=False)
    return True


def used(key: str) -> None:
    """In the worker: a call took this copy; it is the most recently used."""
    if key in _entries:
        _entries.move_to_end(key)


def describe() -> list[str]:
    """The kept networks, least recently used first."""
    return [f"{entry.kind} {entry.args.get('folder', '')}"
            + (f"/{entry.args['subfolder']}" if entry.args.get("subfolder") else "") for entry in _entries.values()]


def folder_of(path: str | os.PathLike, subfolder: str | None) -> Path:
    return Path(path) / subfolder if subfolder else Path(path)
