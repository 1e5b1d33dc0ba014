"""Training runs: resolve the options (or the run being resumed), clear or continue a run folder,
and train it with the :class:`~ddpm_cli.training.trainer.Trainer`, whatever the ``--task``."""

from __future__ import annotations

import shutil
from pathlib import Path

from ddpm_cli.engine.runtime import distributed
from ddpm_cli.engine.errors import InputError
from ddpm_cli.engine.models.resolve import MODEL_INFO_FILE
from ddpm_cli.training import checkpoints
from ddpm_cli.training.config import SUMMARY_FILE, TrainConfig
from ddpm_cli.training.ema_profiles import SNAPSHOT_DIR
from ddpm_cli.training.trainer import LOG_FILE, Events, Trainer, learning_rate

__all__ = ["LOG_FILE", "RUN_ENTRIES", "Trainer", "clear_run", "holds_run", "learning_rate", "make_trainer", "prepare",
           "train"]

RUN_ENTRIES = ("checkpoints", "samples", "unet", "vae", "scheduler", "model_index.json", MODEL_INFO_FILE, SUMMARY_FILE, LOG_FILE,
               "pytorch_lora_weights.safetensors", "ddpm_lora.json", "tensorboard", "text_encoder", "tokenizer",
               SNAPSHOT_DIR)


def holds_run(run_dir: Path) -> bool:
    return bool(checkpoints.list_checkpoints(run_dir)) or (Path(run_dir) / SUMMARY_FILE).exists()


def clear_run(run_dir: Path) -> None:
    """Remove what a training run wrote in ``run_dir`` (and nothing else)."""
    for name in RUN_ENTRIES:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def prepare(options: dict, resume: str | None = None, overwrite: bool = False,
            on_event: Events | None = None) -> tuple[TrainConfig, Path | None]:
    """Resolve the options a user gave (None = not given) and the checkpoint to resume, if any.

    A resumed run keeps the options saved with its checkpoint, except those in ``RESUMABLE``.
    ``--resume latest`` skips damaged checkpoints with a ``warning`` event for each. An existing
    run is refused unless ``overwrite`` (then its files are removed) or ``resume``.
    """
    if resume and overwrite:
        raise InputError("--resume and --overwrite cannot be given together")
    run_dir = Path(options.get("output") or TrainConfig.output)
    if resume:
        warn = None
        if on_event is not None and distributed.world().main:  # under torchrun, one process warns
            warn = lambda message: on_event({"kind": "warning", "message": message})  # noqa: E731
        checkpoint = checkpoints.resolve_resume(run_dir, resume, warn)
        return TrainConfig.from_options(options, checkpoints.read_state(checkpoint)["config"]), checkpoint
    config = TrainConfig.from_options(options)
    if config.init_from:  # the source model's architecture, schedule and conditioning
        from ddpm_cli.training.source import inherit

        inherit(config, {key for key, value in options.items() if value is not None})
        config.validate()
    if holds_run(run_dir):
        if not overwrite:
            raise InputError(f"{run_dir} already holds a training run; pass --resume latest to continue it, "
                             "--overwrite to start it over, or choose another -o")
        if distributed.world().main:  # under torchrun, one process clears
            clear_run(run_dir)
    return config, None


def make_trainer(config: TrainConfig, checkpoint: Path | None = None, on_event: Events | None = None) -> Trainer:
    """The trainer of a run; its objective is the config's --task."""
    return Trainer(config, checkpoint, on_event)


def train(options: dict, resume: str | None = None, on_event: Events | None = None) -> dict:
    """Train (or resume) the run the options describe; return its summary."""
    config, checkpoint = prepare(options, resume, on_event=on_event)
    return make_trainer(config, checkpoint, on_event).run()
