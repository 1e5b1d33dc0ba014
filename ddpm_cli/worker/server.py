"""The warm worker: imports torch, diffusers and the CLI once (what an unconditional sample needs before it
listens, the text and autoencoder stack while idle afterwards), keeps recently used networks loaded, and runs
each ``ddpm`` call in a child forked from itself, as the caller: its arguments, environment, working folder,
umask, stdin/stdout/stderr (the descriptors themselves, passed over the socket), ignored signals and the
thread count its OMP_NUM_THREADS asks for. The child reports its exit code to the client itself, so calls in
flight finish even if the worker is killed; the worker reports deaths by signal and forwards the client's
signals (Ctrl-C) to the child.

The worker computes nothing with torch before forking (loading weights only), with one intra-op thread: an
OpenMP thread pool started in the parent would not survive into the children.

    python -m ddpm_cli.worker.server [--socket PATH] [--idle MINUTES] [--keep-models N]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import selectors
import signal
import socket
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass

from ddpm_cli.worker import child, preload, protocol

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PRELOAD_AFTER_S = 0.3  # a step of preload.LATER runs once no call has run for this long


def log(message: str) -> None:
    sys.stderr.write(f"ddpm serve [{time.strftime('%H:%M:%S')}]: {message}\n")
    sys.stderr.flush()


def thread_count() -> int:
    """Threads in this process (a forked child has only the one that forked it: locks others hold stay held)."""
    return len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1


def freeze_shared() -> None:
    """Collect, then leave what exists out of later collections: the children share those objects' pages
    instead of copying them on refcount writes."""
    gc.collect()
    gc.freeze()


@dataclass
class Call:
    conn: socket.socket | None
    reader: protocol.Reader
    reports: int  # the read end of the pipe the child reports its loads on
    argv: list
    started: float


class Worker:
    def __init__(self, path: str, idle_minutes: float | None, keep_models: int, default_threads: int,
                 environment: dict, identity: dict):
        from ddpm_cli.engine.models import cache

        self.cache, cache.capacity = cache, keep_models
        self.path, self.default_threads = path, default_threads
        self.idle_s = None if idle_minutes is None or idle_minutes <= 0 else idle_minutes * 60
        self.identity = identity
        self.environment = environment  # as the worker started (imports may add variables)
        self.calls: dict[int, Call] = {}
        self.later = list(preload.LATER)  # imported while no call runs
        self.served, self.started, self.last_activity = 0, time.time(), time.monotonic()
        self.listener: socket.socket | None = None
        self.inode = None
        self.selector = selectors.DefaultSelector()
        self.wake_read, self.wake_write = os.pipe()
        for fd in (self.wake_read, self.wake_write):
            os.set_blocking(fd, False)

    # The worker.

    def listen(self) -> None:
        old_umask = os.umask(0o177)  # the socket: this user only
        try:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(self.path)
        finally:
            os.umask(old_umask)
        self.inode = os.stat(self.path).st_ino
        self.listener.listen(128)
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self.selector.register(self.wake_read, selectors.EVENT_READ, self._signals)
        signal.set_wakeup_fd(self.wake_write)
        for number in (signal.SIGCHLD, *STOP_SIGNALS):
            signal.signal(number, lambda *_: None)  # handled in the loop, from the wake-up pipe

    def serve(self) -> None:
        freeze_shared()
        while self.listener is not None or self.calls:
            timeout = None
            if self.idle_s is not None and not self.calls and self.listener is not None:
                timeout = self.last_activity + self.idle_s - time.monotonic()
                if timeout <= 0:
                    log(f"idle for {self.idle_s / 60:g} min: stopping")
                    self.stop_listening()
                    continue
            if self.later and not self.calls and self.listener is not None:
                wait = self.last_activity + PRELOAD_AFTER_S - time.monotonic()
                if wait <= 0:
                    self._import_later()
                    wait = 0  # then whatever arrived meanwhile
                timeout = wait if timeout is None else min(timeout, wait)
            for key, _events in self.selector.select(timeout):
                if self.selector.get_map().get(key.fd) is not key:
                    continue  # closed by an earlier handler of this round (a reaped call's connection)
                try:
                    key.data(key.fileobj)
                except Exception:  # noqa: BLE001 - a bug in one call's handling must not end the worker
                    log("error:\n" + traceback.format_exc())
        log("stopped")

    def _import_later(self) -> None:
        """One step of what calls may need beyond an unconditional sample (preload.LATER)."""
        began = time.monotonic()
        preload.import_later(self.later.pop(0), log)
        self.last_activity += time.monotonic() - began  # importing is not idleness
        freeze_shared()
        if not self.later:
            threads = thread_count()
            log("preloaded the text and autoencoder stack" + (f"; warning: {threads} threads run" if threads > 1 else ""))

    def stop_listening(self) -> None:
        """No new calls (the socket goes); calls in flight finish and are reported, then the worker exits."""
        if self.listener is None:
            return
        self.selector.unregister(self.listener)
        self.listener.close()
        self.listener = None
        try:
            if os.stat(self.path).st_ino == self.inode:  # not a newer worker's socket
                os.unlink(self.path)
        except OSError:
            pass

    def _signals(self, _fd) -> None:
        try:
            numbers = os.read(self.wake_read, 512)
        except BlockingIOError:
            return
        if any(n in STOP_SIGNALS for n in numbers):
            if self.listener is None:  # asked twice: leave the calls in flight to report themselves
                self.calls.clear()
            self.stop_listening()
        self._reap()

    def _accept(self, listener) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conn.settimeout(10)
        fds: list[int] = []
        try:
            if protocol.peer_uid(conn) != os.getuid():
                raise OSError("a connection from another user")
            reader = protocol.Reader(conn)
            request, fds = reader.read(with_fds=3)
            op = (request or {}).get("op")
            if op == "run":
                self._start_call(conn, reader, request, fds)
                return
            if op == "status":
                protocol.send(conn, self.status())
            elif op == "stop":
                protocol.send(conn, {"ok": True, "pid": os.getpid()})
                log("asked to stop")
                self.stop_listening()
        except (OSError, ValueError) as exc:
            log(f"connection dropped ({exc})")
        for fd in fds:
            os.close(fd)
        conn.close()

    def status(self) -> dict:
        return {"ok": True, "pid": os.getpid(), "version": self.identity["version"], "install": self.identity["install"],
                "socket": self.path, "uptime_s": round(time.time() - self.started, 1), "calls": self.served,
                "running": len(self.calls), "models": self.cache.describe(), "preloading": len(self.later),
                "idle_minutes": None if self.idle_s is None else self.idle_s / 60}

    def _refusal(self, request: dict, fds: list[int]) -> str | None:
        if request.get("identity") != self.identity:
            return "another installation or version of ddpm"
        theirs = protocol.import_time_environment(request.get("env", {}))
        differing = sorted(k for k in set(theirs) | set(self.environment) if theirs.get(k) != self.environment.get(k))
        if differing:
            return "environment differs from the worker's: " + " ".join(differing)
        if len(fds) != len(request.get("fds", ())):
            return "the standard streams did not arrive"
        return None

    def _start_call(self, conn: socket.socket, reader: protocol.Reader, request: dict, fds: list[int]) -> None:
        reason = self._refusal(request, fds)
        if reason is not None:
            protocol.send(conn, {"ok": False, "reason": reason})
            raise OSError(f"refused a call: {reason}")
        protocol.send(conn, {"ok": True})
        reports, report_write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(reports)
            os.close(report_write)
            protocol.send(conn, {"fallback": f"fork failed ({exc})"})
            raise
        if pid == 0:
            self._child(conn, request, fds, report_write)  # never returns
        os.close(report_write)
        for fd in fds:
            os.close(fd)
        self.calls[pid] = Call(conn, reader, reports, request["argv"], time.monotonic())
        self.served += 1
        self.last_activity = time.monotonic()
        self.selector.register(conn, selectors.EVENT_READ, self._client_message)

    def _call_of(self, conn) -> tuple[int, Call] | tuple[None, None]:
        for pid, call in self.calls.items():
            if call.conn is conn:
                return pid, call
        return None, None

    def _client_message(self, conn) -> None:
        pid, call = self._call_of(conn)
        if call is None:  # its call was reaped
            self.selector.unregister(conn)
            conn.close()
            return
        try:
            message, _ = call.reader.read()
        except (OSError, ValueError):
            message = None
        if message is None:  # the client is gone: it had the exit code, or it was killed (and so is its call)
            self.selector.unregister(conn)
            conn.close()
            call.conn = None
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline and not os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                time.sleep(0.002)  # a child that reported its exit code is exiting
            try:
                os.kill(pid, signal.SIGKILL)  # a zombie until reaped: never another process
            except ProcessLookupError:
                pass
            self._reap()
            return
        if "signal" in message:
            try:
                os.kill(pid, int(message["signal"]))
            except (ProcessLookupError, ValueError, OSError):
                pass

    def _reap(self) -> None:
        loads = []
        while self.calls:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            call = self.calls.pop(pid, None)
            if call is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            if call.conn is not None:
                try:
                    protocol.send(call.conn, {"signal": -code} if code < 0 else {"exit": code})
                except OSError:
                    pass
                self.selector.unregister(call.conn)
                call.conn.close()
            log(f"{' '.join(call.argv[1:3])} ...: exit {code} in {time.monotonic() - call.started:.2f} s")
            loads.extend(self._read_reports(call.reports))
            self.last_activity = time.monotonic()
        for report in loads:
            self._remember(report)

    def _read_reports(self, fd: int) -> list[dict]:
        data = b""
        try:
            while chunk := os.read(fd, 1 << 16):
                data += chunk
        finally:
            os.close(fd)
        return [json.loads(line) for line in data.splitlines() if line.strip()]

    def _remember(self, report: dict) -> None:
        """Keep a network a call loaded (its weights only: nothing is computed before forking)."""
        if "used" in report:
            self.cache.used(report["used"])
            return
        import torch

        state = torch.random.get_rng_state()  # initialising modules draws from it; calls start from a fresh state
        began = time.monotonic()
        try:
            if self.cache.fill(report["kind"], report["files"], report["args"]):
                log(f"keeping {report['kind']} {report['args'].get('class_name')} from {report['files']} "
                    f"({time.monotonic() - began:.2f} s)")
        except Exception as exc:  # noqa: BLE001 - the next call loads it itself
            log(f"could not keep {report['files']} ({type(exc).__name__}: {exc})")
        finally:
            torch.random.set_rng_state(state)
        freeze_shared()

    # The child: one call.

    def _child(self, conn: socket.socket, request: dict, fds: list[int], report_write: int) -> None:
        try:
            self._become_caller(conn, request, fds, report_write)
        except BaseException as exc:  # noqa: BLE001 - nothing of the call ran: the client runs it cold
            try:
                protocol.send(conn, {"fallback": f"{type(exc).__name__}: {exc}"})
            finally:
                os._exit(0)
        from ddpm_cli.cli.app import main

        code = child.run_main(main)
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except Exception:  # noqa: BLE001 - e.g. a closed pipe: Python exits 120 then
                code = code or 120
        try:
            protocol.send(conn, {"exit": code})
        finally:
            os._exit(code & 0xFF)

    def _become_caller(self, conn: socket.socket, request: dict, fds: list[int], report_write: int) -> None:
        signal.set_wakeup_fd(-1)
        for number in (signal.SIGCHLD, *STOP_SIGNALS):
            signal.signal(number, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for number in request.get("ignored", ()):
            signal.signal(number, signal.SIG_IGN)
        # What is the worker's, not the call's.
        self.selector.close()
        if self.listener is not None:
            self.listener.close()
        os.close(self.wake_read)
        os.close(self.wake_write)
        for call in self.calls.values():
            if call.conn is not None:
                call.conn.close()
            os.close(call.reports)
        conn.settimeout(None)
        os.setpgid(0, 0)
        # The caller's streams, folder, umask, environment and arguments.
        targets = list(request["fds"])
        for target, fd in zip(targets, fds):
            os.dup2(fd, target)
            os.close(fd)
        for missing in {0, 1, 2} - set(targets):
            os.close(missing)
        os.chdir(request["cwd"])
        os.umask(int(request["umask"]))
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        child.caller_streams(targets)
        tempfile.tempdir = None
        # A fresh process's state: random seeds, threads, shown warnings.
        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        import torch

        torch.set_num_threads(preload.threads(os.environ, self.default_threads))
        saved = warnings.filters[:]
        warnings.resetwarnings()  # also forgets which warnings were shown (every module's registry)
        warnings.filters[:] = saved
        warnings.onceregistry.clear()
        self.cache.start_call(lambda report: os.write(report_write, (json.dumps(report) + "\n").encode()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ddpm_cli.worker.server")
    parser.add_argument("--socket", help="the socket to listen on (default: this installation's)")
    parser.add_argument("--idle", type=float, default=None, help="exit after this many minutes without calls")
    parser.add_argument("--keep-models", type=int, default=3, help="networks kept loaded (least recently used out)")
    parser.add_argument("--started-by-client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.chdir("/")
    try:
        identity = protocol.identity()  # before the imports: a file edited meanwhile makes another installation
        path = args.socket or protocol.socket_path(create=True, ident=identity)
        protocol.private_folder(create=True)
    except protocol.Unavailable as exc:
        sys.exit(f"ddpm: error: {exc}")
    lock = None
    if not args.started_by_client:  # (a client starting one holds this lock already)
        import fcntl

        from ddpm_cli.worker.client import connect

        lock = open(path[: -len(".sock")] + ".lock", "a")
        fcntl.flock(lock, fcntl.LOCK_EX)  # clients that would start one wait for this one instead
        if connect(path) is not None:
            sys.exit(f"ddpm: error: a worker already runs on {path}; `ddpm serve --stop` ends it")
        if os.path.lexists(path):
            os.unlink(path)  # stale: its worker was killed
    began = time.monotonic()
    environment = protocol.import_time_environment(os.environ)
    default_threads = preload.import_stack(log)
    worker = Worker(path, args.idle, args.keep_models, default_threads, environment, identity)
    try:
        worker.listen()
    except OSError as exc:
        sys.exit(f"ddpm: error: cannot listen on {path} ({exc.strerror or exc})")
    finally:
        if lock is not None:
            lock.close()
    threads = thread_count()
    if threads > 1:  # a forked child has only the thread that forked it: locks held by others stay held
        log(f"warning: {threads} threads run in the worker before forking")
    import torch

    if torch.cuda.is_initialized():  # CUDA does not survive fork: the calls could not use the GPU
        log("warning: CUDA was initialised in the worker; calls on the GPU will fail")
    idle = f"exits after {args.idle:g} idle minutes" if worker.idle_s else "runs until stopped"
    log(f"ready in {time.monotonic() - began:.1f} s: pid {os.getpid()}, socket {path}, {idle}")
    try:
        worker.serve()
    finally:
        worker.stop_listening()


if __name__ == "__main__":
    main()
