"""The training loop: L_simple (Ho et al. 2020, Algorithm 1) with EMA, mixed precision, accumulation,
gradient clipping, atomic checkpoints, exact resume and periodic sample grids.

Speed: fused AdamW, a foreach EMA, optional ``torch.compile``, small data (``feed.py``)
sets held on the device, and no host-device synchronisation per step: losses stay on the device
and are read every ``LOG_EVERY`` steps (and before checkpoints), and a step whose gradients are
not finite is skipped on the device by the optimiser itself.

Under torchrun every process takes its rows of each global batch (the noise, timesteps and flips
of the whole batch are drawn alike in every process), DistributedDataParallel averages the
gradients, and only rank 0 writes. Progress goes out through ``on_event(dict)``; the loop never prints.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpm_cli import __version__
from ddpm_cli.engine import distributed
from ddpm_cli.engine.acceleration import compile_module, memory_format, prepare_module
from ddpm_cli.engine.bound import vlb_terms
from ddpm_cli.engine.device import describe, resolve_device
from ddpm_cli.engine.errors import InputError, NumericalError
from ddpm_cli.engine.generate import SamplerSettings, sample_batch
from ddpm_cli.engine.imageio import make_grid, save_png
from ddpm_cli.engine.pipeline import MODEL_INFO_FILE, Condition, from_unet
from ddpm_cli.engine.schedule import NoiseSchedule
from ddpm_cli.training import checkpoints
from ddpm_cli.training.config import SUMMARY_FILE, TrainConfig
from ddpm_cli.training.data import BUILTIN_DATASETS, EpochBatches, open_dataset
from ddpm_cli.training.ema import EMA
from ddpm_cli.training.feed import Feed
from ddpm_cli.training.latents import is_latents_file, open_latent_data
from ddpm_cli.training.presets import build_unet, text_unet_config, unet_config

LOG_FILE = "log.jsonl"
GRID_SEEDS = list(range(16))
LOG_EVERY = 10
GRID_CFG = 2.0

Events = Callable[[dict], None]


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=2))


def make_schedule(config: TrainConfig) -> NoiseSchedule:
    """The schedule a config trains with; scaled_linear uses Stable Diffusion's beta range."""
    start, end = (0.00085, 0.012) if config.schedule == "scaled_linear" else (1e-4, 0.02)
    return NoiseSchedule.create(config.schedule, config.num_train_timesteps, start, end,
                                prediction_type=config.prediction_type, clip_sample=True)


def learning_rate(config: TrainConfig, step: int, total: int) -> float:
    """Linear warm-up, then constant (the DDPM paper) or cosine decay to zero."""
    warmup = config.warmup_steps(total)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.lr_schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr


