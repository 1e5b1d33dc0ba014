"""Tests for ddpm_cli.engine.io.images: safe loading, tensors, grids, atomic PNG writing."""

from __future__ import annotations

import errno
import os
import struct
import zlib

import pytest
import torch
from PIL import Image

from ddpm_cli.engine.io import images as imageio
from ddpm_cli.engine.errors import InputError, ResourceError
from ddpm_cli.engine.io.images import (
    format_parameters,
    list_images,
    load_image,
    make_grid,
    pil_to_tensor,
    read_png_metadata,
    save_png,
    tensor_to_pil,
    tensor_to_uint8,
)

PARAMS = {"prompt": "a cat", "negative_prompt": "blurry", "steps": 50, "sampler": "ddim",
          "seed": 42, "size": (32, 32), "model": "google/ddpm-cifar10-32"}


def _tmp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- loading


def test_rgba_composited_on_white(tmp_path):
    img = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 128))
    img.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    r, g, b = out.getpixel((1, 0))
    assert r == 255 and 125 <= g <= 128 and g == b


def test_rgba_custom_background_and_grey_mode(tmp_path):
    Image.new("RGBA", (1, 1), (0, 0, 0, 0)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png", background=(0, 0, 255)).getpixel((0, 0)) == (0, 0, 255)
    grey = load_image(tmp_path / "a.png", mode="L")
    assert grey.mode == "L" and grey.getpixel((0, 0)) == 255


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 1), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    img.putpixel((1, 0), 1)
    img.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png")
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent red index → background
    assert out.getpixel((1, 0)) == (0, 255, 0)


def test_16bit_greyscale_rescaled_not_clipped(tmp_path):
    img = Image.new("I;16", (3, 1))
    for x, v in enumerate((65535, 32768, 0)):
        img.putpixel((x, 0), v)
    img.save(tmp_path / "g16.png")
    out = load_image(tmp_path / "g16.png", mode="L")
    assert [out.getpixel((x, 0)) for x in range(3)] == [255, 128, 0]
    assert load_image(tmp_path / "g16.png").getpixel((1, 0)) == (128, 128, 128)


def test_cmyk_converted_to_rgb(tmp_path):
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.tiff")
    out = load_image(tmp_path / "c.tiff")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 0, 0)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    r, g, b = load_image(tmp_path / "c.jpg").getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    Image.new("RGB", (20, 10), (10, 20, 30)).save(tmp_path / "o.jpg", exif=exif)
    with Image.open(tmp_path / "o.jpg") as raw:
        assert raw.size == (20, 10)
    assert load_image(tmp_path / "o.jpg").size == (10, 20)


def test_too_many_pixels_refused_before_decoding(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1) or real_load(self))
    with pytest.raises(InputError) as info:
        load_image(tmp_path / "big.png", max_pixels=1000)
    msg = str(info.value)
    assert "10000" in msg and "1000" in msg and "big.png" in msg
    assert "decompression bomb" in msg and "\n" not in msg
    assert decoded == []  # refused from the header alone


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_pillow_bomb_error_becomes_input_error(tmp_path):
    # Header claims 100000x100000 (far above Pillow's own limit); no real pixel data.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 10))
            + _chunk(b"IEND", b""))
    (tmp_path / "bomb.png").write_bytes(data)
    with pytest.raises(InputError, match="bomb.png.*decompression bomb"):
        load_image(tmp_path / "bomb.png", max_pixels=10**12)


def test_truncated_png_names_file(tmp_path):
    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:100])
    with pytest.raises(InputError, match="cut.png") as info:
        load_image(tmp_path / "cut.png")
    assert "\n" not in str(info.value)


