"""Faults injected through the CLI: each gives its documented exit code and a one-line message,
and no earlier output is lost or changed."""

import json
import os
import pty
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.test_cli import ddpm

PY = sys.executable


def assert_one_line_error(result, code, *phrases):
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("ddpm: error: "), result.stderr
    assert all(not line.startswith("Traceback") for line in lines)
    for phrase in phrases:
        assert phrase in lines[-1], lines[-1]


def run_patched(patch: str, *args):
    """Run the CLI in a subprocess after a few lines of Python that inject a fault."""
    code = f"import sys\n{patch}\nfrom ddpm_cli.cli.app import main\nsys.argv = ['ddpm', *{list(map(str, args))!r}]\nmain()\n"
    return subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.fixture
def model_copy(tiny_pipeline_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, folder)
    return folder


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage-header"])
def test_damaged_safetensors_exit_3(model_copy, tmp_path, damage):
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "empty": b"",
                         "garbage-header": struct.pack("<Q", 64) + b"{not json" + b"\0" * 100}[damage])
    assert_one_line_error(ddpm("sample", model_copy, "-n", 1, "-o", tmp_path / "out"), 3, "truncated or corrupt", "diffusion_pytorch_model")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_repository_with_its_own_code_is_refused(model_copy, tmp_path):
    (model_copy / "unet" / "modeling_custom.py").write_text("import os\nos.system('touch pwned')\n")
    assert_one_line_error(ddpm("sample", model_copy, "-n", 1, "-o", tmp_path / "out"), 3, "own code")


