"""The built-in text-conditional model (`ddpm txt2img` without -m) draws what it is asked for: for a
handful of training captions, each generated image is closer to its own emoji than to the others."""

import numpy as np
import torch
from PIL import Image

from ddpm_cli.engine.checkpoint import builtin_models
from ddpm_cli.engine.generate import SamplerSettings, sample_batch
from ddpm_cli.engine.pipeline import Condition, load_pipeline
from ddpm_cli.training.captions import load_emoji
from tests.test_cli import ddpm

CAPTIONS = ["red apple", "cat face", "frog face", "evergreen tree", "purple heart", "sun with face", "earth globe americas",
            "broccoli"]


def test_generated_emoji_are_closest_to_their_own_caption():
    assert "emoji" in builtin_models()
    pipeline = load_pipeline("emoji", device="cpu")
    images, captions = load_emoji(32)
    references = images[[captions.index(c) for c in CAPTIONS]].float() / 127.5 - 1
    generated = torch.cat([sample_batch(pipeline, [0], SamplerSettings("dpmpp-2m", 30), condition=Condition(prompt=c),
                                        cfg=7.5) for c in CAPTIONS])
    distances = torch.cdist(generated.flatten(1), references.flatten(1))
    print("nearest reference per caption:", [CAPTIONS[k] for k in distances.argmin(1).tolist()])
    assert distances.argmin(1).tolist() == list(range(len(CAPTIONS)))
    # and among all ~1,280 emoji, each image's own is typically among the nearest few percent
    everything = torch.cdist(generated.flatten(1), (images.float() / 127.5 - 1).flatten(1))
    own = everything[range(len(CAPTIONS)), [captions.index(c) for c in CAPTIONS]]
    ranks = (everything < own[:, None]).sum(1)
    print("rank of the own emoji among all:", dict(zip(CAPTIONS, ranks.tolist())))
    assert ranks.median() < len(captions) * 0.05


def test_txt2img_uses_the_builtin_model_by_default(tmp_path):
    result = ddpm("txt2img", "a kitten", "-n", 2, "-o", tmp_path)
    assert result.returncode == 0, result.stderr
    paths = result.stdout.split()
    assert [p.rsplit("/", 1)[1] for p in paths] == ["a-kitten-000000.png", "a-kitten-000001.png"]
    image = np.array(Image.open(paths[0]))
    assert image.shape == (32, 32, 3) and image.std() > 10
    assert "ddpm: emoji:" in result.stderr
