"""What the client and the worker share: the per-user socket folder, the identity of an installation,
and the messages (one JSON object a line; the first one carries the caller's stdin, stdout and stderr).

Standard library only: a warm ``ddpm`` call imports this and ``client`` and nothing else of ours.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import sys

import ddpm_cli

# DDPM_SERVER: off (or unset) runs every call cold; on uses a running worker; auto starts one when none runs.
MODES = ("off", "on", "auto")
DEFAULT_IDLE_MINUTES = 15.0
# Variables read once when torch, diffusers, transformers, Typer or Python start (not per call): a caller
# whose values differ from the worker's runs cold. OMP_NUM_THREADS/MKL_NUM_THREADS are applied per call.
IMPORT_TIME_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TORCH", "PYTORCH_", "CUDA_",
                        "NVIDIA_", "TRITON_", "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "PYTHON", "LD_",
                        "LC_", "_TYPER")
IMPORT_TIME_NAMES = ("LANG", "HOME", "XDG_CACHE_HOME", "FORCE_COLOR", "PY_COLORS", "GITHUB_ACTIONS",
                     "TERMINAL_WIDTH", "TERMINAL_COLOR_SYSTEM", "TOKENIZERS_PARALLELISM")
PER_CALL = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


class Unavailable(Exception):
    """No usable worker (none running, not ours, another version): the call runs cold."""


def mode(environ=os.environ) -> str:
    value = environ.get("DDPM_SERVER", "").strip().lower()
    return value if value in MODES else "off"


def folder() -> str:
    """The per-user socket folder: DDPM_SERVER_DIR, else $XDG_RUNTIME_DIR/ddpm, else /tmp/ddpm-UID."""
    explicit = os.environ.get("DDPM_SERVER_DIR")
    if explicit:
        return os.path.abspath(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "ddpm")
    return f"/tmp/ddpm-{os.getuid()}"


def private_folder(create: bool) -> str:
    """The socket folder, made with mode 0700 if asked; Unavailable unless it is a real folder owned by this
    user that nobody else can enter (a folder made by someone else in /tmp is never used)."""
    path = folder()
    if create:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise Unavailable(f"cannot create {path} ({exc.strerror})") from None
    try:
        info = os.lstat(path)
    except OSError:
        raise Unavailable(f"{path} does not exist") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise Unavailable(f"{path} is not a folder of this user's with mode 0700")
    return path


def identity() -> dict:
    """What makes a worker this installation's: the version, where it is installed, the interpreter. (Code
    edited in a source checkout is not seen: `ddpm serve --stop` after editing.)"""
    package = os.path.dirname(os.path.abspath(ddpm_cli.__file__))
    return {"version": ddpm_cli.__version__, "install": package, "python": os.path.realpath(sys.executable)}


def socket_name(ident: dict) -> str:
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"worker-{digest}"


def socket_path(create: bool = False, ident: dict | None = None) -> str:
    return os.path.join(private_folder(create), socket_name(ident or identity()) + ".sock")


def import_time_environment(environ) -> dict:
    return {k: v for k, v in environ.items()
            if k not in PER_CALL and (k in IMPORT_TIME_NAMES or k.startswith(IMPORT_TIME_PREFIXES))}


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket (Linux: SO_PEERCRED)."""
    import struct

    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = (json.dumps(message) + "\n").encode()
    if fds:
        sent = socket.send_fds(sock, [data], fds)
        data = data[sent:]
    if data:
        sock.sendall(data)


class Reader:
    """Reads newline-delimited JSON messages from a stream socket, keeping what follows a message."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, b""

    def read(self, with_fds: int = 0) -> tuple[dict | None, list[int]]:
        """The next message (None at the end of the stream) and the descriptors that came with it."""
        fds: list[int] = []
        while b"\n" not in self.buffer:
            if with_fds and not fds:
                data, received, _flags, _address = socket.recv_fds(self.sock, 1 << 16, with_fds)
                fds.extend(received)
            else:
                data = self.sock.recv(1 << 16)
            if not data:
                for fd in fds:
                    os.close(fd)
                return None, []
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line), fds
