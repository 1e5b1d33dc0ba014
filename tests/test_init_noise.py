"""`ddpm invert`, --init-noise and --interpolate through the CLI, on a tiny random 16x16 RGB model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_cli.engine.diffusion.noise import SeededNoise
from ddpm_cli.engine.io.images import read_png_metadata
from ddpm_cli.engine.io.noise_file import NoiseFile, read_noise, save_noise
from ddpm_cli.engine.models.fingerprint import file_sha256
from tests.test_cli import ddpm

DDIM = ("--sampler", "ddim", "--steps", 4)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / "small.png")
    return folder


def seeded_file(path, model, seeds, shape=(3, 16, 16)):
    """A noise file whose rows are the seeded noise `--seed S` starts from."""
    save_noise(path, NoiseFile(SeededNoise(seeds, shape)(), str(model)))
    return path


def test_invert_writes_the_noise_and_what_made_it(tiny_pipeline_dir, pictures, tmp_path):
    from ddpm_cli.cli.invert import read_images
    from ddpm_cli.engine.models.pipeline import load_pipeline
    from ddpm_cli.engine.tasks.invert import invert_batch

    out = tmp_path / "noise.safetensors"
    result = ddpm("invert", tiny_pipeline_dir, pictures / "a.png", pictures / "b.png", "-o", out, "--steps", 5,
                  "--refine", 2, "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["shape"] == [2, 3, 16, 16]
    data = read_noise(out)
    assert data.model == str(tiny_pipeline_dir) and data.settings["steps"] == 5 and data.settings["refine"] == 2
    assert data.image_sha256 == [file_sha256(pictures / "a.png"), file_sha256(pictures / "b.png")]
    pipeline = load_pipeline(str(tiny_pipeline_dir), device="cpu", dtype="fp32")
    images = read_images([pictures / "a.png", pictures / "b.png"], (16, 16), 3, False)
    torch.testing.assert_close(data.noise, invert_batch(pipeline, images, 5, refine=2), atol=1e-5, rtol=1e-5)
    # the other size is refused without --resize, taken with it
    refused = ddpm("invert", tiny_pipeline_dir, pictures / "small.png", "-o", tmp_path / "s.safetensors")
    assert refused.returncode == 2 and "--resize" in refused.stderr and not (tmp_path / "s.safetensors").exists()
    assert ddpm("invert", tiny_pipeline_dir, pictures / "small.png", "-o", tmp_path / "s.safetensors", "--resize",
                "--steps", 2).returncode == 0


def test_init_noise_rows_replace_the_seeded_noise(tiny_pipeline_dir, tmp_path):
    """Rows equal to seeds 5 and 6's noise give the images of --seed 5 -n 2 (deterministic sampler),
    -n defaults to the rows, and each image records its row and the file's SHA-256."""
    noise = seeded_file(tmp_path / "n.safetensors", tiny_pipeline_dir, [5, 6])
    given = ddpm("sample", tiny_pipeline_dir, "--init-noise", noise, *DDIM, "-o", tmp_path / "given")
    seeded = ddpm("sample", tiny_pipeline_dir, "--seed", 5, "-n", 2, *DDIM, "-o", tmp_path / "seeded")
    assert given.returncode == 0 and seeded.returncode == 0, given.stderr + seeded.stderr
    assert sorted(p.name for p in (tmp_path / "given").iterdir()) == ["000000.png", "000001.png"]
    for row, seed in ((0, 5), (1, 6)):
        assert np.array_equal(pixels(tmp_path / "given" / f"{row:06d}.png"), pixels(tmp_path / "seeded" / f"{seed:06d}.png"))
        meta = read_png_metadata(tmp_path / "given" / f"{row:06d}.png")
        assert meta["init_noise_row"] == row and meta["init_noise_sha256"] == file_sha256(noise)
    one = ddpm("sample", tiny_pipeline_dir, "--init-noise", noise, "--init-noise-row", 1, *DDIM, "-o", tmp_path / "one.png")
    assert one.returncode == 0 and np.array_equal(pixels(tmp_path / "one.png"), pixels(tmp_path / "seeded" / "000006.png"))


