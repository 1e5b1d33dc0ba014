"""`ddpm replay`: an image made again from its metadata is the same file, byte for byte; --set changes
one setting; what cannot be replayed exactly is refused in one line before anything is written."""

import hashlib
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from ddpm_cli.engine.io.images import read_png_metadata
from ddpm_cli.engine.models import fingerprint
from tests.test_cli import ddpm


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A fresh weights-hash cache per test (the CLI calls inherit the environment)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "ddpm-cli" / "sha256"


def png(array, path):
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


def pixels(path):
    return np.asarray(Image.open(path), dtype=int)


def one_line_error(result, code=2):
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stderr.startswith("ddpm: error:") and result.stderr.count("\n") == 1, result.stderr


def test_sample_replays_byte_identical_and_set_changes_one_setting(tiny_pipeline_dir, tmp_path):
    made = ddpm("sample", tiny_pipeline_dir, "--sampler", "ddpm", "--steps", 4, "--seed", 20, "-n", 3, "-b", 3,
                "-o", tmp_path / "made", "-q")
    assert made.returncode == 0, made.stderr
    original = tmp_path / "made" / "000021.png"
    meta = read_png_metadata(original)
    assert meta["command"] == "sample" and meta["device"] == "cpu" and meta["dtype"] == "float32"
    weights = tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert meta["model_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()

    # made in a batch of 3, replayed alone: images do not depend on the batch (batch size is not recorded)
    again = ddpm("replay", original, "-o", tmp_path / "again", "-q")
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == [str(tmp_path / "again" / "000021.png")]
    assert (tmp_path / "again" / "000021.png").read_bytes() == original.read_bytes()

    more = ddpm("replay", original, "-o", tmp_path / "more", "--set", "steps=8", "-q")
    assert more.returncode == 0, more.stderr
    changed = read_png_metadata(tmp_path / "more" / "000021.png")
    assert changed == {**meta, "steps": 8}
    assert not np.array_equal(pixels(tmp_path / "more" / "000021.png"), pixels(original))

    ddim = ddpm("replay", original, "-o", tmp_path / "ddim", "--set", "sampler=ddim", "-q")
    assert ddim.returncode == 0, ddim.stderr
    changed = read_png_metadata(tmp_path / "ddim" / "000021.png")
    # the ddpm sampler's option (variance) and usual spacing go; ddim's come in
    assert (changed["sampler"], changed["eta"], changed["steps"], "variance" in changed) == ("ddim", 0.0, 4, False)
    assert (changed["batch_size"], changed["batch_index"]) == (3, 1)  # made again in a batch like its own
    direct = ddpm("sample", tiny_pipeline_dir, "--sampler", "ddim", "--steps", 4, "--seeds", "20-22", "-b", 3,
                  "-o", tmp_path / "direct", "-q")
    assert direct.returncode == 0, direct.stderr
    assert (tmp_path / "ddim" / "000021.png").read_bytes() == (tmp_path / "direct" / "000021.png").read_bytes()
    assert sorted(p.name for p in (tmp_path / "ddim").iterdir()) == ["000021.png"]  # the batch's others are gone

    # never over an existing file without --overwrite, the original included
    refused = ddpm("replay", original, "-o", tmp_path / "made")
    one_line_error(refused)
    assert original.read_bytes() == (tmp_path / "again" / "000021.png").read_bytes()


def test_txt2img_replays_byte_identical(sd_dir, tmp_path):
    made = ddpm("txt2img", "--negative-prompt", "blue", "--cfg", 4, "--steps", 3, "--seed", 7, "--width", 32,
                "--height", 16, "-o", tmp_path / "made", "-q", "--", sd_dir, "-a red cat")  # a prompt like a flag
    assert made.returncode == 0, made.stderr
    original = tmp_path / "made" / "a-red-cat-000007.png"
    meta = read_png_metadata(original)
    assert (meta["command"], meta["prompt"], meta["size"]) == ("txt2img", "-a red cat", "32x16")
    again = ddpm("replay", original, "-o", tmp_path / "again", "-q")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / original.name).read_bytes() == original.read_bytes()
    other = ddpm("replay", original, "-o", tmp_path / "other", "--set", "prompt=a dog", "-q")
    assert other.returncode == 0, other.stderr
    assert read_png_metadata(tmp_path / "other" / original.name) == {**meta, "prompt": "a dog"}


