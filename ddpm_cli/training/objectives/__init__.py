"""The training objectives, by ``--task`` name. A new task is an :class:`Objective` subclass added here."""

from __future__ import annotations

from ddpm_cli.engine.errors import InputError
from ddpm_cli.training.objectives.autoencoder import AutoencoderObjective
from ddpm_cli.training.objectives.base import Batch, Draws, Objective
from ddpm_cli.training.objectives.diffusion import DiffusionObjective
from ddpm_cli.training.objectives.superres import SuperResObjective

OBJECTIVES: dict[str, type[Objective]] = {
    DiffusionObjective.name: DiffusionObjective,
    AutoencoderObjective.name: AutoencoderObjective,
    SuperResObjective.name: SuperResObjective,
}


def objective_class(task: str) -> type[Objective]:
    if task not in OBJECTIVES:
        raise InputError(f"unknown --task {task!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[task]


__all__ = ["OBJECTIVES", "AutoencoderObjective", "Batch", "DiffusionObjective", "Draws", "Objective",
           "SuperResObjective", "objective_class"]
