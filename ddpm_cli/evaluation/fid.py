"""Fréchet Inception Distance (Heusel et al. 2017) between two image sets.

    FID = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

over the 2048-d pool features of the FID Inception-v3 (``inception.py``). Its weights are
pytorch-fid's file pt_inception-2015-12-05-6726825d.pth, found at --inception PATH, in
$DDPM_INCEPTION_WEIGHTS, or in torch's hub cache where pytorch-fid downloads it; nothing is
downloaded here. FID is biased upwards for small sample counts, so every result carries its counts.
Reference statistics (mean, covariance, count, which weights) are cached in an .npz file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddpm_cli.engine.io.atomic import atomic_output
from ddpm_cli.engine.errors import InputError, ModelError

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "DDPM_INCEPTION_WEIGHTS"


def find_weights(path: str | None = None) -> Path:
    """The Inception weights file: the given path, $DDPM_INCEPTION_WEIGHTS, or torch's hub cache."""
    candidates = [path, os.environ.get(WEIGHTS_ENV)]
    if path is None and not os.environ.get(WEIGHTS_ENV):
        candidates.append(str(Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME))
    for candidate in filter(None, candidates):
        file = Path(candidate).expanduser()
        if file.is_file():
            return file
        if candidate in (path, os.environ.get(WEIGHTS_ENV)):
            raise ModelError(f"Inception weights {file} not found; pass the path of {WEIGHTS_NAME}")
    raise ModelError(f"FID needs the Inception weights {WEIGHTS_NAME} (pytorch-fid's); none were found in "
                     f"{Path(torch.hub.get_dir()) / 'checkpoints'}: pass --inception PATH or set {WEIGHTS_ENV}")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def load_inception(path: Path, device: torch.device | str = "cpu"):
    """The FID network with the weights in ``path`` (a state dict: .pth read with weights_only, or .safetensors)."""
    from ddpm_cli.evaluation.inception import FIDInceptionV3

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and why, in one line
        raise ModelError(f"{path} could not be read as Inception weights ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from None
    model = FIDInceptionV3()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ModelError(f"{path} is not the FID Inception's weights ({len(missing)} missing, "
                         f"{len(unexpected)} unexpected tensors, e.g. {(missing + unexpected)[0]})")
    return model.to(device).eval().requires_grad_(False)


@dataclass
class Stats:
    """Feature mean and covariance of an image set, with its size and the weights that made them."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    weights: str

    def save(self, path: Path) -> None:
        with atomic_output(path, overwrite=True) as tmp, open(tmp, "wb") as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, count=self.count, weights=self.weights)

    @classmethod
    def load(cls, path: Path) -> Stats:
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(data["mu"], data["sigma"], int(data["count"]), str(data["weights"]))
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"{path} is not a statistics file from `ddpm eval fid` ({exc}); remove it") from None


def feature_stats(features: np.ndarray, weights: str) -> Stats:
    if features.shape[0] < 2:
        raise InputError("FID needs at least 2 images on each side")
    features = features.astype(np.float64)
    return Stats(features.mean(0), np.cov(features, rowvar=False), features.shape[0], weights)


@torch.no_grad()
def extract_features(model, batches: Iterable[torch.Tensor], on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """Pool features of image batches in [-1, 1] (greyscale is replicated to RGB)."""
    device = next(model.parameters()).device
    out, done = [], 0
    for batch in batches:
        x = (batch.float().to(device) + 1.0) / 2.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out.append(model.features(x).double().cpu().numpy())
        done += batch.shape[0]
        if on_batch is not None:
            on_batch(done)
    return np.concatenate(out) if out else np.zeros((0, 2048))


def frechet_distance(a: Stats, b: Stats) -> float:
    """FID between two Gaussians. Tr((S_1 S_2)^(1/2)) is the sum of the square roots of the eigenvalues
    of the symmetric S_1^(1/2) S_2 S_1^(1/2) (the same as those of S_1 S_2): two symmetric
    eigendecompositions, faster and steadier than a general matrix square root."""
    diff = a.mu - b.mu
    w, v = np.linalg.eigh(a.sigma)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = root @ b.sigma @ root
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    trace_covmean = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_covmean)

def image_stats(inception, images: torch.Tensor, batch_size: int, weights: str,
                on_batch: Callable[[int], None] | None = None) -> Stats:
    """Stats of uint8 images (N×C×H×W)."""
    batches = (images[i:i + batch_size].float() / 127.5 - 1.0 for i in range(0, images.shape[0], batch_size))
    return feature_stats(extract_features(inception, batches, on_batch), weights)