def test_inpaint_replays_byte_identical_and_checks_its_inputs(tiny_pipeline_dir, tmp_path):
    rng = np.random.default_rng(0)
    image = png(rng.integers(0, 256, (16, 16, 3)), tmp_path / "photo.png")
    hole = np.zeros((16, 16), np.uint8)
    hole[4:12, 4:12] = 255
    mask = png(hole, tmp_path / "hole.png")
    made = ddpm("inpaint", tiny_pipeline_dir, "--image", image, "--mask", mask, "--invert-mask", "--steps", 3,
                "--seed", 4, "-o", tmp_path / "made", "-q")
    assert made.returncode == 0, made.stderr
    original = tmp_path / "made" / "photo-000004.png"
    meta = read_png_metadata(original)
    assert meta["command"] == "inpaint" and meta["invert_mask"] is True
    assert meta["mask_sha256"] == hashlib.sha256(mask.read_bytes()).hexdigest()
    again = ddpm("replay", original, "-o", tmp_path / "again", "-q")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / original.name).read_bytes() == original.read_bytes()

    hole[0, 0] = 255  # the mask changed since: refused, nothing written
    png(hole, mask)
    changed = ddpm("replay", original, "-o", tmp_path / "changed")
    one_line_error(changed)
    assert "changed" in changed.stderr and not (tmp_path / "changed").exists()
    kept = ddpm("replay", original, "-o", tmp_path / "kept", "--set", f"mask={mask}", "-q")  # on purpose
    assert kept.returncode == 0, kept.stderr
    assert read_png_metadata(tmp_path / "kept" / original.name)["mask_sha256"] != meta["mask_sha256"]
    mask.unlink()
    missing = ddpm("replay", original, "-o", tmp_path / "missing")
    one_line_error(missing)
    assert "missing" in missing.stderr and not (tmp_path / "missing").exists()


def test_bad_input_is_one_line_and_writes_nothing(tiny_pipeline_dir, tmp_path):
    plain = png(np.zeros((8, 8)), tmp_path / "plain.png")
    no_meta = ddpm("replay", plain, "-o", tmp_path / "out")
    one_line_error(no_meta)
    assert "no ddpm metadata" in no_meta.stderr

    made = ddpm("sample", tiny_pipeline_dir, "--steps", 2, "-n", 2, "--grid", "-o", tmp_path / "made", "-q")
    assert made.returncode == 0, made.stderr
    unknown = ddpm("replay", tmp_path / "made" / "000000.png", "-o", tmp_path / "out", "--set", "colour=red")
    one_line_error(unknown)
    assert "--set colour" in unknown.stderr and "steps" in unknown.stderr
    grid = ddpm("replay", tmp_path / "made" / "grid.png", "-o", tmp_path / "out")
    one_line_error(grid)
    both = ddpm("replay", tmp_path / "made" / "000000.png", plain, "-o", tmp_path / "out")  # the first is fine
    one_line_error(both)
    missing = ddpm("replay", tmp_path / "nowhere.png", "-o", tmp_path / "out")
    one_line_error(missing)
    assert not (tmp_path / "out").exists()


