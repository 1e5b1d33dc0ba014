"""--seeds LIST, --seed random and --grid on every generating command (sample, txt2img, inpaint, upscale)."""

import filecmp

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_cli.engine.io.images import read_png_metadata
from tests.test_cli import ddpm


@pytest.fixture(scope="module")
def ldm_upscaler(tmp_path_factory):
    """A tiny random LDMSuperResolutionPipeline (x2) and an 8x8 input for it."""
    from diffusers import DDIMScheduler, LDMSuperResolutionPipeline, UNet2DModel, VQModel

    folder = tmp_path_factory.mktemp("ldm-sr")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=6, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    vqvae = VQModel(block_out_channels=(32, 64), latent_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32)
    LDMSuperResolutionPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler(clip_sample=False)).save_pretrained(folder / "m")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / "low.png")
    return folder / "m", folder / "low.png"


@pytest.fixture(scope="module")
def hole(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hole")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "img.png")
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder / "img.png", folder / "mask.png"


def commands(tiny_pipeline_dir, sd_dir, hole, ldm_upscaler):
    """Each generating command (its arguments, few steps) and the name of the file seed s makes."""
    image, mask = hole
    model, low = ldm_upscaler
    return {
        "sample": (["sample", tiny_pipeline_dir, "--steps", 3, "--sampler", "ddpm"], "{:06d}.png"),
        "txt2img": (["txt2img", sd_dir, "a red cat", "--steps", 3, "--sampler", "ddpm"], "a-red-cat-{:06d}.png"),
        "inpaint": (["inpaint", tiny_pipeline_dir, "--image", image, "--mask", mask, "--steps", 3], "img-{:06d}.png"),
        "upscale": (["upscale", model, low, "--steps", 3, "--sampler", "ddpm"], "low-x2-{:06d}.png"),
    }


@pytest.mark.parametrize("command", ["sample", "txt2img", "inpaint", "upscale"])
def test_seed_list_equals_one_run_per_seed_and_grid(command, tiny_pipeline_dir, sd_dir, hole, ldm_upscaler, tmp_path):
    args, name = commands(tiny_pipeline_dir, sd_dir, hole, ldm_upscaler)[command]
    # -b 1: one image per network call in both runs, so no batched kernel rounds differently.
    listed = ddpm(*args, "--seeds", "3,17", "-b", 1, "-o", tmp_path / "list", "--grid", "-q")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [str(tmp_path / "list" / name.format(s)) for s in (3, 17)] + \
        [str(tmp_path / "list" / "grid.png")]
    for seed in (3, 17):
        alone = ddpm(*args, "--seed", seed, "-n", 1, "-o", tmp_path / f"s{seed}", "-q")
        assert alone.returncode == 0, alone.stderr
        assert filecmp.cmp(tmp_path / "list" / name.format(seed), tmp_path / f"s{seed}" / name.format(seed),
                           shallow=False)
    a, b = (np.asarray(Image.open(tmp_path / "list" / name.format(s))) for s in (3, 17))
    assert not np.array_equal(a, b)
    grid = Image.open(tmp_path / "list" / "grid.png")
    assert grid.width > a.shape[1] and read_png_metadata(tmp_path / "list" / "grid.png")["images"] == 2


def test_seed_ranges_random_seed_and_refusals(tiny_pipeline_dir, tmp_path):
    base = ["sample", tiny_pipeline_dir, "--steps", 2, "--sampler", "ddim"]
    ranged = ddpm(*base, "--seeds", "0-2, 10", "-o", tmp_path / "r", "-q")
    assert ranged.returncode == 0, ranged.stderr
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [f"{s:06d}.png" for s in (0, 1, 2, 10)]

    drawn = ddpm(*base, "--seed", "random", "-n", 2, "-o", tmp_path / "random")
    assert drawn.returncode == 0, drawn.stderr
    lines = [line for line in drawn.stderr.splitlines() if "(random)" in line]
    assert len(lines) == 1 and lines[0].startswith("ddpm: seed ")
    seed = int(lines[0].split()[2])
    assert drawn.stdout.splitlines() == [str(tmp_path / "random" / f"{s:06d}.png") for s in (seed, seed + 1)]
    assert read_png_metadata(tmp_path / "random" / f"{seed + 1:06d}.png")["seed"] == seed + 1
    again = ddpm(*base, "--seed", seed, "-n", 2, "-o", tmp_path / "again", "-q")  # the stored seed re-creates it
    assert again.returncode == 0
    assert filecmp.cmp(tmp_path / "random" / f"{seed:06d}.png", tmp_path / "again" / f"{seed:06d}.png", shallow=False)

    for extra, message in [(("--seeds", "3", "-n", 2), "drop -n/--num-images"),
                           (("--seeds", "3", "--seed", 0), "drop --seed"),
                           (("--seeds", "3,3"), "lists 3 twice"),
                           (("--seeds", "5-2"), "runs backwards"),
                           (("--seeds", ","), "--seeds is empty"),
                           (("--seeds", "a"), "--seeds takes a whole number"),
                           (("--seed", "-1"), "between 0 and"),
                           (("--seed", "lucky"), "'random'")]:
        refused = ddpm(*base, *extra, "-o", tmp_path / "no")
        assert refused.returncode == 2, (extra, refused.stderr)
        assert refused.stderr.count("\n") == 1 and message in refused.stderr, (extra, refused.stderr)
    assert not (tmp_path / "no").exists()
