"""Class-conditional training on real data: a classifier trained here recognises the requested class
in the samples far more often than chance, and more often at a higher guidance scale."""

import json

import torch

from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch
from ddpm_cli.engine.io.images import read_png_metadata
from ddpm_cli.engine.models.pipeline import Condition, load_pipeline
from ddpm_cli.data.sources import open_dataset
from tests.test_cli import ddpm


def train_classifier(resolution: int) -> torch.nn.Module:
    data = open_dataset("fashion-mnist", resolution)
    n = min(len(data), 20_000)
    x = data.images[:n].float() / 127.5 - 1
    y = torch.tensor(data.labels[:n])
    torch.manual_seed(0)
    classifier = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * (resolution // 4) ** 2, 10))
    optimizer = torch.optim.Adam(classifier.parameters(), 2e-3)
    for _ in range(3):
        order = torch.randperm(n)
        for i in range(0, n, 128):
            batch = order[i:i + 128]
            loss = torch.nn.functional.cross_entropy(classifier(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    test = open_dataset("fashion-mnist", resolution, split="test")
    with torch.no_grad():
        accuracy = (classifier(test.images.float() / 127.5 - 1).argmax(1) == torch.tensor(test.labels)).float().mean()
    assert accuracy > 0.75, f"the judging classifier itself is too weak ({accuracy:.2f})"
    return classifier.eval()


def test_class_conditional_samples_show_their_class_more_with_guidance(fashion_class_run, tmp_path):
    run = fashion_class_run
    assert json.loads((run / "ddpm_model.json").read_text())["class_names"][7] == "Sneaker"
    classifier = train_classifier(16)
    pipeline = load_pipeline(str(run), device="cpu")
    labels = [i % 10 for i in range(100)]
    accuracy = {}
    for scale in (0.0, 1.0, 3.0):
        images = sample_batch(pipeline, list(range(100)), SamplerSettings("dpmpp-2m", 20), condition=Condition(labels),
                              cfg=scale)
        with torch.no_grad():
            accuracy[scale] = (classifier(images).argmax(1) == torch.tensor(labels)).float().mean().item()
    print(f"class accuracy of samples by guidance scale: {accuracy}")
    assert accuracy[0.0] < 0.25  # unconditional samples: about chance (0.1) for a fixed label cycle
    assert accuracy[1.0] > 0.35
    assert accuracy[3.0] > accuracy[1.0]

    result = ddpm("sample", run, "--class", "sneaker", "--cfg", "3", "-n", 1, "--steps", 5, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    meta = read_png_metadata(tmp_path / "out" / "000000.png")
    assert (meta["class"], meta["class_name"], meta["cfg"]) == (7, "Sneaker", 3.0)
