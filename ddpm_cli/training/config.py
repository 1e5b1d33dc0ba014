"""Resolved training options, validated once, saved with every checkpoint and the run summary.

Free of torch, so the CLI can show the defaults without importing it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ddpm_cli.engine.choices import (BETA_SCHEDULES, CONDITIONINGS, LR_SCHEDULES, MIXED_PRECISION, PREDICTION_TYPES,
                                     LOSSES, OBJECTIVES, TASKS, TEXT_EMBEDDINGS)

LORA_TARGETS = ("attention", "attention+conv")
from ddpm_cli.engine.errors import InputError
from ddpm_cli.training.presets import AUTOENCODER_PRESETS, PRESETS, check_architecture

SUMMARY_FILE = "ddpm_train.json"  # written in the run folder when a run finishes
# Options a resumed run may change; every other option comes from the run being resumed.
RESUMABLE = {"max_steps", "max_time", "epochs", "checkpoint_every", "keep_checkpoints", "sample_every", "device",
             "num_workers", "max_nonfinite", "compile", "log_with", "validate_every",
             "gradient_checkpointing"}
LOG_WITH = ("none", "tensorboard")
TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")


@dataclass
class TrainConfig:
    data: str = "fashion-mnist"
    output: str = "runs/ddpm"
    resolution: int | None = None  # the height (and width, unless `width`) in pixels
    width: int | None = None  # --resolution HxW: the width when it differs from the height
    channels: int | None = None
    center_crop: bool = True
    random_flip: bool = False
    model_size: str = "tiny"
    block_channels: list[int] | None = None  # --block-channels: the U-Net's widths per level, over the preset's
    layers_per_block: int | None = None  # residual blocks per level [default: the preset's]
    attention_resolutions: list[int] | None = None  # feature-map sizes that self-attend ([]: none) [default: the preset's]
    custom_unet_config: dict | None = None  # --unet-config FILE: a diffusers U-Net config, filled from the data
    schedule: str = "linear"
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False  # rescale the betas so that alpha_bar_T = 0 (Lin et al. 2024)
    num_train_timesteps: int = 1000
    max_steps: int | None = None
    max_time: float | None = None  # seconds of training (resumed runs count their earlier time); ends the run early
    epochs: int | None = None
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 2e-4
    lr_warmup: int | None = None
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    ema_profiles: bool = False  # also keep EDM2's two power EMAs and snapshot them (training/ema_profiles.py)
    ema_snapshot_every: int | None = None  # steps between their snapshots [default: the run's steps / 20]
    mixed_precision: str = "no"
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    sample_every: int | None = None
    device: str = "auto"
    num_workers: int | None = None
    max_nonfinite: int = 5
    compile: bool = False
    conditioning: str = "none"
    cond_drop: float = 0.1
    text_encoder: str = "minilm"
    text_max_length: int | None = None
    text_embedding: str = "tokens"
    task: str = "ddpm"
    objective: str = "ddpm"  # of --task ddpm: ddpm or edm (Karras et al. 2022; training/objectives/edm.py)
    sigma_data: float | None = None  # --objective edm: the data's standard deviation [default: 0.5]
    loss: str = "simple"
    learn_variance: bool = False
    vlb_weight: float = 0.001
    snr_gamma: float | None = None  # min-SNR-gamma loss weights (training/weighting.py); None: unweighted
    offset_noise: float = 0.0  # S: noise + S * N(0, 1) per (image, channel), the same on every pixel
    timestep_sampler: str = "uniform"  # or loss-second-moment (training/timestep_sampler.py)
    dropout: float | None = None  # in the U-Net's residual blocks [default: 0, or the --init-from model's]
    latent: str | None = None
    kl_weight: float = 1e-6
    scale: int | None = None
    init_from: str | None = None
    revision: str | None = None  # of an --init-from Hub id
    unet_config: dict | None = None  # the --init-from model's U-Net config (training/source.py)
    scheduler_config: dict | None = None  # and its scheduler config
    lora_rank: int | None = None  # train low-rank adapters only (training/lora.py)
    lora_alpha: float | None = None  # their scale is alpha / rank [default: alpha = rank]
    lora_targets: str = "attention"
    log_with: str = "none"  # none or tensorboard (event files under the run folder's tensorboard/)
    validation_split: float = 0.0  # share of DATA held out for the validation loss
    validate_every: int | None = None  # steps between validation losses [default: --checkpoint-every]
    gradient_checkpointing: bool = False  # recompute the U-Net's block activations in the backward pass

    @classmethod
    def from_options(cls, options: dict, saved: dict | None = None) -> TrainConfig:
        """Build from the options a user gave (None = not given), on top of a resumed run's saved ones."""
        given = {key: value for key, value in options.items() if value is not None}
        known = {f.name for f in fields(cls)}
        unknown = set(given) - known
        if unknown:
            raise InputError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        if saved is not None:
            for key, value in given.items():
                if key not in RESUMABLE and key != "output" and saved.get(key) != value:
                    flag = "--" + key.replace("_", "-")
                    what = f"{flag} {value} differs from the run being resumed ({saved.get(key)})"
                    if key == "width":  # --resolution HxW
                        what = f"--resolution's width {value} differs from the run being resumed ({saved.get(key)})"
                    elif key == "custom_unet_config":
                        what = "--unet-config gives another U-Net than the run being resumed"
                    raise InputError(f"{what}; a resumed run keeps its options except {', '.join(sorted(RESUMABLE))}")
            base = {key: value for key, value in saved.items() if key in known}
            config = cls(**{**base, **given})
        else:
            config = cls(**given)
        config.validate()
        return config

    def validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise InputError(message)

        check(self.model_size in PRESETS, f"unknown --model-size {self.model_size!r}; choose one of {', '.join(PRESETS)}")
        check(self.schedule in BETA_SCHEDULES, f"unknown --schedule {self.schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")
        check(self.prediction_type in PREDICTION_TYPES,
              f"unknown --prediction-type {self.prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")
        check(not self.zero_terminal_snr or self.prediction_type in ("v", "sample"),
              f"--zero-terminal-snr needs --prediction-type v or sample: at alpha_bar_T = 0 the noise is the input "
              f"itself, so --prediction-type {self.prediction_type} has nothing to learn there (Lin et al. 2024)")
        check(not self.zero_terminal_snr or self.task != "autoencoder",
              "--zero-terminal-snr changes a diffusion schedule; --task autoencoder has none")
        check(self.mixed_precision in MIXED_PRECISION,
              f"unknown --mixed-precision {self.mixed_precision!r}; choose one of {', '.join(MIXED_PRECISION)}")
        check(self.lr_schedule in LR_SCHEDULES, f"unknown --lr-schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        check(not (self.max_steps and self.epochs), "--max-steps and --epochs cannot be given together")
        for name in ("batch_size", "grad_accum", "checkpoint_every", "num_train_timesteps", "max_nonfinite"):
            check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
        for name in ("max_steps", "epochs", "sample_every", "resolution"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"--{name.replace('_', '-')} must be at least 1")
        check(self.max_time is None or self.max_time > 0, "--max-time must be positive, e.g. 600 or 10m")
        check(self.lr > 0, "--lr must be positive")
        check(0.0 <= self.ema_decay < 1.0, "--ema-decay must be in [0, 1)")
        check(self.grad_clip >= 0, "--grad-clip must be >= 0 (0 turns clipping off)")
        check(self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1")
        check(self.channels in (None, 1, 3), "--channels must be 1 or 3")
        check_architecture(self, check)
        check(self.lr_warmup is None or self.lr_warmup >= 0, "--lr-warmup must be >= 0")
        check(self.conditioning in CONDITIONINGS,
              f"unknown --conditioning {self.conditioning!r}; choose one of {', '.join(CONDITIONINGS)}")
        check(0.0 <= self.cond_drop < 1.0, "--cond-drop must be in [0, 1)")
        check(self.text_embedding in TEXT_EMBEDDINGS,
              f"unknown --text-embedding {self.text_embedding!r}; choose one of {', '.join(TEXT_EMBEDDINGS)}")
        check(self.task in TASKS, f"unknown --task {self.task!r}; choose one of {', '.join(TASKS)}")
        check(self.kl_weight >= 0, "--kl-weight must be >= 0")
        check(self.loss in LOSSES, f"unknown --loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        check(self.vlb_weight >= 0, "--vlb-weight must be >= 0")
        check(self.task == "ddpm" or (self.loss == "simple" and not self.learn_variance),
              f"--task {self.task} has its own loss: drop --loss and --learn-variance")
        check(not self.learn_variance or self.loss != "simple",
              "--learn-variance needs --loss hybrid or vlb (L_simple gives the variance no gradient)")
        check(self.loss != "hybrid" or self.learn_variance,
              "--loss hybrid trains a learned variance: add --learn-variance (or use --loss vlb)")
        self._validate_recipe(check)
        self._validate_objective(check)
        if self.task == "autoencoder":
            check(self.model_size in AUTOENCODER_PRESETS, f"--task autoencoder takes --model-size "
                  f"{' or '.join(AUTOENCODER_PRESETS)}, not {self.model_size}")
            check(self.conditioning == "none" and not self.latent, "--task autoencoder trains on images: "
                  "drop --conditioning and --latent")
        if self.task == "superres":
            check(self.scale in (2, 3, 4, 8), "--task superres needs --scale 2, 3, 4 or 8")
            check(self.conditioning == "none" and not self.latent, "--task superres trains on images: "
                  "drop --conditioning and --latent")
            check(self.resolution is None or self.resolution % self.scale == 0,
                  f"--resolution {self.resolution} is not a multiple of --scale {self.scale}")
        else:
            check(self.scale is None, "--scale goes with --task superres")
        check(self.log_with in LOG_WITH, f"unknown --log-with {self.log_with!r}; choose one of {', '.join(LOG_WITH)}")
        if self.log_with == "tensorboard":
            import importlib.util

            check(importlib.util.find_spec("tensorboard") is not None,
                  "--log-with tensorboard needs the tensorboard package: pip install 'ddpm-cli[tensorboard]'")
        check(0.0 <= self.validation_split < 1.0, "--validation-split must be in [0, 1), e.g. 0.1")
        check(self.validate_every is None or self.validate_every >= 1, "--validate-every must be at least 1")
        check(self.validate_every is None or self.validation_split > 0,
              "--validate-every needs held-out data: add --validation-split P")
        check(self.validation_split == 0 or self.task == "ddpm",
              f"--validation-split measures a diffusion loss; --task {self.task} does not take it yet")
        check(self.revision is None or bool(self.init_from), "--revision goes with --init-from (a Hub id's revision)")
        check(self.lora_targets in LORA_TARGETS,
              f"unknown --lora-targets {self.lora_targets!r}; choose one of {', '.join(LORA_TARGETS)}")
        if self.lora_rank is None:
            check(self.lora_alpha is None, "--lora-alpha goes with --lora-rank")
        else:
            check(self.lora_rank >= 1, "--lora-rank must be at least 1")
            check(self.task == "ddpm", f"--lora-rank trains adapters on a diffusion U-Net, not --task {self.task}; "
                  "drop --lora-rank")
            check(bool(self.init_from), "--lora-rank adapts a trained model: give it with --init-from MODEL")
            check(self.lora_alpha is None or self.lora_alpha > 0, "--lora-alpha must be positive")
        check(self.ema_snapshot_every is None or self.ema_snapshot_every >= 1, "--ema-snapshot-every must be at least 1")
        check(self.ema_snapshot_every is None or self.ema_profiles, "--ema-snapshot-every goes with --ema-profiles")
        if self.ema_profiles:
            check(self.task != "autoencoder", "--ema-profiles reconstructs diffusion U-Nets; --task autoencoder "
                  "does not take it")
            check(not self.lora_rank, "--ema-profiles averages whole networks; drop it or --lora-rank")

    def _validate_objective(self, check) -> None:
        """--objective and --sigma-data: EDM has its own parameterisation, noise levels and loss weights."""
        check(self.objective in OBJECTIVES, f"unknown --objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        check(self.sigma_data is None or self.sigma_data > 0, "--sigma-data must be positive, e.g. 0.5")
        if self.objective != "edm":
            check(self.sigma_data is None, "--sigma-data goes with --objective edm")
            return
        check(self.task == "ddpm", f"--objective edm trains a diffusion model (--task ddpm), not --task {self.task}")
        own = "--objective edm has its own parameterisation, noise levels and loss weights (Karras et al. 2022): drop"
        for flag, given in (("--prediction-type", self.prediction_type != "epsilon"),
                            ("--schedule", self.schedule != "linear"),
                            ("--loss", self.loss != "simple"), ("--learn-variance", self.learn_variance),
                            ("--zero-terminal-snr", self.zero_terminal_snr), ("--snr-gamma", self.snr_gamma is not None),
                            ("--offset-noise", self.offset_noise > 0),
                            ("--timestep-sampler", self.timestep_sampler != "uniform")):
            check(not given, f"{own} {flag}")

    def _validate_recipe(self, check) -> None:
        """--snr-gamma, --offset-noise, --timestep-sampler, --dropout and --weight-decay."""
        check(self.weight_decay >= 0, "--weight-decay must be >= 0")
        check(self.snr_gamma is None or self.snr_gamma > 0, "--snr-gamma must be positive, e.g. 5")
        check(self.offset_noise >= 0, "--offset-noise must be >= 0, e.g. 0.1")
        for flag, given in (("--snr-gamma", self.snr_gamma is not None), ("--offset-noise", self.offset_noise > 0)):
            check(not given or self.task == "ddpm", f"{flag} shapes the diffusion loss of --task ddpm; "
                  f"--task {self.task} does not take it")
        check(self.snr_gamma is None or self.loss != "vlb",
              "--snr-gamma weights L_simple's terms; --loss vlb is the bound, whose terms carry their own weights: "
              "use --loss simple or hybrid")
        check(self.timestep_sampler in TIMESTEP_SAMPLERS,
              f"unknown --timestep-sampler {self.timestep_sampler!r}; choose one of {', '.join(TIMESTEP_SAMPLERS)}")
        check(self.timestep_sampler == "uniform" or self.loss in ("vlb", "hybrid"),
              f"--timestep-sampler {self.timestep_sampler} importance-samples the bound's terms: it needs --loss vlb "
              "or hybrid")
        check(self.dropout is None or 0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1), e.g. 0.1")
        check(self.dropout is None or self.task != "autoencoder",
              "--dropout goes in a U-Net's residual blocks; --task autoencoder's AutoencoderKL has none")

    @property
    def image_size(self) -> int | tuple[int, int]:
        """The training images' size: R (square) or (height, width) for --resolution HxW."""
        return self.resolution if self.width in (None, self.resolution) else (self.resolution, self.width)

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimiser steps in the run; ``steps_per_epoch`` counts micro-batches."""
        if self.epochs:
            return max(1, self.epochs * steps_per_epoch // self.grad_accum)
        return self.max_steps or 10_000

    def warmup_steps(self, total: int) -> int:
        return self.lr_warmup if self.lr_warmup is not None else min(500, total // 10)

    def to_dict(self) -> dict:
        return asdict(self)
