"""Text-conditional models: guidance on prompt embeddings, training on a captioned folder, and
`ddpm txt2img` through the CLI (a tiny random BERT stands in for the pretrained encoder)."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw

from ddpm_cli.engine.io.images import read_png_metadata
from ddpm_cli.engine.models.pipeline import Condition, from_unet, text_kwargs
from ddpm_cli.engine.diffusion.schedule import NoiseSchedule
from ddpm_cli.engine.models.text import TextEncoder
from ddpm_cli.training.presets import build_unet, text_unet_config
from tests.test_cli import ddpm

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}


def captioned_folder(root):
    root.mkdir()
    lines = []
    for colour, rgb in COLOURS.items():
        for shape in ("square", "circle"):
            image = Image.new("RGB", (16, 16), "white")
            draw = ImageDraw.Draw(image)
            (draw.rectangle if shape == "square" else draw.ellipse)((3, 3, 12, 12), fill=rgb)
            name = f"{colour}-{shape}.png"
            image.save(root / name)
            lines.append(json.dumps({"file_name": name, "text": f"a {colour} {shape}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_text_guidance_uses_the_negative_prompt_as_the_unconditional_branch(tiny_bert_dir):
    encoder = TextEncoder.load(str(tiny_bert_dir), "cpu", max_length=8)
    torch.manual_seed(0)
    unet = build_unet(text_unet_config("tiny", 16, 3, encoder.hidden_size)).eval()
    pipeline = from_unet(unet, NoiseSchedule.create(), text_encoder=encoder)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def predict(prompt):
        hidden, mask = encoder.encode([prompt])
        with torch.no_grad():
            return unet(x, torch.full((2,), 300), **text_kwargs(hidden, mask, 2, torch.float32)).sample

    cond, negative = predict("a red square"), predict("blue")
    with torch.no_grad():
        guided = pipeline.denoiser(2, Condition(prompt="a red square", negative_prompt="blue"), 4.0)(x, 300)
        plain = pipeline.denoiser(2, Condition(prompt="a red square"), 1.0)(x, 300)
    torch.testing.assert_close(guided, negative + 4.0 * (cond - negative), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, cond)


@pytest.mark.slow
def test_train_on_captions_then_txt2img(tmp_path, tiny_bert_dir):
    data = captioned_folder(tmp_path / "data")
    run = tmp_path / "run"
    trained = ddpm("train", data, "--conditioning", "text", "--text-encoder", tiny_bert_dir, "--text-max-length", 8,
                   "--resolution", 16, "--max-steps", 12, "-b", 4, "--checkpoint-every", 12, "--num-workers", 0,
                   "-o", run, "-q")
    assert trained.returncode == 0, trained.stderr
    info = json.loads((run / "ddpm_model.json").read_text())
    assert info["conditioning"] == "text" and info["text_encoder"] == str(tiny_bert_dir) and info["max_length"] == 8
    assert json.loads((run / "unet" / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"

    out = tmp_path / "out"
    result = ddpm("txt2img", "a red square", "-m", run, "-n", 2, "--steps", 4, "--cfg", 3, "--negative-prompt", "blue",
                  "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(out / "a-red-square-000000.png"), str(out / "a-red-square-000001.png")]
    meta = read_png_metadata(out / "a-red-square-000001.png")
    assert (meta["prompt"], meta["negative_prompt"], meta["cfg"], meta["seed"]) == ("a red square", "blue", 3.0, 1)
    assert Image.open(out / "a-red-square-000000.png").size == (16, 16)

    prompts = subprocess.run([sys.executable, "-m", "ddpm_cli", "txt2img", "--from-file", "-", "-m", str(run),
                              "--steps", "3", "-o", str(out), "--width", "32", "--height", "16", "--format", "json"],
                             input="a blue circle\n# a comment\na green square sitting on the mat of the cat of the dog\n",
                             capture_output=True, text=True, timeout=300)
    assert prompts.returncode == 0, prompts.stderr
    document = json.loads(prompts.stdout)
    assert [image["prompt"] for image in document["images"]] == ["a blue circle", "a green square sitting on the mat of the cat of the dog"]
    assert Image.open(document["images"][0]["path"]).size == (32, 16)
    assert "dropped:" in prompts.stderr and "dog" in prompts.stderr  # the prompt was longer than 8 tokens

    wrong = ddpm("sample", run, "-n", 1, "-o", tmp_path / "s")
    assert wrong.returncode == 2 and "txt2img" in wrong.stderr
