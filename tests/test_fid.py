"""FID: the Fréchet math against closed forms and scipy, and `ddpm eval fid` end to end with a
randomly initialised Inception (the real weights do not exist offline)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from ddpm_cli.evaluation.fid import Stats, feature_stats, frechet_distance
from ddpm_cli.evaluation.inception import FIDInceptionV3
from tests.test_cli import ddpm


def stats(features):
    return feature_stats(np.asarray(features), "w")


def test_identical_sets_give_zero_and_a_shift_gives_its_squared_length():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    assert frechet_distance(stats(features), stats(features)) == pytest.approx(0.0, abs=1e-6)
    shift = rng.normal(size=16)
    # Same covariance: the trace term vanishes and FID is |shift|^2.
    assert frechet_distance(stats(features), stats(features + shift)) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_one_dimensional_closed_form():
    a, b = Stats(np.array([1.0]), np.array([[4.0]]), 10, "w"), Stats(np.array([-0.5]), np.array([[0.25]]), 10, "w")
    assert frechet_distance(a, b) == pytest.approx(1.5**2 + (2.0 - 0.5) ** 2)


def test_matches_a_direct_scipy_computation():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 0.3
    a, b = stats(x), stats(y)
    root = linalg.sqrtm(a.sigma)
    expected = np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma + b.sigma - 2 * linalg.sqrtm(root @ b.sigma @ root).real)
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-6)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """Weights for the FID network's exact shapes, random but scaled so activations neither vanish nor explode."""
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(model.state_dict(), path)
    return path


def write_images(folder, seed, count, size=16, bright=False):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(128 if bright else 0, 256 if bright else 128, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.slow
def test_eval_fid_cli_with_a_random_network(random_inception, tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    dark, bright = write_images(tmp_path / "dark", 0, 6), write_images(tmp_path / "bright", 1, 6, bright=True)
    common = ["--inception", str(random_inception), "--format", "json", "-b", "6"]
    same = ddpm("eval", "fid", dark, "--ref", dark, *common)
    assert same.returncode == 0, same.stderr
    same = json.loads(same.stdout)
    other = ddpm("eval", "fid", dark, "--ref", bright, *common)
    assert other.returncode == 0, other.stderr
    other = json.loads(other.stdout)
    assert same["images"] == 6 and same["ref_images"] == 6
    assert abs(same["fid"]) < 1e-3 * other["fid"] and other["fid"] > 0
    cached = ddpm("eval", "fid", dark, "--ref", bright, *common)
    assert "reference statistics from" in cached.stderr and json.loads(cached.stdout)["fid"] == pytest.approx(other["fid"])
    from_stats = ddpm("eval", "fid", dark, "--ref", other["ref_stats"], *common)
    assert json.loads(from_stats.stdout)["fid"] == pytest.approx(other["fid"])
    model = ddpm("eval", "fid", tiny_pipeline_dir, "--ref", bright, "-n", "4", "--steps", "2", *common)
    assert model.returncode == 0, model.stderr
    result = json.loads(model.stdout)
    assert result["images"] == 4 and result["steps"] == 2 and result["fid"] > 0


def test_missing_or_wrong_weights_are_one_line_errors(tmp_path):
    folder = write_images(tmp_path / "imgs", 0, 2)
    missing = ddpm("eval", "fid", folder, "--ref", folder, "--inception", tmp_path / "nope.pth")
    assert missing.returncode == 3 and len(missing.stderr.strip().splitlines()) == 1
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    refused = ddpm("eval", "fid", folder, "--ref", folder, "--inception", wrong)
    assert refused.returncode == 3 and "not the FID Inception" in refused.stderr
