"""The CLI as a user runs it: a subprocess, exit codes, clean stdout, metadata, seeds."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ddpm_cli.engine.io.images import read_png_metadata
from tests.cli_runner import run_ddpm


def ddpm(*args, cwd=None):
    """`ddpm ARGS` in its own process (forked from a helper that has imported torch; see cli_runner)."""
    return run_ddpm(*args, cwd=cwd)


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, ddpm_cli.cli.app; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    result = ddpm("--help")
    assert result.returncode == 0 and "train" in result.stdout and "sample" in result.stdout


def test_sample_writes_pngs_with_metadata_and_only_paths_on_stdout(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    result = ddpm("sample", tiny_pipeline_dir, "-n", 3, "--steps", 4, "--seed", 10, "-o", out, "--grid")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [str(out / f"{s:06d}.png") for s in (10, 11, 12)] + [str(out / "grid.png")]
    meta = read_png_metadata(out / "000011.png")
    assert meta["seed"] == 11 and meta["sampler"] == "dpmpp-2m" and meta["steps"] == 4 and meta["size"] == "16x16"
    assert "Seed: 11" in Image.open(out / "000011.png").text["parameters"]
    assert "\x1b[" not in result.stderr  # no escape codes when stderr is not a terminal


def test_same_seed_same_image_at_batch_sizes_1_and_4(tiny_pipeline_dir, tmp_path):
    for batch in (1, 4):
        result = ddpm("sample", tiny_pipeline_dir, "-n", 4, "-b", batch, "--sampler", "ddpm", "--steps", 5,
                      "--seed", 7, "-o", tmp_path / f"b{batch}", "-q")
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
    for seed in range(7, 11):
        a = np.asarray(Image.open(tmp_path / "b1" / f"{seed:06d}.png"), dtype=int)
        b = np.asarray(Image.open(tmp_path / "b4" / f"{seed:06d}.png"), dtype=int)
        assert np.abs(a - b).max() <= 1  # batched convolutions may round the last bit differently
    first, second = (np.asarray(Image.open(tmp_path / "b4" / f"{s:06d}.png")) for s in (7, 8))
    assert not np.array_equal(first, second)


def test_json_format_and_existing_outputs(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    result = ddpm("sample", tiny_pipeline_dir, "-n", 2, "--steps", 3, "-o", out, "--format", "json", "--sampler", "ddim")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert [image["seed"] for image in document["images"]] == [0, 1] and document["sampler"] == "ddim"
    before = (out / "000000.png").read_bytes()
    again = ddpm("sample", tiny_pipeline_dir, "-n", 2, "--steps", 3, "-o", out)
    assert again.returncode == 2 and "exists" in again.stderr and again.stdout == ""
    assert len(again.stderr.strip().splitlines()) == 1
    assert (out / "000000.png").read_bytes() == before
    skip = ddpm("sample", tiny_pipeline_dir, "-n", 3, "--steps", 3, "-o", out, "--skip-existing")
    assert skip.returncode == 0 and skip.stdout.splitlines() == [str(out / "000002.png")]
    assert (out / "000000.png").read_bytes() == before


@pytest.mark.parametrize("args,code,message", [
    (["sample", "/no/such/model"], 3, "no such folder: /no/such/model"),
    (["sample", "./runs/nothere"], 3, "no such folder: ./runs/nothere"),
    (["sample", "{model}", "--sampler", "euler-x"], 2, "--sampler.*'euler-x' is not one of 'ddpm', 'ddim'"),
    (["sample", "{model}", "--device", "cuda"], 2, "CUDA"),
    (["sample", "{model}", "--steps", "5000"], 2, "--steps must be between"),
    (["train", "/no/such/folder", "-o", "{tmp}/run"], 2, "no/such/folder"),
])
def test_errors_are_one_line_with_documented_codes(tiny_pipeline_dir, tmp_path, args, code, message):
    import re

    args = [a.format(model=tiny_pipeline_dir, tmp=tmp_path) for a in args]
    result = ddpm(*args)
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpm: error: ")
    assert re.search(message, lines[0], re.IGNORECASE)


def test_pickle_checkpoint_is_refused_through_the_cli(tiny_pipeline_dir, tmp_path):
    import pickle
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(pickle.dumps(Payload()))
    result = ddpm("sample", model, "-n", 1, "--steps", 2, "-o", tmp_path / "out")
    assert result.returncode == 3 and "pickle" in result.stderr
    assert not marker.exists() and not list((tmp_path / "out").glob("*"))


def test_train_then_sample_through_the_cli(tmp_path):
    run = tmp_path / "run"
    result = ddpm("train", "fashion-mnist-subset", "--max-steps", 6, "-b", 8, "--checkpoint-every", 6,
                  "--num-workers", 0, "-o", run)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(run), str(run / "samples" / "step-0000006.png")]
    assert "training" in result.stderr
    sampled = ddpm("sample", run, "-n", 1, "--steps", 3, "-o", tmp_path / "out")
    assert sampled.returncode == 0, sampled.stderr
    assert Image.open(tmp_path / "out" / "000000.png").size == (32, 32)


def test_ddpm_sampler_matches_diffusers_pipeline_end_to_end(tiny_pipeline_dir, tmp_path):
    """The layout of google/ddpm-cifar10-32 (fixed_large variance): our images equal DDPMPipeline's."""
    import torch
    from diffusers import DDPMPipeline

    result = ddpm("sample", tiny_pipeline_dir, "-n", 2, "--seed", 5, "--sampler", "ddpm", "--steps", 20,
                  "-o", tmp_path, "-q")
    assert result.returncode == 0, result.stderr
    pipeline = DDPMPipeline.from_pretrained(tiny_pipeline_dir)
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    expected = pipeline(batch_size=2, generator=generators, num_inference_steps=20, output_type="np").images
    for i, seed in enumerate((5, 6)):
        ours = np.asarray(Image.open(tmp_path / f"{seed:06d}.png"), dtype=float) / 255
        assert np.abs(ours - expected[i]).max() <= 1 / 255 + 1e-6
