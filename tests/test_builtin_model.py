"""The built-in model is a trained model: its samples look like padded Fashion-MNIST, not noise."""

import numpy as np

from ddpm_cli.engine.models.resolve import builtin_models
from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch
from ddpm_cli.engine.models.pipeline import load_pipeline


def test_builtin_fashion_mnist_samples_have_black_padding_and_content():
    assert "fashion-mnist" in builtin_models()
    pipeline = load_pipeline("fashion-mnist", device="cpu")
    images = sample_batch(pipeline, list(range(8)), SamplerSettings("dpmpp-2m", 15)).numpy()
    assert images.shape == (8, 1, 32, 32)
    pixels = (images + 1) * 127.5
    border = np.concatenate([pixels[..., :2, :].ravel(), pixels[..., -2:, :].ravel(),
                             pixels[..., :, :2].ravel(), pixels[..., :, -2:].ravel()])
    centre = pixels[..., 8:24, 8:24]
    # Fashion-MNIST was padded with black: a trained model leaves the border black and draws in the middle.
    assert border.mean() < 10
    assert centre.mean() > 40
    assert np.std([image.mean() for image in pixels]) > 5  # different garments, not one template
