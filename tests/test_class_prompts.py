"""txt2img on a class-conditional model: each prompt draws the class whose name is nearest in meaning
(sentence vectors of the built-in MiniLM encoder), exactly as `ddpm sample --class` draws it; a negative
prompt's nearest class replaces the null class of the unconditional branch."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_cli.engine.io.images import read_png_metadata
from ddpm_cli.engine.models.captions import CAPTIONS_FILE, CaptionIndex
from tests.test_cli import ddpm
from tests.test_cli_vocabulary import one_error_line
from tests.test_guidance import tiny_class_unet

NAMES = ["T-shirt/top", "Trouser", "Sneaker", "Bag", "Ankle boot"]
COMMON = ["--steps", 3, "--sampler", "ddim", "--cfg", 3, "--seed", 5]


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
    from diffusers import DDPMPipeline, DDPMScheduler

    folder = tmp_path_factory.mktemp("classes")
    DDPMPipeline(unet=tiny_class_unet(len(NAMES)), scheduler=DDPMScheduler()).save_pretrained(folder)
    (folder / "ddpm_model.json").write_text(json.dumps({"conditioning": "class", "class_names": NAMES}))
    return folder


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_a_prompt_draws_its_nearest_class_as_sample_class_does(class_model, tmp_path):
    drawn = ddpm("txt2img", class_model, "a white sneaker", *COMMON, "-o", tmp_path / "t")
    assert drawn.returncode == 0, drawn.stderr
    assert "'a white sneaker' draws the class 'Sneaker' (nearest in meaning, similarity 0.7" in drawn.stderr
    meta = read_png_metadata(tmp_path / "t" / "a-white-sneaker-000005.png")
    assert (meta["prompt"], meta["class_name"], meta["command"]) == ("a white sneaker", "Sneaker", "txt2img")
    sampled = ddpm("sample", class_model, "--class", "Sneaker", *COMMON, "-o", tmp_path / "s")
    assert sampled.returncode == 0, sampled.stderr
    np.testing.assert_array_equal(pixels(tmp_path / "t" / "a-white-sneaker-000005.png"),
                                  pixels(tmp_path / "s" / "000005.png"))

    shirt = ddpm("txt2img", class_model, "a shirt", *COMMON, "-o", tmp_path / "shirt")
    assert "draws the class 'T-shirt/top'" in shirt.stderr, shirt.stderr
    exact = ddpm("txt2img", class_model, "Bag", *COMMON, "-o", tmp_path / "bag")  # a class name: no message
    assert exact.returncode == 0 and "draws" not in exact.stderr, exact.stderr
    assert read_png_metadata(tmp_path / "bag" / "bag-000005.png")["class_name"] == "Bag"


def test_a_negative_prompt_steers_away_from_its_nearest_class(class_model, tmp_path):
    plain = ddpm("txt2img", class_model, "a leather handbag", *COMMON, "-o", tmp_path / "plain")
    away = ddpm("txt2img", class_model, "a leather handbag", *COMMON, "--negative-prompt", "a boot", "-o", tmp_path / "away")
    assert plain.returncode == 0 and away.returncode == 0, plain.stderr + away.stderr
    assert "'a leather handbag' draws the class 'Bag'" in plain.stderr
    assert "--negative-prompt 'a boot' steers away from the class 'Ankle boot'" in away.stderr
    image = "a-leather-handbag-000005.png"
    assert (pixels(tmp_path / "plain" / image) != pixels(tmp_path / "away" / image)).any()
    assert read_png_metadata(tmp_path / "away" / image)["negative_prompt"] == "a boot"


def test_class_names_come_from_the_folders_index_when_it_matches(class_model, tmp_path):
    """A stored index of other names (or none) is not used: the names are encoded when needed. With a stored
    index, the encoder loads only for a prompt that is no class name."""
    from ddpm_cli.engine.models.captions import class_captions
    from ddpm_cli.engine.models.pipeline import load_pipeline

    pipeline = load_pipeline(str(class_model), device="cpu")
    built, _ = class_captions(pipeline)
    assert built.captions == NAMES and built.encoder == "minilm" and pipeline.prompt_encoder is not None
    built.save(class_model)
    try:
        fresh = load_pipeline(str(class_model), device="cpu")
        stored, encoder = class_captions(fresh)
        torch.testing.assert_close(stored.vectors, built.vectors, atol=2e-3, rtol=0)  # read back (fp16)
        assert stored.nearest(encoder, ["Bag"]) == [("Bag", 1.0)] and fresh.prompt_encoder is None  # no encoder needed
        assert stored.nearest(encoder, ["a leather handbag"])[0][0] == "Bag" and fresh.prompt_encoder is not None
        CaptionIndex(["Sneaker", "Bag"], built.vectors[2:4], "minilm").save(class_model)  # stale names
        assert class_captions(pipeline)[0].captions == NAMES
    finally:
        (class_model / CAPTIONS_FILE).unlink()


def test_prior_none_and_unconditional_models_are_refused(class_model, tiny_pipeline_dir, tmp_path):
    one_error_line(ddpm("txt2img", class_model, "a bag", "--prior", "none", "-o", tmp_path / "a"), 2,
                   r"is class-conditional: a prompt draws the class nearest in meaning .*--prior none needs a text")
    one_error_line(ddpm("txt2img", tiny_pipeline_dir, "a bag", "-o", tmp_path / "b"), 2,
                   "is neither text- nor class-conditional; use `ddpm sample")
    assert not [*tmp_path.rglob("*.png")]