def test_hub_model_not_in_the_offline_cache(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([PY, "-m", "ddpm_cli", "sample", "someone/not-cached", "-o", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert_one_line_error(result, 3, "someone/not-cached@main is not in the local cache")


def test_usage_errors_are_one_line_exit_2(tmp_path):
    assert_one_line_error(ddpm("sample", "fashion-mnist", "--steps", "0"), 2, "--steps", "ddpm sample --help")
    assert_one_line_error(ddpm("sampel"), 2, "No such command")
    assert_one_line_error(ddpm("train", "fashion-mnist-subset", "--resolution", "30", "-o", tmp_path / "r"), 2, "not a multiple of 4")
    assert_one_line_error(ddpm("sample", "fashion-mnist", "-o", "/proc/ddpm-no-such-place"), 2, "cannot create output folder")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(ddpm("sample", "fashion-mnist", "-o", tmp_path / "file" / "sub"), 2, "cannot create output folder")


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path):
    result = ddpm("--debug", "sample", "/no/such/model")
    assert result.returncode == 3
    assert "Traceback" in result.stderr and result.stderr.strip().splitlines()[-1].startswith("ddpm: error: ")


def png_header_only(width, height):
    """A PNG whose header claims width x height pixels: a decompression bomb's calling card."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_training_folder_with_a_decompression_bomb_is_refused_before_training(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (16, 16), "red").save(data / "ok.png")
    (data / "bomb.png").write_bytes(png_header_only(60_000, 60_000))
    result = ddpm("train", data, "--max-steps", 1, "-o", tmp_path / "run")
    assert_one_line_error(result, 2, "bomb.png", "decompression bomb")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_training_folder_of_awkward_images_is_converted_deliberately(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.full((20, 24), 40000, dtype=np.uint16)).save(data / "sixteen.png")
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(data / "rgba.png")
    Image.new("P", (20, 20), 3).save(data / "palette.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(data / "cmyk.jpg")
    rotated = Image.new("RGB", (30, 20), "blue")
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(data / "exif.jpg", exif=exif.tobytes())
    result = ddpm("train", data, "--max-steps", 2, "-b", 2, "--resolution", 16, "--num-workers", 1, "-o", tmp_path / "run", "-q")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_sigint_keeps_finished_images_and_leaves_no_partial_file(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([PY, "-m", "ddpm_cli", "sample", str(tiny_pipeline_dir), "-n", "200", "-b", "1",
                             "--sampler", "ddpm", "--steps", "200", "-o", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a suite started in the background inherits an ignored SIGINT; a user's terminal does not
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    printed = [proc.stdout.readline().strip(), proc.stdout.readline().strip()]
    proc.send_signal(signal.SIGINT)
    rest, stderr = proc.communicate(timeout=120)
    printed += rest.split()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("ddpm: error: interrupted")
    files = sorted(str(p) for p in out.iterdir())
    assert files == sorted(printed) and 2 <= len(files) < 200
    for path in files:
        Image.open(path).load()  # complete, valid PNGs


def test_stdout_stays_clean_with_stderr_on_a_terminal(tiny_pipeline_dir, tmp_path):
    master, slave = pty.openpty()
    proc = subprocess.Popen([PY, "-m", "ddpm_cli", "sample", str(tiny_pipeline_dir), "-n", "3", "--steps", "30",
                             "-o", str(tmp_path)], stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    terminal = []

    def drain():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            terminal.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    stdout, _ = proc.communicate(timeout=120)
    reader.join(timeout=10)
    os.close(master)
    assert proc.returncode == 0
    assert stdout.decode().splitlines() == [str(tmp_path / f"{s:06d}.png") for s in range(3)]
    assert b"\x1b" not in stdout
    assert b"sampling" in b"".join(terminal)  # the progress bar went to the terminal


RESUME_TEST_RUN = ["fashion-mnist-subset", "--max-steps", 40, "--checkpoint-every", 4, "--sample-every", 1000,
                   "-b", 8, "--lr", 1e-3, "--num-workers", 0, "-q"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """RESUME_TEST_RUN trained without interruption: what a stopped or killed and resumed run must equal."""
    run = tmp_path_factory.mktemp("straight") / "run"
    result = ddpm("train", *RESUME_TEST_RUN, "-o", run)
    assert result.returncode == 0, result.stderr
    return run


def start_training(run, *extra, **popen):
    """RESUME_TEST_RUN (with ``extra`` options) in its own process, as a user starts it."""
    return subprocess.Popen([PY, "-m", "ddpm_cli", "train", *map(str, RESUME_TEST_RUN), *map(str, extra), "-o", str(run)],
                            **popen)


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline and proc.poll() is None, f"no {path}"
        time.sleep(0.02)


def assert_resumes_to_the_straight_run(run, straight, step=40):
    """``--resume latest`` finishes the run, whose final weights equal the straight run's bit for bit."""
    resumed = ddpm("train", "-o", run, "--resume", "latest", "-q")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("model", "ema"):
        a = load_file(straight / "checkpoints" / f"checkpoint-{step:07d}" / f"{name}.safetensors")
        b = load_file(run / "checkpoints" / f"checkpoint-{step:07d}" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not list((run / "checkpoints").glob(".*"))  # no temporary folder left behind


@pytest.mark.slow
def test_kill_9_during_training_then_resume_matches_an_uninterrupted_run(tmp_path, straight_run):
    run = tmp_path / "killed"
    proc = start_training(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(run / "checkpoints" / "checkpoint-0000004" / "state.json", proc)
    time.sleep(random.uniform(0.0, 1.0))
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert_resumes_to_the_straight_run(run, straight_run)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_checkpoints_the_step_then_resume_matches_an_uninterrupted_run(tmp_path, straight_run, signum):
    run = tmp_path / "stopped"
    # No checkpoint falls due before the end: without the stop's own, every step would be lost.
    proc = start_training(run, "--checkpoint-every", 1000, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          # a suite started in the background inherits an ignored SIGINT; a user's terminal does not
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(run / "log.jsonl", proc)  # step 10 is logged
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr), 128 + signum,
                          f"stopped by {signal.Signals(signum).name} after step", "--resume latest")
    saved = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("checkpoint-"), saved
    step = int(saved[0].removeprefix("checkpoint-"))
    assert 10 <= step < 40 and str(run / "checkpoints" / saved[0]) in stderr
    assert json.loads((run / "checkpoints" / saved[0] / "state.json").read_text())["step"] == step
    assert_resumes_to_the_straight_run(run, straight_run)


def test_full_disk_during_checkpoint_keeps_the_previous_one_and_exits_4(tmp_path):
    patch = """
import errno
import ddpm_cli.training.checkpoints as checkpoints
real, calls = checkpoints.save_file, [0]
def save_file(*args, **kwargs):
    calls[0] += 1
    if calls[0] > 4:  # the second checkpoint
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(*args, **kwargs)
checkpoints.save_file = save_file
"""
    run = tmp_path / "run"
    result = run_patched(patch, "train", "fashion-mnist-subset", "--max-steps", 8, "--checkpoint-every", 4,
                         "-b", 4, "--num-workers", 0, "-o", run, "-q")
    assert_one_line_error(result, 4, "disk full", "previous checkpoints are intact")
    names = [p.name for p in (run / "checkpoints").iterdir()]
    assert names == ["checkpoint-0000004"]
    assert load_file(run / "checkpoints" / "checkpoint-0000004" / "model.safetensors")
    resumed = ddpm("train", "-o", run, "--resume", "latest", "-q")
    assert resumed.returncode == 0, resumed.stderr


def test_full_disk_while_saving_images_keeps_finished_ones(tiny_pipeline_dir, tmp_path):
    patch = """
import errno
from PIL import Image
real, calls = Image.Image.save, [0]
def save(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, *args, **kwargs)
Image.Image.save = save
"""
    out = tmp_path / "out"
    result = run_patched(patch, "sample", tiny_pipeline_dir, "-n", 4, "-b", 1, "--steps", 2, "-o", out, "-q")
    assert_one_line_error(result, 4)
    assert result.stdout.split() == [str(out / "000000.png"), str(out / "000001.png")]
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png"]


def test_out_of_memory_suggests_a_smaller_batch_and_keeps_finished_images(tiny_pipeline_dir, tmp_path):
    patch = """
import torch
import ddpm_cli.engine.tasks.generate as generate
real, calls = generate.sample_batch, [0]
def sample_batch(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 2:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    return real(*args, **kwargs)
generate.sample_batch = sample_batch
"""
    out = tmp_path / "out"
    result = run_patched(patch, "sample", tiny_pipeline_dir, "-n", 4, "-b", 2, "--steps", 2, "-o", out, "-q")
    assert_one_line_error(result, 4, "out of memory", "--batch-size")
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png"]
