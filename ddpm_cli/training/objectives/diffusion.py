"""``--task ddpm``: a denoising diffusion model, unconditional, class- or text-conditional, on pixels
or on the latents of a VAE.

L_simple (Ho et al. 2020, Algorithm 1) with t uniform and x_t ~ q(x_t | x_0); or L_vlb, the
variational bound, or L_hybrid = L_simple + vlb_weight L_vlb for a learned variance (Nichol &
Dhariwal 2021). The run exports a diffusers DDPMPipeline (EMA weights), with the VAE of a latent
run in vae/, and previews a grid sampled with DPM-Solver++.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ddpm_cli.engine.runtime.acceleration import memory_format
from ddpm_cli.engine.diffusion.bound import vlb_terms
from ddpm_cli.engine.errors import InputError
from ddpm_cli.engine.tasks.generate import SamplerSettings, sample_batch
from ddpm_cli.engine.io.images import make_grid, save_png
from ddpm_cli.engine.models.pipeline import Condition, from_unet
from ddpm_cli.engine.diffusion.schedule import NoiseSchedule
from ddpm_cli.training import checkpoints
from ddpm_cli.training.config import TrainConfig
from ddpm_cli.data.sources import BUILTIN_DATASETS
from ddpm_cli.training.objectives.base import Batch, Draws, Network, Objective, grid_path
from ddpm_cli.training.presets import build_unet, run_unet_config, sample_size, with_dropout
from ddpm_cli.training.timestep_sampler import LossSecondMomentSampler
from ddpm_cli.training.weighting import min_snr_weights, snr_table

GRID_SEEDS = list(range(16))
GRID_CFG = 2.0
GRID_STEPS = 20
VALIDATION_TIMESTEPS = 10


def make_schedule(config: TrainConfig) -> NoiseSchedule:
    """The schedule a config trains with (an --init-from model's own); scaled_linear uses Stable Diffusion's
    beta range."""
    if config.scheduler_config:
        rescale = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if config.zero_terminal_snr else {}
        return NoiseSchedule.from_config({**config.scheduler_config, **rescale})
    start, end = (0.00085, 0.012) if config.schedule == "scaled_linear" else (1e-4, 0.02)
    return NoiseSchedule.create(config.schedule, config.num_train_timesteps, start, end,
                                prediction_type=config.prediction_type, clip_sample=True,
                                zero_terminal_snr=config.zero_terminal_snr)


class DiffusionObjective(Objective):
    name = "ddpm"

    def __init__(self, config, dataset, device, vae=None, on_event=None):
        super().__init__(config, dataset, device, vae, on_event)
        self.encoder = None
        self._setup_conditioning()
        self.schedule = make_schedule(config)
        self.memory_format = memory_format()
        self.snr = snr_table(self.schedule).to(device, torch.float32) if config.snr_gamma is not None else None
        self.sampler = None  # --timestep-sampler loss-second-moment (None: uniform)
        if config.timestep_sampler == "loss-second-moment":
            self.sampler = LossSecondMomentSampler(self.schedule.num_train_timesteps, device)

    @property
    def latent(self) -> bool:
        return getattr(self.dataset, "latent", False)

    @property
    def variance(self) -> str:
        """How the model's reverse variance is set: learned, or the posterior's beta_tilde."""
        source = (self.config.scheduler_config or {}).get("variance_type")
        if source in ("fixed_small", "fixed_large") and not self.config.learn_variance:
            return source  # an --init-from model keeps its own
        return "learned_range" if self.config.learn_variance else "fixed_small"

    def _setup_conditioning(self) -> None:
        """Class names, or the frozen text encoder and the embeddings of every caption (encoded once)."""
        config, dataset = self.config, self.dataset
        if config.conditioning == "text":
            if dataset.captions is None:
                raise InputError(f"--conditioning text needs captions: give {config.data} a metadata.jsonl "
                                 "(file_name, text) or a .txt file beside each image, or use the built-in emoji set")
            from ddpm_cli.engine.models.text import TextEncoder
            from ddpm_cli.training.feed import CaptionChoices

            self.encoder = TextEncoder.load(config.text_encoder, self.device, max_length=config.text_max_length,
                                            embedding=config.text_embedding)
            config.text_max_length = self.encoder.max_length
            # Several captions per item (one drawn per sample), or each item's own caption.
            self.captions = CaptionChoices(self.encoder, dataset.caption_choices or [[c] for c in dataset.captions])
        elif config.conditioning == "class":
            if dataset.labels is None:
                raise InputError(f"--conditioning class needs labels: {config.data} has none (put each class's images "
                                 "in a sub-folder named after it, or use a labelled built-in data set)")
            self.class_names = list(dataset.class_names)

    def build_model(self) -> torch.nn.Module:
        """The U-Net: class-embedded, cross-attending to text, or plain; on latents when latent."""
        config = self.config
        size = self.dataset.images.shape[-1] if self.latent else config.image_size
        channels = self.dataset.channels
        if config.unet_config:  # --init-from: the source model's network
            classes = config.unet_config.get("num_class_embeds")
            if classes and self.class_names and classes != len(self.class_names) + 1:
                raise InputError(f"--init-from {config.init_from} was trained on {classes - 1} classes, "
                                 f"{config.data} has {len(self.class_names)}; fine-tune it on data with as many classes")
            wanted = config.unet_config.get("in_channels")
            if wanted != channels:
                what = "latent channels" if self.latent else "channels"
                raise InputError(f"--init-from {config.init_from} takes {wanted}-channel inputs, but {config.data} gives "
                                 f"{channels} {what}; fine-tune it on data it can take")
            return build_unet(with_dropout(dict(config.unet_config), config.dropout))
        # The preset with --block-channels etc. over it, or --unet-config's file; with --learn-variance the
        # network outputs the mean's channels, then the variance's (diffusers' "learned_range").
        unet = run_unet_config(config, size, channels, 2 * channels if config.learn_variance else channels,
                               len(self.class_names) if self.class_names else None,
                               self.encoder.hidden_size if self.encoder is not None else None)
        return build_unet(with_dropout(unet, config.dropout))

    def loss(self, network: Network, batch: Batch, draws: Draws) -> torch.Tensor:
        """L_simple = || target - network(x_t, t) ||^2; L_vlb = T L_t, the bound's one-sample estimate in
        bits/dim (engine/bound.py); L_hybrid = L_simple + vlb_weight L_vlb with the mean stopped from
        L_vlb's gradient, so the bound trains only the variance (Nichol & Dhariwal 2021, sec. 3.1).

        --snr-gamma weights each sample's L_simple term (training/weighting.py); --offset-noise adds a
        shift per image and channel to the noise; --timestep-sampler loss-second-moment draws t by
        importance and weights each sample by 1 / (T p_t) (training/timestep_sampler.py)."""
        x0 = batch.images
        T = self.schedule.num_train_timesteps
        if self.sampler is None:
            t = draws.timesteps(x0.shape[0], T)
        else:
            t, importance, t_global = self.sampler.draw(draws, x0.shape[0])
        noise = draws.normal(x0.shape)
        if self.config.offset_noise:  # Guttenberg 2023: one N(0, 1) draw per (image, channel), on every pixel
            noise = noise + self.config.offset_noise * draws.normal((*x0.shape[:2], *[1] * (x0.ndim - 2)))
        xt = self.schedule.q_sample(x0, t, noise).contiguous(memory_format=self.memory_format)
        output = network(xt, t, **batch.conditioning).sample.float()
        channels, loss = x0.shape[1], self.config.loss
        target = self.schedule.training_target(x0, noise, t)
        mse = F.mse_loss(output[:, :channels], target, reduction="none").flatten(1).mean(1)  # per sample
        if self.snr is not None:
            mse = mse * min_snr_weights(self.snr[t], self.config.snr_gamma, self.schedule.prediction_type)
        if loss == "simple":
            return mse.mean()
        if loss == "hybrid":
            output = torch.cat([output[:, :channels].detach(), output[:, channels:]], dim=1)
        vlb = vlb_terms(self.schedule, x0, xt, t, output, self.variance) * T
        per_sample = mse + self.config.vlb_weight * vlb if loss == "hybrid" else vlb
        if self.sampler is not None:
            self.sampler.update(t_global, per_sample)
            per_sample = per_sample * importance
        return per_sample.mean()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.sampler.state_dict() if self.sampler is not None else {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.sampler is not None:
            self.sampler.load_state_dict(tensors)

    @torch.no_grad()
    def validation_loss(self, network: Network, batch: Batch, noise: torch.Tensor) -> dict[int, float]:
        """L_simple on held-out images at VALIDATION_TIMESTEPS evenly spaced timesteps (the middle of each
        tenth of 0..T-1), the same noise each time: comparable from one validation to the next."""
        x0, T = batch.images, self.schedule.num_train_timesteps
        losses = {}
        for k in range(VALIDATION_TIMESTEPS):
            value = int((k + 0.5) * T / VALIDATION_TIMESTEPS)
            t = torch.full((x0.shape[0],), value, device=x0.device, dtype=torch.long)
            xt = self.schedule.q_sample(x0, t, noise).contiguous(memory_format=self.memory_format)
            output = network(xt, t, **batch.conditioning).sample.float()[:, :x0.shape[1]]
            losses[value] = F.mse_loss(output, self.schedule.training_target(x0, noise, t))
        return {t: float(loss) for t, loss in losses.items()}

    def export(self, run_dir: Path, ema_model: torch.nn.Module) -> None:
        """The run folder's diffusers pipeline (EMA weights), with the VAE of a latent run in vae/."""
        info = {"conditioning": self.config.conditioning, "class_names": self.class_names,
                "data": self._data_spec(), "resolution": sample_size(self.config.image_size)}
        if self.encoder is not None:
            info.update(text_encoder=self.config.text_encoder, max_length=self.encoder.max_length,
                        text_embedding=self.encoder.embedding)
        if self.vae is not None:
            info.update(latent=self.dataset.vae_name, image_size=[self.config.resolution] * 2)
        if self.config.lora_rank:  # the adapters and a pointer to the base model, not a whole pipeline
            from ddpm_cli.training.lora import export_lora

            export_lora(run_dir, ema_model, self.config, info)
            return
        if self.config.init_from and self.config.unet_config:
            from ddpm_cli.training.source import export_stable_diffusion, is_stable_diffusion, source_folder

            source = source_folder(self.config.init_from, self.config.revision)
            if is_stable_diffusion(source) and (source / "model_index.json").is_file():
                export_stable_diffusion(run_dir, ema_model, source)
                return
        checkpoints.export_pipeline(run_dir, ema_model, self.schedule.to_config(self.variance), info, self.vae)
        if self.encoder is not None and self.encoder.embedding == "sentence":
            self._export_captions(run_dir)

    def _export_captions(self, run_dir: Path) -> None:
        """captions.safetensors: every distinct training caption with its sentence vector (from the
        embeddings already computed for training), for txt2img's nearest-caption prior."""
        from ddpm_cli.engine.models.captions import CaptionIndex

        cache = self.captions.cache
        rows = [row for row, caption in enumerate(cache.captions) if caption]
        vectors = torch.nn.functional.normalize(cache.embeddings[rows, 0].float(), dim=-1)
        CaptionIndex([cache.captions[row] for row in rows], vectors.cpu(), self.encoder.identity).save(run_dir)

    def _data_spec(self) -> str:
        """The training data as `ddpm eval nll` can reopen it: a built-in's name or a folder's absolute path."""
        spec = str(self.config.data)
        return spec if spec in BUILTIN_DATASETS else str(Path(spec).expanduser().resolve())

    def preview(self, run_dir: Path, ema_model: torch.nn.Module, step: int) -> Path:
        pipeline = from_unet(ema_model, self.schedule, variance=self.variance, class_names=self.class_names,
                             text_encoder=self.encoder, vae=self.vae)
        # A conditional grid cycles through the classes or the first captions, guided with w = GRID_CFG.
        if self.class_names:
            condition = Condition([seed % len(self.class_names) for seed in GRID_SEEDS])
        elif self.captions is not None:
            prompts = self.captions.first_captions() or [""]
            condition = Condition(prompt=[prompts[seed % len(prompts)] for seed in GRID_SEEDS])
        else:
            condition = None
        steps = min(GRID_STEPS, self.schedule.num_train_timesteps)  # a short --num-train-timesteps has fewer
        images = sample_batch(pipeline, GRID_SEEDS, SamplerSettings("dpmpp-2m", steps), condition=condition,
                              cfg=GRID_CFG if condition else 1.0)
        path = grid_path(run_dir, step)
        save_png(make_grid(images), path, {"model": str(run_dir), "step": step, "sampler": "dpmpp-2m",
                                           "steps": steps, "seeds": f"{GRID_SEEDS[0]}-{GRID_SEEDS[-1]}"}, overwrite=True)
        return path