def test_not_an_image_and_missing_file(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(InputError, match="notes.png"):
        load_image(tmp_path / "notes.png")
    with pytest.raises(InputError, match="nope.png.*not found"):
        load_image(tmp_path / "nope.png")


def test_list_images_recursive_sorted_skips_hidden(tmp_path):
    for rel in ("b.PNG", "a.jpg", "sub/c.webp", "sub/d.txt", ".hidden.png", ".git/e.png", "z.Bmp"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a.jpg", "b.PNG", "sub/c.webp", "z.Bmp"]
    with pytest.raises(InputError):
        list_images(tmp_path / "missing")


# --------------------------------------------------------------------------- tensors and grids


def test_tensor_pil_round_trip_exact():
    values = torch.arange(0, 256, dtype=torch.uint8)
    rgb = Image.fromarray(values.reshape(16, 16).repeat(3, 1, 1).permute(1, 2, 0).numpy(), "RGB")
    t = pil_to_tensor(rgb)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    assert t.min().item() == -1.0 and t.max().item() == 1.0
    assert tensor_to_pil(t).tobytes() == rgb.tobytes()
    grey = Image.fromarray(values.reshape(16, 16).numpy(), "L")
    back = tensor_to_pil(pil_to_tensor(grey))
    assert back.mode == "L" and back.tobytes() == grey.tobytes()


def test_tensor_to_uint8_clamps_and_rounds():
    x = torch.tensor([[[[-2.0, -1.0, 0.0, 1.0, 3.0]]]])
    assert tensor_to_uint8(x).tolist() == [[[[0, 0, 128, 255, 255]]]]
    with pytest.raises(Exception):
        tensor_to_uint8(torch.tensor([float("nan")]))


def test_make_grid_size_and_padding():
    images = [Image.new("RGB", (8, 8), (255, 255, 255)) for _ in range(5)]
    grid = make_grid(images, nrow=3, padding=2)
    assert grid.size == (3 * 8 + 2 * 2, 2 * 8 + 1 * 2)
    assert grid.getpixel((8, 0)) == (0, 0, 0)  # padding column is black
    assert grid.getpixel((10, 0)) == (255, 255, 255)  # second tile
    assert grid.getpixel((20, 12)) == (0, 0, 0)  # empty sixth cell
    square = make_grid(torch.zeros(4, 1, 8, 8), padding=0)
    assert square.size == (16, 16) and square.mode == "L"


# --------------------------------------------------------------------------- PNG output


def test_format_parameters():
    text = format_parameters(PARAMS)
    lines = text.split("\n")
    assert lines[0] == "a cat"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2] == ("Steps: 50, Sampler: ddim, Seed: 42, Size: 32x32, "
                        "Model: google/ddpm-cifar10-32")
    assert format_parameters({"seed": 1, "guidance_scale": 7.5}) == "Seed: 1, Guidance scale: 7.5"


def test_save_png_round_trip(tmp_path):
    img = Image.new("RGB", (4, 4), (1, 2, 3))
    out = save_png(img, tmp_path / "deep" / "er" / "s.png", PARAMS)
    assert out == tmp_path / "deep" / "er" / "s.png" and out.is_file()
    meta = read_png_metadata(out)
    assert meta == {**PARAMS, "size": [32, 32]}  # JSON turns the tuple into a list
    with Image.open(out) as back:
        assert "Seed: 42" in back.text["parameters"]
        assert back.getpixel((0, 0)) == (1, 2, 3)
    assert _tmp_files(out.parent) == []


def test_save_png_without_params_has_no_metadata(tmp_path):
    out = save_png(Image.new("L", (2, 2)), tmp_path / "n.png")
    assert read_png_metadata(out) == {}


def test_existing_file_refused_then_overwritten(tmp_path):
    target = tmp_path / "s.png"
    save_png(Image.new("RGB", (4, 4), (255, 0, 0)), target, {"seed": 1})
    before = target.read_bytes()
    with pytest.raises(InputError, match="--overwrite") as info:
        save_png(Image.new("RGB", (4, 4), (0, 255, 0)), target, {"seed": 2})
    assert "s.png" in str(info.value) and "--skip-existing" in str(info.value)
    assert target.read_bytes() == before
    save_png(Image.new("RGB", (4, 4), (0, 255, 0)), target, {"seed": 2}, overwrite=True)
    assert read_png_metadata(target) == {"seed": 2}
    with Image.open(target) as back:
        assert back.getpixel((0, 0)) == (0, 255, 0)
    assert _tmp_files(tmp_path) == []


def test_disk_full_raises_resource_error_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "s.png"
    save_png(Image.new("RGB", (4, 4), (255, 0, 0)), target, {"seed": 1})
    before = target.read_bytes()

    def full(src, dst):
        assert os.path.basename(src).startswith(".") and src.endswith(".tmp")
        assert os.path.exists(src)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(imageio.os, "replace", full)
    with pytest.raises(ResourceError, match="s.png") as info:
        save_png(Image.new("RGB", (4, 4)), target, {"seed": 2}, overwrite=True)
    assert info.value.exit_code == 4
    assert target.read_bytes() == before
    assert _tmp_files(tmp_path) == []


def test_interrupt_during_write_removes_temp_file(tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(imageio.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_png(Image.new("RGB", (4, 4)), tmp_path / "k.png")
    assert list(tmp_path.iterdir()) == []
