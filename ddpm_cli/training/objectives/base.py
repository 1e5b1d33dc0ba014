"""What a training task is to the Trainer: an objective.

The Trainer owns everything a run shares (data, optimiser, EMA, mixed precision, DDP, compile,
checkpoints, resume, the random draws); an objective only says what to train and how to score
it: ``build_model()`` the module to train (what is checkpointed, averaged and exported),
``trainable(model)`` the module whose forward the loss runs (the Trainer wraps it in DDP and
compiles it), ``loss(network, batch, draws)``, ``export(run_dir, ema_model)`` and
``preview(run_dir, ema_model, step)``; an objective with training state of its own (a loss
history) returns it from ``state_dict()`` and it is checkpointed with the run. The loss sees only
``network``, the wrapped forward, so under torchrun every gradient goes through DDP's averaging.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddpm_cli.engine.runtime.distributed import World
from ddpm_cli.training.config import TrainConfig

OBJECTIVE_STATE_FILE = "objective.safetensors"  # a checkpoint's file of Objective.state_dict(), when there is one
Network = Callable[..., object]  # the wrapped forward: DDP under torchrun, compiled with --compile, under autocast


@dataclass
class Batch:
    """This process's rows of one global micro-batch: images in [-1, 1] (or latents) on the device,
    and the keyword arguments of their conditioning (class labels, caption embeddings)."""

    images: torch.Tensor
    conditioning: dict = field(default_factory=dict)


class Draws:
    """The random draws of a global micro-batch. Every process draws the values of the whole global
    batch from the run's generator, alike, and keeps its own rows, so N processes train what one
    process does on the same global batch, and a resumed run draws what it would have."""

    def __init__(self, generator: torch.Generator, device: torch.device, world: World):
        self.generator, self.device, self.world = generator, device, world

    def _global(self, rows: int) -> tuple[int, slice]:
        total = rows * self.world.size
        return total, self.world.shard(total)

    def timesteps(self, rows: int, count: int) -> torch.Tensor:
        """One timestep per row, uniform on 0 .. count - 1."""
        total, mine = self._global(rows)
        return torch.randint(0, count, (total,), generator=self.generator, device=self.device)[mine]

    def categorical(self, rows: int, probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One index per row drawn from ``probabilities`` (with replacement): (this process's rows, the
        global batch's)."""
        total, mine = self._global(rows)
        drawn = torch.multinomial(probabilities, total, replacement=True, generator=self.generator)
        return drawn[mine], drawn

    def normal(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Standard normal noise of ``shape`` (this process's rows first), float32."""
        total, mine = self._global(shape[0])
        return torch.randn((total, *shape[1:]), generator=self.generator, device=self.device)[mine]


class Objective:
    """One training task (``--task``). Built with the run's resolved config, its data set, the device
    and, for a latent run, the VAE; ``class_names`` and ``captions`` tell the data feed what
    conditioning to deliver (None: none)."""

    name = ""

    def __init__(self, config: TrainConfig, dataset, device: torch.device, vae: torch.nn.Module | None = None,
                 on_event: Callable[[dict], None] | None = None):
        self.config, self.dataset, self.device, self.vae = config, dataset, device, vae
        self.on_event = on_event or (lambda event: None)
        self.class_names: list[str] | None = None
        self.captions = None

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def trainable(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose forward the loss calls; by default the model itself."""
        return model

    def loss(self, network: Network, batch: Batch, draws: Draws) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The objective's own training state, saved with every checkpoint and restored on resume (the
        loss history of --timestep-sampler loss-second-moment); none by default."""
        return {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned."""

    def validation_loss(self, network: Network, batch: Batch, noise: torch.Tensor) -> dict[int, float]:
        """The loss on held-out ``batch`` at fixed timesteps with fixed ``noise``: {timestep: loss}."""
        raise NotImplementedError

    def export(self, run_dir: Path, ema_model: torch.nn.Module) -> None:
        raise NotImplementedError

    def preview(self, run_dir: Path, ema_model: torch.nn.Module, step: int) -> Path:
        """Write a sample grid of the EMA model at ``step``; return its path."""
        raise NotImplementedError

    def first_images(self, count: int) -> torch.Tensor:
        """The data set's first ``count`` images, center-cropped, in [-1, 1] (for previews)."""
        from ddpm_cli.data.batches import crop_and_flip

        count = min(count, len(self.dataset))
        images = [self.dataset.load(i) for i in range(count)]
        return crop_and_flip(images, self.config.image_size, True, False, torch.Generator()).float() / 127.5 - 1.0


def grid_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "samples" / f"step-{step:07d}.png"
