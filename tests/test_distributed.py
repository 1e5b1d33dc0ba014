"""torchrun: two CPU processes (gloo) train the same weights as one and sample the same images."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.test_cli import ddpm

pytestmark = pytest.mark.slow  # every test trains or samples in several processes

TRAIN = ["train", "fashion-mnist-subset", "--max-steps", 4, "-b", 8, "--lr", "1e-3", "--checkpoint-every", 4,
         "--random-flip", "--conditioning", "class", "--device", "cpu"]


def _launch(launcher: list[str], args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "ddpm_cli", *map(str, args)]


ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def torchrun(*args, processes=2, cwd=None):
    command = _launch(["--standalone", "--nproc-per-node", str(processes)], args)
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300)


def two_nodes(*args):
    """Two torchrun agents of one process each, meeting through the c10d rendezvous as two machines
    would: both processes are local rank 0, and global ranks come from the rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = _launch(["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                       "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "ddpm-test"], args)
    # Output goes to files: an agent blocked on a full pipe would stall the other inside a collective.
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(2)]
    agents = [subprocess.Popen(command, stdout=out, stderr=err, text=True, env=ENV) for out, err in files]
    codes = [agent.wait(timeout=300) for agent in agents]
    for stream in (stream for pair in files for stream in pair):
        stream.seek(0)
    return [(code, out.read(), err.read()) for code, (out, err) in zip(codes, files)]


def weights_differ_by(folder, run_a: str, run_b: str, name: str) -> float:
    """The largest difference between two runs' final checkpoint weights (``model`` or ``ema``)."""
    a = load_file(folder / run_a / "checkpoints" / "checkpoint-0000004" / f"{name}.safetensors")
    b = load_file(folder / run_b / "checkpoints" / "checkpoint-0000004" / f"{name}.safetensors")
    return max((a[k] - b[k]).abs().max().item() for k in a)