def test_changed_weights_warn_in_one_line(tiny_pipeline_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    made = ddpm("sample", model, "--steps", 2, "-n", 1, "-o", tmp_path / "made", "-q")
    assert made.returncode == 0, made.stderr
    from diffusers import UNet2DModel
    import torch

    unet = UNet2DModel.from_pretrained(model / "unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)
    unet.save_pretrained(model / "unet")
    again = ddpm("replay", tmp_path / "made" / "000000.png", "-o", tmp_path / "again")
    assert again.returncode == 0, again.stderr
    warnings = [line for line in again.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "changed since" in warnings[0]
    assert (tmp_path / "again" / "000000.png").read_bytes() != (tmp_path / "made" / "000000.png").read_bytes()


def test_weights_are_hashed_once_per_file(tmp_path, cache, monkeypatch):
    (tmp_path / "unet").mkdir()
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"weights" * 1000)
    calls = []
    real = fingerprint.file_sha256
    monkeypatch.setattr(fingerprint, "file_sha256", lambda path: calls.append(path) or real(path))
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert fingerprint.weights_sha256(tmp_path) == expected
    assert fingerprint.weights_sha256(tmp_path) == expected
    assert len(calls) == 1 and len(list(cache.iterdir())) == 1
    weights.write_bytes(b"other weights")
    os.utime(weights, ns=(0, 1))  # a new size and modification time: hashed again
    assert fingerprint.weights_sha256(tmp_path) == hashlib.sha256(b"other weights").hexdigest()
    assert len(calls) == 2
    (tmp_path / "unet" / "shard-2.safetensors").write_bytes(b"more")
    lines = "".join(f"{p.name} {hashlib.sha256(p.read_bytes()).hexdigest()}\n"
                    for p in sorted((tmp_path / "unet").iterdir()))
    assert fingerprint.weights_sha256(tmp_path) == hashlib.sha256(lines.encode()).hexdigest()
    snapshot = tmp_path / "hub" / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    assert fingerprint.hub_commit(snapshot) == "ab" * 20 and fingerprint.hub_commit(tmp_path) is None


def test_replay_makefile_one_target_per_image(tiny_pipeline_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    made = ddpm("sample", tiny_pipeline_dir, "--steps", 2, "-n", 1, "--grid", "-o", tmp_path / "in", "-q")
    assert made.returncode == 0, made.stderr
    args = ["make", "-f", str(root / "examples" / "replay.mk"), "-j2", f"IN={tmp_path / 'in'}",
            f"OUT={tmp_path / 'out'}", "SET=steps=3 sampler=ddim", f"DDPM={sys.executable} -m ddpm_cli"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=root)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000000.png"]  # not the grid
    meta = read_png_metadata(tmp_path / "out" / "000000.png")
    assert (meta["steps"], meta["sampler"], meta["seed"]) == (3, "ddim", 0)
    again = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=root)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout


def test_image_and_noise_starts_replay_byte_identical(tiny_pipeline_dir, tmp_path):
    """--init-image (with --resize), a row of --init-noise, and one frame of --interpolate."""
    rng = np.random.default_rng(1)
    start = png(rng.integers(0, 256, (24, 20, 3)), tmp_path / "start.png")  # another size: --resize
    steps = ["--steps", 3, "--sampler", "ddim", "-q"]
    runs = {
        "i2i": ["--init-image", start, "--strength", 0.5, "--resize", "--seed", 2, "-n", 2],
        "noise": ["--init-noise", tmp_path / "noise.safetensors", "--seed", 5, "-n", 2],
        "frames": ["--interpolate", "3,row:1", "--init-noise", tmp_path / "noise.safetensors", "--frames", 3,
                   "--seed", 9],
    }
    inverted = ddpm("invert", tiny_pipeline_dir, start, start, "--resize", "--steps", 3,
                    "-o", tmp_path / "noise.safetensors", "-q")
    assert inverted.returncode == 0, inverted.stderr
    for name, options in runs.items():
        made = ddpm("sample", tiny_pipeline_dir, *options, *steps, "-o", tmp_path / name)
        assert made.returncode == 0, made.stderr
    originals = [tmp_path / "i2i" / "000003.png", tmp_path / "noise" / "000006.png", tmp_path / "frames" / "frame-001.png"]
    metas = [read_png_metadata(path) for path in originals]
    assert metas[0]["resize"] is True and metas[0]["strength"] == 0.5
    assert metas[1]["init_noise_row"] == 1 and (metas[2]["frame"], metas[2]["seed"]) == (1, 10)
    again = ddpm("replay", *originals, "-o", tmp_path / "again", "-q")
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == [str(tmp_path / "again" / path.name) for path in originals]
    for path in originals:
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(p.name for p in originals)  # no frame left over


def test_upscale_and_hub_models_replay_byte_identical(tiny_pipeline_dir, tmp_path, monkeypatch):
    """An SR3-format upscaler (random, untrained), and a model read from the Hub cache, whose snapshot's
    commit is recorded and given back as --revision."""
    from diffusers import DDPMScheduler, UNet2DModel

    from tests.conftest import tiny_unet

    sr = tmp_path / "sr"
    unet = tiny_unet(channels=3, size=16)
    UNet2DModel(**{**unet.config, "in_channels": 6}).save_pretrained(sr / "unet")
    DDPMScheduler().save_pretrained(sr / "scheduler")
    (sr / "ddpm_model.json").write_text('{"task": "superres", "scale": 2}')
    low = png(np.random.default_rng(2).integers(0, 256, (8, 8, 3)), tmp_path / "low.png")
    made = ddpm("upscale", sr, low, "--steps", 3, "--seed", 1, "-o", tmp_path / "made", "-q")
    assert made.returncode == 0, made.stderr

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny"
    shutil.copytree(tiny_pipeline_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = ddpm("sample", "someone/tiny", "--steps", 2, "-n", 1, "-o", tmp_path / "made" / "hub.png", "-q")
    assert hub.returncode == 0, hub.stderr
    originals = [tmp_path / "made" / "low-x2-000001.png", tmp_path / "made" / "hub.png"]
    assert read_png_metadata(originals[0])["image_sha256"] == hashlib.sha256(low.read_bytes()).hexdigest()
    assert read_png_metadata(originals[1])["revision"] == commit
    again = ddpm("replay", *originals, "-o", tmp_path / "again", "-q")
    assert again.returncode == 0, again.stderr
    for path in originals:
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path


@pytest.mark.slow
def test_an_image_made_in_a_batch_is_made_again_in_one(tmp_path):
    """Batched kernels can round differently at another batch size (on the text-conditional model built in
    before, image 5 of a batch of 2 differed from the same seed made alone in 3 of 3072 values, by 1), so
    replay remakes an image in a batch as large, and its bytes are the same."""
    made = ddpm("txt2img", "emoji", "a red apple", "-n", 2, "--seed", 4, "--steps", 10, "-o", tmp_path / "made", "-q")
    assert made.returncode == 0, made.stderr
    original = tmp_path / "made" / "a-red-apple-000005.png"
    assert (read_png_metadata(original)["batch_size"], read_png_metadata(original)["batch_index"]) == (2, 1)
    again = ddpm("replay", original, "-o", tmp_path / "again", "-q")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again" / original.name).read_bytes() == original.read_bytes()
    alone = ddpm("replay", original, "-o", tmp_path / "alone", "--set", "batch_size=1", "-q")
    assert alone.returncode == 0, alone.stderr
    differing = int((pixels(tmp_path / "alone" / original.name) != pixels(original)).sum())
    print(f"made alone instead of in a batch of 2: {differing} of {pixels(original).size} values differ")
