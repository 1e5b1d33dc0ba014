"""torchrun: two CPU processes (gloo) train the same weights as one and sample the same images."""

import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest
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