def mean_difference(folder, run_a: str, run_b: str, name: str) -> float:
    """The mean absolute difference over all weights of two runs' final checkpoints."""
    a = load_file(folder / run_a / "checkpoints" / "checkpoint-0000004" / f"{name}.safetensors")
    b = load_file(folder / run_b / "checkpoints" / "checkpoint-0000004" / f"{name}.safetensors")
    return sum((a[k] - b[k]).abs().sum().item() for k in a) / sum(a[k].numel() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    one = ddpm(*TRAIN, "-o", folder / "one", "--format", "json")
    two = torchrun(*TRAIN, "-o", folder / "two", "--format", "json")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    return folder, one, two


def test_two_processes_train_what_one_does(runs):
    folder, one, two = runs
    summary = json.loads(two.stdout)  # one summary: rank 0 prints, the other rank stays quiet
    assert summary["steps"] == 4 and summary["config"]["batch_size"] == 8 and summary["images_seen"] == 32
    assert two.stderr.count("ddpm: training") == 1
    log_one, log_two = ((folder / run / "log.jsonl").read_text().splitlines() for run in ("one", "two"))
    assert abs(json.loads(log_one[-1])["loss"] - json.loads(log_two[-1])["loss"]) < 1e-5
    assert [p.name for p in (folder / "two" / "checkpoints").iterdir()] == ["checkpoint-0000004"]
    for name in ("model", "ema"):
        # Same global batch, noise and learning rate: only float rounding differs (one Adam step is 1e-3).
        assert weights_differ_by(folder, "one", "two", name) < 2e-4, name


def test_two_nodes_meeting_through_the_rendezvous_train_what_one_does(runs):
    folder = runs[0]
    nodes = two_nodes(*TRAIN, "-o", folder / "nodes", "--format", "json")
    assert [code for code, _, _ in nodes] == [0, 0], [err[-500:] for _, _, err in nodes]
    printed = [out for _, out, _ in nodes if out.strip()]
    assert len(printed) == 1 and json.loads(printed[0])["images_seen"] == 32  # global rank 0 alone reports
    for name in ("model", "ema"):
        assert weights_differ_by(folder, "one", "nodes", name) < 2e-4, name


def test_two_processes_sample_the_same_images_as_one(runs, tmp_path):
    folder, _, _ = runs
    common = ["sample", folder / "one", "-n", 5, "-b", 2, "--steps", 5, "--class", 7, "--grid", "--format", "json"]
    one = ddpm(*common, "-o", tmp_path / "a")
    two = torchrun(*common, "-o", tmp_path / "b")
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    report = json.loads(two.stdout)
    assert [os.path.basename(i["path"]) for i in report["images"]] == [f"{s:06d}.png" for s in range(5)]
    for name in [f"{s:06d}" for s in range(5)] + ["grid"]:
        a = np.asarray(Image.open(tmp_path / "a" / f"{name}.png"), dtype=int)
        b = np.asarray(Image.open(tmp_path / "b" / f"{name}.png"), dtype=int)
        assert np.abs(a - b).max() <= 1, name


TASKS = {
    "superres": ["--task", "superres", "--scale", 2],
    "autoencoder": ["--task", "autoencoder", "--ema-decay", 0.9],
}


@pytest.mark.parametrize("task", list(TASKS))
def test_two_processes_train_what_one_does_for_every_objective(task, tmp_path):
    """Each objective's loss runs through DDP's forward and the Trainer's sharded draws: two processes on
    the same global batch end with one process's weights, up to float rounding. Rounding alone can move
    a weight whose true gradient is zero (a bias before a normalisation, an attention key's bias) by
    about the learning rate, as Adam scales its noise up to full steps; so the bound is on the mean
    difference, which processes that drift apart (each training on its half, or drawing its own noise)
    push to the order of the learning rate."""
    common = ["train", "fashion-mnist-subset", *TASKS[task], "--resolution", 16, "--max-steps", 4, "-b", 8, "--lr", "1e-3",
              "--checkpoint-every", 4, "--random-flip", "--device", "cpu", "--num-workers", 0, "-q"]
    one = ddpm(*common, "-o", tmp_path / "one")
    two = torchrun(*common, "-o", tmp_path / "two")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    for name in ("model", "ema"):
        assert mean_difference(tmp_path, "one", "two", name) < 1e-5, (task, name)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    return int(env[b"RANK"]) if b"RANK" in env else None


def test_sigterm_to_one_process_stops_every_rank_at_the_same_step_and_resumes_exactly(tmp_path):
    """Only rank 1 is told to stop; the ranks agree on the step, rank 0 writes that step's checkpoint,
    and the resumed run ends with an uninterrupted two-process run's weights, bit for bit."""
    common = ["train", "fashion-mnist-subset", "--resolution", 16, "--max-steps", 30, "-b", 8, "--lr", "1e-3",
              "--checkpoint-every", 1000,
              "--device", "cpu", "--num-workers", 0, "-q"]
    straight = torchrun(*common, "-o", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "stopped"
    agent = subprocess.Popen(_launch(["--standalone", "--nproc-per-node", "2"], [*common, "-o", run]),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 240
    while not (run / "log.jsonl").exists():  # step 10 is logged
        assert time.time() < deadline and agent.poll() is None
        time.sleep(0.02)
    ranks = {_rank_of(pid): pid for pid in _children(agent.pid)}
    os.kill(ranks[1], signal.SIGTERM)
    _, stderr = agent.communicate(timeout=240)
    assert agent.returncode != 0  # torchrun reports its workers' exit 143 as a failure
    lines = [line for line in stderr.splitlines() if line.startswith("ddpm: error: stopped by SIGTERM after step")]
    assert len(lines) == 2, stderr  # both ranks stop, at the same step, naming the same checkpoint
    saved = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(saved) == 1 and all(str(run / "checkpoints" / saved[0]) in line for line in lines), (saved, lines)
    assert 10 <= int(saved[0].removeprefix("checkpoint-")) < 30
    resumed = torchrun("train", "-o", run, "--resume", "latest", "-q")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("model", "ema"):
        a = load_file(tmp_path / "straight" / "checkpoints" / "checkpoint-0000030" / f"{name}.safetensors")
        b = load_file(run / "checkpoints" / "checkpoint-0000030" / f"{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