def test_bad_init_noise_is_refused_in_one_line(tiny_pipeline_dir, sd_dir, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    cases = {
        "missing": (tmp_path / "none.safetensors", [], "no such file"),
        "unreadable": (garbage, [], "cannot read"),
        "wrong shape": (seeded_file(tmp_path / "s.safetensors", tiny_pipeline_dir, [1], (3, 8, 8)), [], "shape"),
        "another model": (seeded_file(tmp_path / "m.safetensors", sd_dir, [1]), [], "made for"),
        "more images than rows": (seeded_file(tmp_path / "r.safetensors", tiny_pipeline_dir, [1, 2]), ["-n", 3], "rows"),
        "row past the end": (tmp_path / "r.safetensors", ["--init-noise-row", 2], "no row 2"),
    }
    for name, (path, extra, words) in cases.items():
        out = tmp_path / name.replace(" ", "-")
        result = ddpm("sample", tiny_pipeline_dir, "--init-noise", path, *extra, *DDIM, "-o", out)
        assert result.returncode == 2, (name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr, (name, result.stderr)
        assert not out.exists() or not any(out.iterdir()), name


def test_interpolation_frames_strip_and_animation(tiny_pipeline_dir, tmp_path):
    """Frame 0 is seed 3's image, the last frame seed 17's (ddim is deterministic); the strip holds
    the frames in a row and the GIF has one frame each."""
    out = tmp_path / "frames"
    result = ddpm("sample", tiny_pipeline_dir, "--interpolate", "3,17", "--frames", 5, "--grid", "--animate", "gif",
                  *DDIM, "-o", out)
    assert result.returncode == 0, result.stderr
    assert ddpm("sample", tiny_pipeline_dir, "--seeds", "3,17", *DDIM, "-o", tmp_path / "ends").returncode == 0
    assert np.array_equal(pixels(out / "frame-000.png"), pixels(tmp_path / "ends" / "000003.png"))
    assert np.array_equal(pixels(out / "frame-004.png"), pixels(tmp_path / "ends" / "000017.png"))
    middle = pixels(out / "frame-002.png").astype(int)
    assert np.abs(middle - pixels(out / "frame-000.png")).mean() > 1 and np.abs(middle - pixels(out / "frame-004.png")).mean() > 1
    with Image.open(out / "animation.gif") as gif:
        assert gif.n_frames == 5
    assert Image.open(out / "grid.png").size == (5 * 16 + 4 * 2, 16)
    meta = read_png_metadata(out / "frame-002.png")
    assert meta["interpolate"] == "3,17" and meta["frame"] == 2 and meta["frames"] == 5


def test_interpolation_between_rows_and_its_refusals(tiny_pipeline_dir, tmp_path):
    noise = seeded_file(tmp_path / "n.safetensors", tiny_pipeline_dir, [8, 9])
    rows = ddpm("sample", tiny_pipeline_dir, "--init-noise", noise, "--interpolate", "row:1,8", "--frames", 3,
                "--animate", "webp", *DDIM, "-o", tmp_path / "rows")
    seeds = ddpm("sample", tiny_pipeline_dir, "--interpolate", "9,8", "--frames", 3, *DDIM, "-o", tmp_path / "seeds")
    assert rows.returncode == 0 and seeds.returncode == 0, rows.stderr + seeds.stderr
    for k in range(3):
        assert np.array_equal(pixels(tmp_path / "rows" / f"frame-{k:03d}.png"), pixels(tmp_path / "seeds" / f"frame-{k:03d}.png"))
    with Image.open(tmp_path / "rows" / "animation.webp") as webp:
        assert webp.n_frames == 3
    for extra, words in ((["--interpolate", "3"], "two ends"), (["--interpolate", "row:0,3"], "--init-noise"),
                         (["--frames", "4"], "--interpolate"), (["--interpolate", "3,4", "-n", "2"], "drop -n"),
                         (["--interpolate", "3,x"], "two ends")):
        result = ddpm("sample", tiny_pipeline_dir, *extra, *DDIM, "-o", tmp_path / "bad")
        assert result.returncode == 2 and words in result.stderr and not (tmp_path / "bad").exists(), (extra, result.stderr)


def test_txt2img_on_a_latent_text_model(sd_dir, pictures, tmp_path):
    """Stable Diffusion format: invert encodes with the VAE and takes --prompt; txt2img --init-noise
    rows equal to seeded noise give the --seed images; interpolation frames end on the seeds' images."""
    noise = tmp_path / "sd.safetensors"
    inverted = ddpm("invert", sd_dir, pictures / "a.png", "--prompt", "a cat", "--cfg", 1, "--steps", 3, "-o", noise)
    assert inverted.returncode == 0, inverted.stderr
    assert read_noise(noise).noise.shape == (1, 4, 8, 8) and read_noise(noise).settings["prompt"] == "a cat"
    seeded_file(tmp_path / "rows.safetensors", sd_dir, [4, 5], (4, 8, 8))
    common = ("a cat", *DDIM, "--cfg", 3)
    given = ddpm("txt2img", sd_dir, *common, "--init-noise", tmp_path / "rows.safetensors", "-o", tmp_path / "given")
    seeded = ddpm("txt2img", sd_dir, *common, "--seeds", "4,5", "-o", tmp_path / "seeded")
    frames = ddpm("txt2img", sd_dir, *common, "--interpolate", "4,5", "--frames", 3, "--grid", "-o", tmp_path / "frames")
    assert given.returncode == seeded.returncode == frames.returncode == 0, given.stderr + seeded.stderr + frames.stderr
    for row, seed in ((0, 4), (1, 5)):
        assert np.array_equal(pixels(tmp_path / "given" / f"a-cat-{row:06d}.png"),
                              pixels(tmp_path / "seeded" / f"a-cat-{seed:06d}.png"))
    assert np.array_equal(pixels(tmp_path / "frames" / "a-cat-frame-000.png"), pixels(tmp_path / "seeded" / "a-cat-000004.png"))
    assert np.array_equal(pixels(tmp_path / "frames" / "a-cat-frame-002.png"), pixels(tmp_path / "seeded" / "a-cat-000005.png"))
    assert Image.open(tmp_path / "frames" / "a-cat-grid.png").size == (3 * 16 + 2 * 2, 16)


def test_invert_refuses_bad_input_before_loading(tiny_pipeline_dir, pictures, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    out = tmp_path / "n.safetensors"
    out_exists = tmp_path / "exists.safetensors"
    out_exists.write_bytes(b"keep")
    for args, words in (((pictures / "a.png",), "-o"),
                        ((tmp_path / "none.png", "-o", out), "no such image"),
                        ((broken, "-o", out), "broken.png"),
                        ((pictures / "a.png", "-o", tmp_path / "n.npy"), ".safetensors"),
                        ((pictures / "a.png", "-o", out, "--cfg", 2), "--cfg"),
                        ((pictures / "a.png", "-o", out, "--class", "1"), "not class-conditional"),
                        ((pictures / "a.png", "-o", out_exists), "exists")):
        result = ddpm("invert", tiny_pipeline_dir, *args)
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and not out.exists(), (args, result.stderr)
    assert out_exists.read_bytes() == b"keep"
