"""The training objectives, by ``--task`` name, and for ``--task ddpm`` by ``--objective`` (its
parameterisation and loss). A new task or objective is an :class:`Objective` subclass added here."""

from __future__ import annotations

from ddpm_cli.engine.errors import InputError
from ddpm_cli.training.objectives.autoencoder import AutoencoderObjective
from ddpm_cli.training.objectives.base import Batch, Draws, Objective
from ddpm_cli.training.objectives.diffusion import DiffusionObjective
from ddpm_cli.training.objectives.edm import EDMObjective
from ddpm_cli.training.objectives.superres import SuperResObjective

OBJECTIVES: dict[str, type[Objective]] = {
    DiffusionObjective.name: DiffusionObjective,
    AutoencoderObjective.name: AutoencoderObjective,
    SuperResObjective.name: SuperResObjective,
}
# --objective of --task ddpm: DDPM's (Ho et al. 2020, with its variants) or EDM's (Karras et al. 2022).
DIFFUSION_OBJECTIVES: dict[str, type[Objective]] = {"ddpm": DiffusionObjective, "edm": EDMObjective}


def objective_class(task: str, objective: str = "ddpm") -> type[Objective]:
    if task not in OBJECTIVES:
        raise InputError(f"unknown --task {task!r}; choose one of {', '.join(OBJECTIVES)}")
    if task == DiffusionObjective.name:
        if objective not in DIFFUSION_OBJECTIVES:
            raise InputError(f"unknown --objective {objective!r}; choose one of {', '.join(DIFFUSION_OBJECTIVES)}")
        return DIFFUSION_OBJECTIVES[objective]
    return OBJECTIVES[task]


__all__ = ["DIFFUSION_OBJECTIVES", "OBJECTIVES", "AutoencoderObjective", "Batch", "DiffusionObjective", "Draws",
           "EDMObjective", "Objective", "SuperResObjective", "objective_class"]