class Trainer:
    """Holds the state of one run; ``run()`` trains from wherever the state is to the last step."""

    def __init__(self, config: TrainConfig, checkpoint: Path | None = None, on_event: Events | None = None):
        self.run_dir = Path(config.output)
        self.device = resolve_device(config.device)
        self.world = distributed.init(self.device)
        self.on_event = (on_event if self.world.main else None) or (lambda event: None)  # rank 0 reports
        if config.batch_size % self.world.size:
            raise InputError(f"--batch-size {config.batch_size} is the global batch; it must divide evenly among "
                             f"the {self.world.size} processes")
        if config.resolution is None:
            config.resolution = 32 if config.data in BUILTIN_DATASETS else 64
        self.vae = None  # the AutoencoderKL of a latent run
        self.dataset = self._open_data(config)
        if not self.latent:  # a latent set has set the image channels and size from its VAE
            config.channels = self.dataset.channels
        self._setup_conditioning(config)
        self.config = config
        self.schedule = make_schedule(config)
        torch.manual_seed(config.seed)
        self.model = prepare_module(self._build_model().to(self.device))
        self.memory_format = memory_format()
        self.ema = EMA(self.model, config.ema_decay)
        self.fused = self.device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                           fused=self.fused or None)
        self.network = self.model  # what the loss calls: the model, in DDP under torchrun, compiled with --compile
        if self.world.distributed:
            self.network = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.ddp = self.network if self.world.distributed else None
        if config.compile:
            self.network = compile_module(self.network)
        self.generators = {
            "augment": torch.Generator().manual_seed(config.seed + 1),
            "noise": torch.Generator(self.device).manual_seed(config.seed + 2),
        }
        self.batches = EpochBatches(len(self.dataset), config.batch_size, config.seed)
        self.total = config.total_steps(self.batches.steps_per_epoch)
        self.step, self.nonfinite, self.elapsed, self.images_seen, self.last_loss = 0, 0, 0.0, 0, None
        self.pending: list[torch.Tensor] = []  # (loss, skipped) of the steps not read yet, on the device
        self.recent: list[float] = []  # finite losses read since the last log line
        self.consecutive, self.last_finite, self.shown_loss, self.lr = 0, True, None, config.lr
        self.data: Iterator[tuple[torch.Tensor, dict]] | None = None
        if checkpoint is not None:
            state = checkpoints.load_checkpoint(checkpoint, self.model, self.ema.model, self.optimizer, self.generators)
            self.step, self.nonfinite, self.last_loss = state["step"], state["nonfinite"], state["loss"]
            self.elapsed, self.images_seen = state["elapsed"], state["images_seen"]
            self._truncate_log()
        amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
        self.autocast = torch.autocast(self.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
        self.scaler = torch.amp.GradScaler(self.device.type) if config.mixed_precision == "fp16" else None
        if self.scaler is not None and checkpoint is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])

    @property
    def latent(self) -> bool:
        return getattr(self.dataset, "latent", False)

    def _open_data(self, config: TrainConfig):
        """Images, or latents (a `ddpm encode` file, or images encoded once by --latent VAE)."""
        if config.latent or is_latents_file(config.data):
            dataset, self.vae = open_latent_data(config, self.device, self.on_event)
            return dataset
        return open_dataset(config.data, config.resolution, config.channels)

    def _build_model(self) -> torch.nn.Module:
        """The U-Net: class-embedded, cross-attending to text, or plain; on latents when latent."""
        config = self.config
        size = self.dataset.images.shape[-1] if self.latent else config.resolution
        channels = self.dataset.channels
        if self.encoder is not None:
            unet = text_unet_config(config.model_size, size, channels, self.encoder.hidden_size)
        else:
            unet = unet_config(config.model_size, size, channels, len(self.class_names) if self.class_names else None)
        if config.learn_variance:  # the mean's channels, then the variance's (diffusers' "learned_range")
            unet["out_channels"] = 2 * channels
        return build_unet(unet)

    @property
    def variance(self) -> str:
        """How the model's reverse variance is set: learned, or the posterior's beta_tilde."""
        return "learned_range" if self.config.learn_variance else "fixed_small"

    def _setup_conditioning(self, config: TrainConfig) -> None:
        """Class names, or the frozen text encoder and the embeddings of every caption (encoded once)."""
        self.class_names, self.encoder, self.captions = None, None, None
        if config.conditioning == "text":
            if self.dataset.captions is None:
                raise InputError(f"--conditioning text needs captions: give {config.data} a metadata.jsonl "
                                 "(file_name, text) or a .txt file beside each image, or use the built-in emoji set")
            from ddpm_cli.engine.text import EmbeddingCache, TextEncoder

            self.encoder = TextEncoder.load(config.text_encoder, self.device, max_length=config.text_max_length,
                                            embedding=config.text_embedding)
            config.text_max_length = self.encoder.max_length
            self.captions = EmbeddingCache(self.encoder, self.dataset.captions)
        elif config.conditioning == "class":
            if self.dataset.labels is None:
                raise InputError(f"--conditioning class needs labels: {config.data} has none (put each class's images "
                                 "in a sub-folder named after it, or use a labelled built-in data set)")
            self.class_names = list(self.dataset.class_names)

    def _loss(self, x0: torch.Tensor, conditioning: dict | None = None) -> torch.Tensor:
        """With t uniform and x_t ~ q(x_t | x_0): L_simple = || target - network(x_t, t) ||^2;
        L_vlb = T L_t, the bound's one-sample estimate in bits/dim (engine/bound.py); and
        L_hybrid = L_simple + vlb_weight L_vlb with the mean stopped from L_vlb's gradient, so the
        bound trains only the variance (Nichol & Dhariwal 2021, sec. 3.1)."""
        noise_gen = self.generators["noise"]
        T = self.schedule.num_train_timesteps
        total = x0.shape[0] * self.world.size  # the global batch's draws, of which this process takes its rows
        rows = self.world.shard(total)
        t = torch.randint(0, T, (total,), generator=noise_gen, device=self.device)[rows]
        noise = torch.randn((total, *x0.shape[1:]), generator=noise_gen, device=self.device)[rows]
        xt = self.schedule.q_sample(x0, t, noise).contiguous(memory_format=self.memory_format)
        with self.autocast:
            output = self.network(xt, t, **(conditioning or {})).sample.float()
        channels, loss = x0.shape[1], self.config.loss
        mse = F.mse_loss(output[:, :channels], self.schedule.training_target(x0, noise, t))
        if loss == "simple":
            return mse
        if loss == "hybrid":
            output = torch.cat([output[:, :channels].detach(), output[:, channels:]], dim=1)
        vlb = vlb_terms(self.schedule, x0, xt, t, output, self.variance).mean() * T
        return mse + self.config.vlb_weight * vlb if loss == "hybrid" else vlb

    def _optimizer_step(self) -> torch.Tensor:
        """Clip and step; returns 1.0 (on the device) where the gradients were not finite, and then the
        step changes nothing: fused AdamW skips it on the device, with no host synchronisation."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        skipped = (~torch.isfinite(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))).float()
        if self.scaler is not None:  # the scaler skips non-finite steps itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.fused:
            self.optimizer.found_inf = skipped
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not skipped.item():
            self.optimizer.step()
        return skipped

    def train_step(self) -> torch.Tensor:
        """One optimiser step over one global batch; returns (loss, skipped) on the device, unread."""
        c = self.config
        if self.data is None:
            feed = Feed(c, self.dataset, self.batches, self.device, self.world, self.generators, self.memory_format,
                        self.class_names, self.captions)
            self.data = feed(self.step * c.grad_accum)
        self.lr = learning_rate(c, self.step, self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for k in range(c.grad_accum):
            accumulate = self.ddp is not None and k + 1 < c.grad_accum  # all-reduce once, after the last
            with self.ddp.no_sync() if accumulate else nullcontext():
                x0, conditioning = next(self.data)
                loss = self._loss(x0, conditioning) / c.grad_accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_sum += loss.detach()
        skipped = self._optimizer_step()
        self.ema.update(self.model, self.step, skipped)
        self.step += 1
        self.images_seen += c.batch_size * c.grad_accum
        return torch.stack([loss_sum, skipped])

    def _read_losses(self) -> None:
        """Read the pending steps' losses (one synchronisation, averaged over processes) and count the
        non-finite ones; too many in a row stop the run."""
        if not self.pending:
            return
        values = distributed.average(torch.stack(self.pending)).tolist()
        first, self.pending = self.step - len(values) + 1, []
        for step, (loss, skipped) in enumerate(values, start=first):
            self.last_finite = math.isfinite(loss) and not skipped
            if self.last_finite:
                self.consecutive = 0
                self.recent.append(loss)
                self.shown_loss = loss
                continue
            self.nonfinite, self.consecutive = self.nonfinite + 1, self.consecutive + 1
            self.on_event({"kind": "nonfinite", "step": step, "in_a_row": self.consecutive})
            if self.consecutive >= self.config.max_nonfinite:
                raise NumericalError(f"the loss was not finite for {self.consecutive} steps in a row (step {step}); "
                                     "try a lower --lr, --grad-clip 1 or --mixed-precision no")

    def run(self) -> dict:
        c = self.config
        if self.world.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        parameters = sum(p.numel() for p in self.model.parameters())
        self.on_event({"kind": "start", "step": self.step, "total": self.total, "device": describe(self.device, torch.float32),
                       "parameters": parameters, "data": self.dataset.name, "images": len(self.dataset),
                       "mixed_precision": c.mixed_precision, "processes": self.world.size})
        started = time.perf_counter()
        while self.step < self.total:
            self.pending.append(self.train_step())
            now = time.perf_counter()
            self.elapsed += now - started
            last = self.step == self.total
            log = self.step % LOG_EVERY == 0 or last
            checkpoint = self.step % c.checkpoint_every == 0 or last
            grid = self.step % (c.sample_every or c.checkpoint_every) == 0 or last
            if log or checkpoint or grid:
                self._read_losses()
            if log and self.recent:
                self.last_loss, self.recent = sum(self.recent) / len(self.recent), []
                self._log(self.last_loss, self.lr)
            self.on_event({"kind": "step", "step": self.step, "total": self.total, "loss": self.shown_loss,
                           "lr": self.lr, "images_per_s": self.images_seen / max(self.elapsed, 1e-9)})
            if checkpoint and self.last_finite:
                self._checkpoint()
            if grid and self.world.main:
                self._sample_grid()
            started = time.perf_counter()
        summary = self._summary(parameters)
        distributed.barrier()
        return summary

    def _truncate_log(self) -> None:
        """Drop log lines of steps after the resumed checkpoint (a killed run may have logged them)."""
        path = self.run_dir / LOG_FILE
        if path.exists() and self.world.main:
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
            _write_text(path, "".join(line + "\n" for line in kept))

    def _log(self, loss: float, lr: float) -> None:
        if not self.world.main:
            return
        line = {"step": self.step, "loss": loss, "lr": lr, "images_per_s": self.images_seen / max(self.elapsed, 1e-9)}
        with open(self.run_dir / LOG_FILE, "a") as f:
            f.write(json.dumps(line) + "\n")

    def _checkpoint(self) -> None:
        if not self.world.main:
            return
        state = {"config": self.config.to_dict(), "nonfinite": self.nonfinite, "elapsed": self.elapsed,
                 "images_seen": self.images_seen, "loss": self.last_loss, "version": __version__,
                 "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}
        path = checkpoints.save_checkpoint(self.run_dir, self.step, self.model, self.ema.model, self.optimizer,
                                           self.generators, state, self.config.keep_checkpoints)
        self._export()
        self.on_event({"kind": "checkpoint", "step": self.step, "path": str(path)})

    def _export(self) -> None:
        """The run folder's diffusers pipeline (EMA weights), with the VAE of a latent run in vae/."""
        info = {"conditioning": self.config.conditioning, "class_names": self.class_names,
                "data": self._data_spec(), "resolution": self.config.resolution}
        if self.encoder is not None:
            info.update(text_encoder=self.config.text_encoder, max_length=self.encoder.max_length,
                        text_embedding=self.encoder.embedding)
        if self.vae is not None:
            info.update(latent=self.dataset.vae_name, image_size=[self.config.resolution] * 2)
        checkpoints.export_pipeline(self.run_dir, self.ema.model, self.schedule.to_config(self.variance), info, self.vae)

    def _data_spec(self) -> str:
        """The training data as `ddpm eval nll` can reopen it: a built-in's name or a folder's absolute path."""
        spec = str(self.config.data)
        return spec if spec in BUILTIN_DATASETS else str(Path(spec).expanduser().resolve())

    def _sample_grid(self) -> None:
        pipeline = from_unet(self.ema.model, self.schedule, variance=self.variance, class_names=self.class_names,
                             text_encoder=self.encoder, vae=self.vae)
        # A conditional grid cycles through the classes or the first captions, guided with w = GRID_CFG.
        if self.class_names:
            condition = Condition([seed % len(self.class_names) for seed in GRID_SEEDS])
        elif self.captions is not None:
            prompts = self.captions.captions[1:] or [""]
            condition = Condition(prompt=[prompts[seed % len(prompts)] for seed in GRID_SEEDS])
        else:
            condition = None
        images = sample_batch(pipeline, GRID_SEEDS, SamplerSettings("dpmpp-2m", 20), condition=condition,
                              cfg=GRID_CFG if condition else 1.0)
        path = self.run_dir / "samples" / f"step-{self.step:07d}.png"
        save_png(make_grid(images), path, {"model": str(self.run_dir), "step": self.step, "sampler": "dpmpp-2m",
                                           "steps": 20, "seeds": f"{GRID_SEEDS[0]}-{GRID_SEEDS[-1]}"}, overwrite=True)
        self.on_event({"kind": "sample", "step": self.step, "path": str(path)})

    def _summary(self, parameters: int) -> dict:
        grids = sorted((self.run_dir / "samples").glob("step-*.png"))
        summary = {
            "config": self.config.to_dict(), "version": __version__, "steps": self.step,
            "final_loss": self.last_loss, "wall_time_s": round(self.elapsed, 3),
            "images_seen": self.images_seen, "images_per_s": round(self.images_seen / max(self.elapsed, 1e-9), 2),
            "nonfinite_steps": self.nonfinite, "parameters": parameters,
            "data": {"name": self.dataset.name, "source": str(self.dataset.source), "images": len(self.dataset)},
            "pipeline": str(self.run_dir), "last_grid": str(grids[-1]) if grids else None,
        }
        if self.world.main:
            _write_json(self.run_dir / SUMMARY_FILE, summary)
        return summary


