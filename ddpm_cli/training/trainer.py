"""The Trainer: one training loop for every task, with the task an objective (``objectives/``).

The Trainer owns the data feed, AdamW, the EMA, mixed precision, gradient accumulation and
clipping, DistributedDataParallel, ``torch.compile``, checkpoints, exact resume, graceful stops
(``stop.py``) and the random draws of each global batch; the objective builds the model, scores
a batch through the wrapped network, exports the run folder and draws previews.

Speed: fused AdamW, a foreach EMA, small data (``feed.py``) sets held on the device, and no
host-device synchronisation per step: losses stay on the device and are read every ``LOG_EVERY``
steps (and before checkpoints), and a step whose gradients are not finite is skipped on the device
by the optimiser itself.

Under torchrun every process takes its rows of each global batch (the noise, timesteps and flips
of the whole batch are drawn alike in every process), DistributedDataParallel averages the
gradients, and only rank 0 writes. Progress goes out through ``on_event(dict)``; the loop never prints.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch

from ddpm_cli import __version__
from ddpm_cli.engine.runtime import distributed
from ddpm_cli.engine.runtime.acceleration import compile_module, memory_format, prepare_module
from ddpm_cli.engine.runtime.device import describe, resolve_device
from ddpm_cli.engine.errors import InputError, NumericalError
from ddpm_cli.training import checkpoints
from ddpm_cli.training.config import SUMMARY_FILE, TrainConfig
from ddpm_cli.data.sources import BUILTIN_DATASETS, open_dataset
from ddpm_cli.data.batches import EpochBatches
from ddpm_cli.training.ema import EMA
from ddpm_cli.training.ema_profiles import CHECKPOINT_FILE, EMAProfiles
from ddpm_cli.training.feed import Feed
from ddpm_cli.training.latents import is_latents_file, open_latent_data
from ddpm_cli.training.objectives import Batch, Draws, objective_class
from ddpm_cli.training.objectives.base import OBJECTIVE_STATE_FILE
from ddpm_cli.training.presets import reference_loss
from ddpm_cli.training.stop import StopRequests, TrainingStopped, signal_name

LOG_FILE = "log.jsonl"
LOG_EVERY = 10
VALIDATION_IMAGES = 64  # held-out images the validation loss is measured on

Events = Callable[[dict], None]


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
        if not getattr(self.dataset, "latent", False):  # a latent set has set the channels and size from its VAE
            config.channels = self.dataset.channels
        self.config = config
        self.objective = objective_class(config.task, config.objective)(config, self.dataset, self.device, self.vae,
                                                                       self.on_event)
        torch.manual_seed(config.seed)
        self.model = prepare_module(self.objective.build_model().to(self.device))
        # A resumed run has its own weights, but a LoRA run's checkpoints hold only its adapters.
        if config.init_from and (checkpoint is None or config.lora_rank):
            from ddpm_cli.training.init_weights import load_initial_weights

            load_initial_weights(self.model, config.init_from, config.task, config.revision)
        if config.gradient_checkpointing:
            if not getattr(self.model, "_supports_gradient_checkpointing", False):
                raise InputError(f"--gradient-checkpointing: the {type(self.model).__name__} of --task {config.task} "
                                 "does not support it; drop the option")
            self.model.enable_gradient_checkpointing()
        self.saved_names = None  # the state-dict names a checkpoint holds (None: all)
        if config.lora_rank:
            from ddpm_cli.training.lora import adapter_names, add_adapters

            add_adapters(self.model, config.lora_rank, config.lora_alpha, config.lora_targets)
            self.saved_names = adapter_names(self.model)
        self.memory_format = memory_format()
        self.ema = EMA(self.model, config.ema_decay)
        self.fused = self.device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay,
                                           fused=self.fused or None)
        # What the loss calls: the objective's forward of the model, in DDP under torchrun, compiled with --compile.
        self.network = self.objective.trainable(self.model)
        self.ddp = None
        if self.world.distributed:
            self.network = self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.network, device_ids=[self.device] if self.device.type == "cuda" else None)
        if config.compile:
            self.network = compile_module(self.network)
        self.generators = {
            "augment": torch.Generator().manual_seed(config.seed + 1),
            "noise": torch.Generator(self.device).manual_seed(config.seed + 2),
        }
        if config.dropout and self.device.type in ("cpu", "cuda"):  # dropout draws from the device's default
            # generator: checkpointed too, so --resume is exact
            self.generators["dropout"] = torch.default_generator if self.device.type == "cpu" else \
                torch.cuda.default_generators[torch.cuda.current_device() if self.device.index is None else self.device.index]
        self.draws = Draws(self.generators["noise"], self.device, self.world)
        self.held_out, items = self._split(config)
        self.batches = EpochBatches(len(self.dataset), config.batch_size, config.seed, items)
        self.total = config.total_steps(self.batches.steps_per_epoch)
        self.step, self.nonfinite, self.elapsed, self.images_seen, self.last_loss = 0, 0, 0.0, 0, None
        self.pending: list[torch.Tensor] = []  # (loss, skipped) of the steps not read yet, on the device
        self.recent: list[float] = []  # finite losses read since the last log line
        self.recent_norms: list[float] = []  # and their steps' gradient norms (before clipping)
        self.validation, self.best, self.first_val = None, None, None  # held-out batch; (loss, step) best, first
        self.board = None  # the TensorBoard writer of --log-with tensorboard
        self.consecutive, self.last_finite, self.shown_loss, self.lr = 0, True, None, config.lr
        self.data: Iterator[tuple[torch.Tensor, dict]] | None = None
        self.stop = StopRequests(self.world, self.device)
        state = {}
        if checkpoint is not None:
            state = checkpoints.load_checkpoint(checkpoint, self.model, self.ema.model, self.optimizer, self.generators,
                                                self.saved_names)
            self.step, self.nonfinite, self.last_loss = state["step"], state["nonfinite"], state["loss"]
            self.elapsed, self.images_seen = state["elapsed"], state["images_seen"]
            self.best, self.first_val = state.get("best_val"), state.get("first_val")
            if self.objective.state_dict():  # its own training state (a loss history)
                self.objective.load_state_dict(checkpoints.load_extra(checkpoint, OBJECTIVE_STATE_FILE, self.device))
            self._truncate_log()
        self.profiles = None  # --ema-profiles: EDM2's power EMAs and their snapshots, kept by rank 0
        if config.ema_profiles and self.world.main:
            self.profiles = EMAProfiles.start(self.model, config, self.total, checkpoint, self.step)
        amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
        self.autocast = torch.autocast(self.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
        self.scaler = torch.amp.GradScaler(self.device.type) if config.mixed_precision == "fp16" else None
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])

    def _open_data(self, config: TrainConfig):
        """Images, or latents (a `ddpm encode` file, or images encoded once by --latent VAE)."""
        if config.latent or is_latents_file(config.data):
            dataset, self.vae = open_latent_data(config, self.device, self.on_event)
            return dataset
        return open_dataset(config.data, config.image_size, config.channels)

    def forward(self, *args, **kwargs):
        """The wrapped network under the run's autocast: all an objective's loss may call."""
        with self.autocast:
            return self.network(*args, **kwargs)

    def _optimizer_step(self) -> torch.Tensor:
        """Clip and step; returns 1.0 (on the device) where the gradients were not finite, and then the
        step changes nothing: fused AdamW skips it on the device, with no host synchronisation."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], clip)
        skipped = (~torch.isfinite(norm)).float()
        if self.scaler is not None:  # the scaler skips non-finite steps itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.fused:
            self.optimizer.found_inf = skipped
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not skipped.item():
            self.optimizer.step()
        return skipped, norm.float()

    def train_step(self) -> torch.Tensor:
        """One optimiser step over one global batch; returns (loss, skipped) on the device, unread."""
        c = self.config
        if self.data is None:
            feed = Feed(c, self.dataset, self.batches, self.device, self.world, self.generators, self.memory_format,
                        self.objective.class_names, self.objective.captions)
            self.data = feed(self.step * c.grad_accum)
        self.lr = learning_rate(c, self.step, self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for k in range(c.grad_accum):
            accumulate = self.ddp is not None and k + 1 < c.grad_accum  # all-reduce once, after the last
            with self.ddp.no_sync() if accumulate else nullcontext():
                images, conditioning = next(self.data)
                loss = self.objective.loss(self.forward, Batch(images, conditioning), self.draws) / c.grad_accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_sum += loss.detach()
        skipped, norm = self._optimizer_step()
        self.ema.update(self.model, self.step, skipped)
        if self.profiles is not None:
            self.profiles.update(self.model, self.step + 1)
        self.step += 1
        self.images_seen += c.batch_size * c.grad_accum
        return torch.stack([loss_sum, skipped, norm])

    def _read_losses(self) -> None:
        """Read the pending steps' losses (one synchronisation, averaged over processes) and count the
        non-finite ones; too many in a row stop the run."""
        if not self.pending:
            return
        values = distributed.average(torch.stack(self.pending)).tolist()
        first, self.pending = self.step - len(values) + 1, []
        for step, (loss, skipped, norm) in enumerate(values, start=first):
            self.last_finite = math.isfinite(loss) and not skipped
            if self.last_finite:
                self.consecutive = 0
                self.recent.append(loss)
                self.recent_norms.append(norm)
                self.shown_loss = loss
                continue
            self.nonfinite, self.consecutive = self.nonfinite + 1, self.consecutive + 1
            self.on_event({"kind": "nonfinite", "step": step, "in_a_row": self.consecutive})
            if self.consecutive >= self.config.max_nonfinite:
                raise NumericalError(f"the loss was not finite for {self.consecutive} steps in a row (step {step}); "
                                     "try a lower --lr, --grad-clip 1 or --mixed-precision no")

    def run(self) -> dict:
        """Train to the last step and return the summary. SIGINT or SIGTERM stops the run after the
        step in progress, with a checkpoint, by raising TrainingStopped."""
        c = self.config
        if self.world.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        parameters = sum(p.numel() for p in self.model.parameters())
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.on_event({"kind": "start", "step": self.step, "total": self.total, "device": describe(self.device, torch.float32),
                       "parameters": parameters, "trainable_parameters": self.trainable, "data": self.dataset.name, "images": len(self.dataset),
                       "mixed_precision": c.mixed_precision, "processes": self.world.size,
                       "init_from": c.init_from if self.step == 0 else None})
        if self.world.main and c.log_with == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step + 1 if self.step else None)
        if self.held_out and self.step == 0:
            self._validate()  # the held-out loss before any training: the source model's, when fine-tuning
        started = time.perf_counter()
        with self.stop:
            while self.step < self.total:
                self.pending.append(self.train_step())
                now = time.perf_counter()
                self.elapsed += now - started
                if c.max_time and self.stop.time_up(self.elapsed >= c.max_time):
                    self.total = self.step  # the time budget ends the run here, as its last step
                last = self.step == self.total
                stopping = 0 if last else self.stop.agreed()
                log = self.step % LOG_EVERY == 0 or last or stopping
                checkpoint = self.step % c.checkpoint_every == 0 or last
                grid = self.step % (c.sample_every or c.checkpoint_every) == 0 or last
                if self.held_out and (self.step % (c.validate_every or c.checkpoint_every) == 0 or last):
                    self._validate()
                if log or checkpoint or grid:
                    self._read_losses()
                if log and self.recent:
                    self.last_loss, self.recent = sum(self.recent) / len(self.recent), []
                    self._log(self.last_loss, self.lr)
                self.on_event({"kind": "step", "step": self.step, "total": self.total, "loss": self.shown_loss,
                               "lr": self.lr, "images_per_s": self.images_seen / max(self.elapsed, 1e-9)})
                if self.profiles is not None and (last or self.step % self.profiles.every == 0):
                    self.profiles.snapshot(self.step)
                if stopping:
                    self._stop(stopping)
                if checkpoint and self.last_finite:
                    self._checkpoint()
                if grid and self.world.main:
                    self._preview()
                started = time.perf_counter()
        summary = self._summary(parameters)
        if self.board is not None:
            self.board.close()
        distributed.barrier()
        return summary

    def _stop(self, signum: int) -> None:
        """Checkpoint the step just finished (every rank waits for rank 0's write) and stop the run."""
        self._checkpoint()
        distributed.barrier()
        path = checkpoints.checkpoint_path(self.run_dir, self.step)
        raise TrainingStopped(f"stopped by {signal_name(signum)} after step {self.step} of {self.total}; checkpoint "
                              f"{path} written; continue with: ddpm train -o {self.run_dir} --resume latest", signum)

    def _truncate_log(self) -> None:
        """Drop log lines of steps after the resumed checkpoint (a killed run may have logged them)."""
        path = self.run_dir / LOG_FILE
        if path.exists() and self.world.main:
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
            write_text(path, "".join(line + "\n" for line in kept))

    def _log(self, loss: float, lr: float) -> None:
        if not self.world.main:
            return
        norms, self.recent_norms = self.recent_norms, []
        line = {"step": self.step, "loss": loss, "lr": lr, "images_per_s": self.images_seen / max(self.elapsed, 1e-9),
                "grad_norm": sum(norms) / len(norms) if norms else None}
        self._write_log(line)
        if self.board is not None:
            for name in ("loss", "lr", "images_per_s", "grad_norm"):
                if line[name] is not None:
                    self.board.add_scalar(f"train/{name}", line[name], self.step)

    def _write_log(self, line: dict) -> None:
        with open(self.run_dir / LOG_FILE, "a") as f:
            f.write(json.dumps(line) + "\n")

    def _split(self, config: TrainConfig) -> tuple[list[int] | None, list[int] | None]:
        """(held-out items, training items) of --validation-split: a seeded draw, the same on resume."""
        if not config.validation_split:
            return None, None
        n = len(self.dataset)
        count = max(1, round(config.validation_split * n))
        if n - count < config.batch_size:
            raise InputError(f"--validation-split {config.validation_split} holds back {count} of {n} images, leaving "
                             f"fewer than --batch-size {config.batch_size} to train on; lower one of them")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + 3)).tolist()
        return sorted(order[:count]), sorted(order[count:])

    def _validation_batch(self) -> tuple[Batch, torch.Tensor]:
        """The held-out images (at most VALIDATION_IMAGES, uncropped, unflipped, conditioning never dropped)
        and their fixed noise, made once."""
        import dataclasses

        if self.validation is None:
            count = min(len(self.held_out), VALIDATION_IMAGES)
            plain = dataclasses.replace(self.config, batch_size=count, cond_drop=0.0, random_flip=False,
                                        center_crop=True, num_workers=0)
            generators = {"augment": torch.Generator().manual_seed(0),
                          "noise": torch.Generator(self.device).manual_seed(0)}
            feed = Feed(plain, self.dataset, EpochBatches(len(self.dataset), count, 0, self.held_out[:count]),
                        self.device, self.world, generators, self.memory_format, self.objective.class_names,
                        self.objective.captions)
            images, conditioning = next(feed(0))
            noise = torch.randn(images.shape, generator=torch.Generator(self.device).manual_seed(self.config.seed + 4),
                                device=self.device)
            self.validation = (Batch(images, conditioning), noise)
        return self.validation

    def _validate(self) -> None:
        """The EMA weights' (the exported ones') loss on the held-out batch, in log.jsonl and TensorBoard."""
        batch, noise = self._validation_batch()
        with self.autocast:
            losses = self.objective.validation_loss(self.ema.model, batch, noise)
        loss = float(distributed.average(torch.tensor(sum(losses.values()) / len(losses), device=self.device)))
        if self.first_val is None:
            self.first_val = [loss, self.step]
        if self.best is None or loss < self.best[0]:
            self.best = [loss, self.step]
        self.on_event({"kind": "validation", "step": self.step, "loss": loss})
        if not self.world.main:
            return
        self._write_log({"step": self.step, "val_loss": loss, "val_loss_t": {str(t): v for t, v in losses.items()}})
        if self.board is not None:
            self.board.add_scalar("validation/loss", loss, self.step)

    def _checkpoint(self) -> None:
        if not self.world.main:
            return
        state = {"config": self.config.to_dict(), "nonfinite": self.nonfinite, "elapsed": self.elapsed,
                 "images_seen": self.images_seen, "loss": self.last_loss, "version": __version__,
                 "best_val": self.best, "first_val": self.first_val,
                 "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None}
        extra = {CHECKPOINT_FILE: self.profiles.tensors()} if self.profiles else {}
        objective_state = self.objective.state_dict()  # its own training state (a loss history), if any
        if objective_state:
            extra[OBJECTIVE_STATE_FILE] = objective_state
        path = checkpoints.save_checkpoint(self.run_dir, self.step, self.model, self.ema.model, self.optimizer,
                                           self.generators, state, self.config.keep_checkpoints, self.saved_names,
                                           extra or None)
        self.objective.export(self.run_dir, self.ema.model)
        self.on_event({"kind": "checkpoint", "step": self.step, "path": str(path)})

    def _preview(self) -> None:
        path = self.objective.preview(self.run_dir, self.ema.model, self.step)
        if self.board is not None:
            import numpy as np

            from ddpm_cli.engine.io.images import load_image

            self.board.add_image("samples", np.asarray(load_image(path)), self.step, dataformats="HWC")
        self.on_event({"kind": "sample", "step": self.step, "path": str(path)})

    def _summary(self, parameters: int) -> dict:
        grids = sorted((self.run_dir / "samples").glob("step-*.png"))
        summary = {
            "config": self.config.to_dict(), "version": __version__, "steps": self.step,
            "final_loss": self.last_loss, "wall_time_s": round(self.elapsed, 3),
            "images_seen": self.images_seen, "images_per_s": round(self.images_seen / max(self.elapsed, 1e-9), 2),
            "nonfinite_steps": self.nonfinite, "parameters": parameters, "trainable_parameters": self.trainable,
            "data": {"name": self.dataset.name, "source": str(self.dataset.source), "images": len(self.dataset)},
            "pipeline": str(self.run_dir), "last_grid": str(grids[-1]) if grids else None,
            "reference_loss": reference_loss(self.config),
        }
        if self.best is not None:
            summary["validation"] = {"best_loss": self.best[0], "best_step": self.best[1], "first_loss": self.first_val[0],
                                     "first_step": self.first_val[1], "images": len(self.held_out)}
        if self.world.main:
            write_text(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
        return summary
