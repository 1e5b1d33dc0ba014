"""The client side of a warm call: hand this process's arguments, environment, working directory, umask and
stdin/stdout/stderr to the worker, forward signals, and exit as the call did.

``run_in_worker`` returns None whenever the call should run cold instead: no worker and none wanted, a stale
socket, another user's socket, another installation or environment, a worker that ended before starting
the call. After the call started it never falls back (the call's output may already be out).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from ddpm_cli.worker import protocol
from ddpm_cli.worker.protocol import Unavailable

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
START_TIMEOUT_S = 300.0  # importing torch and diffusers on a busy machine


def connect(path: str) -> socket.socket | None:
    """A connection to the worker at ``path``; None when none listens there (no socket, or a stale one)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError:
        sock.close()
        raise
    if protocol.peer_uid(sock) != os.getuid():
        sock.close()
        raise Unavailable(f"{path} is another user's")
    return sock


def start_worker(path: str, idle_minutes: float, wait_s: float = START_TIMEOUT_S) -> socket.socket | None:
    """Start a detached worker for ``path`` (one at a time: a lock beside the socket) and connect to it."""
    import fcntl

    with open(path[: -len(".sock")] + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a client that started one first is waiting for it; then we connect
        sock = connect(path)
        if sock is not None:
            return sock
        if os.path.lexists(path):
            os.unlink(path)  # stale: its worker was killed
        log = path[: -len(".sock")] + ".log"
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
                   (os.POSIX_SPAWN_DUP2, 1, 2)]
        argv = [sys.executable, "-m", "ddpm_cli.worker.server", "--socket", path, "--idle", str(idle_minutes),
                "--started-by-client"]
        pid = os.posix_spawn(sys.executable, argv, dict(os.environ), file_actions=actions, setsid=True)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            sock = connect(path)
            if sock is not None:
                return sock
            if os.waitpid(pid, os.WNOHANG)[0]:  # it failed to start; its log says why
                return None
            time.sleep(0.05)
        return None


def _ignored_signals() -> list[int]:
    return [int(n) for n in FORWARDED if signal.getsignal(n) == signal.SIG_IGN]


def _open_fds() -> list[int]:
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            pass
    return fds


def call(sock: socket.socket, argv: list[str], ident: dict) -> int | None:
    """Run argv in the worker; its exit code, or None if the worker refused it (run it cold)."""
    try:
        cwd = os.getcwd()
    except OSError:  # the working folder was deleted: only a cold call can start there
        return None
    umask = os.umask(0)
    os.umask(umask)
    fds = _open_fds()
    request = {"op": "run", "identity": ident, "argv": argv, "cwd": cwd, "env": dict(os.environ),
               "umask": umask, "fds": fds, "ignored": _ignored_signals()}
    reader = protocol.Reader(sock)
    try:
        protocol.send(sock, request, fds)
        reply, _ = reader.read()
    except OSError:
        return None
    if not reply or not reply.get("ok"):
        return None
    # The call is running: from here on its output may be out, so it never runs again cold.
    def forward(number, _frame):
        try:
            protocol.send(sock, {"signal": number})
        except OSError:
            pass

    for number in FORWARDED:
        if signal.getsignal(number) != signal.SIG_IGN:
            signal.signal(number, forward)
    while True:
        try:
            message, _ = reader.read()
        except OSError:
            message = None
        if message is None:
            sys.stderr.write("ddpm: error: the ddpm worker ended this call without an exit status\n")
            return 1
        if "fallback" in message:  # the child could not become the caller before running anything
            return None
        if "exit" in message:
            return int(message["exit"])
        if "signal" in message:  # the call died of a signal: so does this process, as a cold call would
            number = int(message["signal"])
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return 128 + number


def run_in_worker(argv: list[str]) -> int | None:
    """The call's exit code from a worker, or None to run it cold (DDPM_SERVER off, or no usable worker)."""
    wanted = protocol.mode()
    if wanted == "off" or argv[1:2] == ["serve"] or not hasattr(socket, "send_fds"):
        return None
    try:
        ident = protocol.identity()
        path = protocol.socket_path(create=wanted == "auto", ident=ident)
        sock = connect(path)
        if sock is None and wanted == "auto":
            idle = float(os.environ.get("DDPM_SERVER_IDLE") or protocol.DEFAULT_IDLE_MINUTES)
            sock = start_worker(path, idle)
        if sock is None:
            return None
    except (Unavailable, OSError, ValueError):
        return None
    with sock:
        return call(sock, argv, ident)


def request(op: str, timeout_s: float = 10.0) -> dict | None:
    """Ask this installation's worker for its status or to stop; None when none runs."""
    try:
        sock = connect(protocol.socket_path())
    except (Unavailable, OSError):
        return None
    if sock is None:
        return None
    with sock:
        sock.settimeout(timeout_s)
        try:
            protocol.send(sock, {"op": op, "identity": protocol.identity()})
            reply, _ = protocol.Reader(sock).read()
        except (OSError, ValueError):
            return None
    return reply