RUN_ENTRIES = ("checkpoints", "samples", "unet", "vae", "scheduler", "model_index.json", MODEL_INFO_FILE, SUMMARY_FILE, LOG_FILE)


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


def prepare(options: dict, resume: str | None = None, overwrite: bool = False) -> tuple[TrainConfig, Path | None]:
    """Resolve the options a user gave (None = not given) and the checkpoint to resume, if any.

    A resumed run keeps the options saved with its checkpoint, except those in ``RESUMABLE``.
    An existing run is refused unless ``overwrite`` (then its files are removed) or ``resume``.
    """
    if resume and overwrite:
        raise InputError("--resume and --overwrite cannot be given together")
    run_dir = Path(options.get("output") or TrainConfig.output)
    if resume:
        checkpoint = checkpoints.resolve_resume(run_dir, resume)
        return TrainConfig.from_options(options, checkpoints.read_state(checkpoint)["config"]), checkpoint
    config = TrainConfig.from_options(options)
    if holds_run(run_dir):
        if not overwrite:
            raise InputError(f"{run_dir} already holds a training run; pass --resume latest to continue it, "
                             "--overwrite to start it over, or choose another -o")
        if distributed.world().main:  # under torchrun, one process clears
            clear_run(run_dir)
    return config, None


def make_trainer(config: TrainConfig, checkpoint: Path | None = None, on_event: Events | None = None) -> Trainer:
    """The trainer of the config's --task."""
    if config.task == "autoencoder":
        from ddpm_cli.training.autoencoder import AutoencoderTrainer

        return AutoencoderTrainer(config, checkpoint, on_event)
    if config.task == "superres":
        from ddpm_cli.training.superres import SuperResTrainer

        return SuperResTrainer(config, checkpoint, on_event)
    return Trainer(config, checkpoint, on_event)


def train(options: dict, resume: str | None = None, on_event: Events | None = None) -> dict:
    """Train (or resume) the run the options describe; return its summary."""
    config, checkpoint = prepare(options, resume)
    return make_trainer(config, checkpoint, on_event).run()
