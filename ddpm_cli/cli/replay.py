"""``ddpm replay IMG.png...``: make an image again from the settings in its ``ddpm`` metadata chunk.

Each image's chunk names the command that made it (sample, txt2img, inpaint, upscale) and every
setting that changes its pixels. ``KEYS`` below is the one table from metadata keys to that
command's flags; replay builds the command line from it (one image: its seed, ``-n 1``, ``-o`` the
output file) and runs the same Typer command in this process, so every check of the command applies.
On the same device and dtype the new PNG is byte-identical to the old one, metadata included. An
image made in a batch of several is made again in a batch as large (``batch_run``): batched kernels
may round its last bits differently otherwise. A frame of --interpolate is made with its frames.

Refused before anything runs (one line, exit 2, nothing written): a PNG without ``ddpm`` metadata, a
key in it that replay does not know, ``--set`` of a key the command does not take, an input file
(image, mask, init image or noise) that is missing or whose SHA-256 differs from the recorded one
(``--set image=PATH`` uses another file on purpose), and an output that exists without --overwrite.
Weights that changed since (``model_sha256``) only warn: the model is the user's to update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from ddpm_cli.cli.errors import EXIT_USAGE, fail, handle_errors, writable_folder
from ddpm_cli.cli.progress import say
from ddpm_cli.engine.diffusion.registry import OPTIONS

GENERATING = ("sample", "txt2img", "inpaint", "upscale")
IMAGE_FROM = ("sample", "txt2img")  # the commands that start from an init image or init noise
ARG = "ARG"  # a positional argument, in the order of the table
REPLAY = "(replay)"  # used by replay itself, not passed on
DTYPE_FLAGS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

EXAMPLES = """
Examples:

\b
  ddpm replay samples/000005.png                        # the same image again: replay/000005.png
  ddpm replay samples/*.png -o more-steps --set steps=100
  ddpm replay cat-000003.png --set sampler=ddim --set steps=50 -o ddim/
  ddpm replay gpu/000001.png --set device=cpu --set dtype=fp32    # made on a GPU, replayed on the CPU
"""


@dataclass(frozen=True)
class Key:
    """How one metadata key goes back to the command: ``flag`` VALUE, the bare ``flag`` when
    ``switch`` and the value is true, a positional argument (ARG), or nothing (``flag`` None: recorded
    for information, or checked, as the ``*_sha256`` of inputs and weights are)."""

    name: str
    flag: str | None
    commands: tuple[str, ...] = GENERATING
    switch: bool = False  # "--a/--no-a": the first flag when true, the second when false
    values: tuple[tuple[object, str], ...] = ()  # recorded value -> the flag's spelling of it
    checks: str | None = None  # the input file whose SHA-256 this key records


KEYS: tuple[Key, ...] = (
    Key("model", ARG),
    Key("prompt", ARG, ("txt2img",)),
    Key("image", ARG, ("upscale",)),
    Key("prompt", "--prompt", ("inpaint", "upscale")),
    Key("negative_prompt", "--negative-prompt", ("txt2img", "inpaint", "upscale")),
    Key("prior", "--prior", ("txt2img",)),
    Key("caption", None, ("txt2img",)),  # the training caption --prior nearest drew: follows from prompt and model
    Key("image", "--image", ("inpaint",)),
    Key("mask", "--mask", ("inpaint",)),
    Key("invert_mask", "--invert-mask", ("inpaint",), switch=True),
    Key("resize_mask", "--resize-mask", ("inpaint",), switch=True),
    Key("preserve_known", "--preserve-known", ("inpaint",), switch=True),
    Key("jump_length", "--jump-length", ("inpaint",)),
    Key("jump_n_sample", "--jump-n-sample", ("inpaint",)),
    Key("class", "--class", ("sample", "inpaint")),
    Key("cfg", "--cfg"),
    Key("cfg_rescale", "--cfg-rescale"),
    Key("sampler", "--sampler"),
    Key("steps", "--steps"),
    Key("spacing", "--spacing"),
    *(Key(name, option.flag) for name, option in OPTIONS.items()),  # every sampler option: eta, variance...
    Key("clip_x0", "--clip-x0", values=((True, "on"), (False, "off"))),
    Key("seed", "--seed"),
    Key("size", "--width/--height", ("txt2img",)),  # WIDTHxHEIGHT
    Key("scale", "--scale", ("upscale",)),
    Key("tile", "--tile", ("upscale",)),
    Key("overlap", "--overlap", ("upscale",)),
    Key("noise_level", "--noise-level", ("upscale",)),
    Key("init_image", "--init-image", IMAGE_FROM),
    Key("strength", "--strength", IMAGE_FROM),
    Key("resize", "--resize", IMAGE_FROM, switch=True),
    Key("init_noise", "--init-noise", IMAGE_FROM),
    Key("init_noise_row", "--init-noise-row", IMAGE_FROM),
    Key("interpolate", "--interpolate", IMAGE_FROM),  # a frame: every frame is made, this one kept
    Key("frames", "--frames", IMAGE_FROM),
    Key("frame", None, IMAGE_FROM),  # which frame; its seed is the run's first seed + frame
    Key("batch_size", REPLAY),  # images in the network batch that made it: made again in one as large
    Key("batch_index", REPLAY),  # its place there
    Key("dtype", "--dtype", values=tuple(DTYPE_FLAGS.items())),
    Key("device", "--device"),
    Key("revision", "--revision"),  # the Hub commit the model was read from
    Key("lora", "--lora"),  # a list: one --lora PATH:SCALE each
    # recorded for information, or checked, never passed:
    Key("size", None, ("sample", "inpaint", "upscale")),  # follows from the model or the input image
    *(Key(name, None) for name in ("command", "task", "class_name", "version", "model_sha256", "lora_sha256")),
    *(Key(f"{name}_sha256", None, checks=name) for name in ("image", "mask", "init_image", "init_noise")),
)


def key_for(name: str, command: str) -> Key | None:
    return next((key for key in KEYS if key.name == name and command in key.commands), None)


def settable(command: str) -> list[str]:
    return list(dict.fromkeys(key.name for key in KEYS if command in key.commands and key.flag is not None))


def command_of(meta: dict) -> str:
    """The command that made an image; images from before replay existed are told by their keys."""
    if "command" in meta:
        return meta["command"]
    task = meta.get("task")
    return task if task in ("inpaint", "upscale") else "txt2img" if "prompt" in meta else "sample"


def parse_sets(sets: list[str]) -> dict[str, str]:
    changes = {}
    for item in sets:
        name, equals, value = item.partition("=")
        if not equals or not name.strip():
            raise fail(f"--set takes KEY=VALUE (e.g. steps=50), got {item!r}", EXIT_USAGE)
        changes[name.strip().replace("-", "_")] = value
    return changes


def settings_for(path: Path, meta: dict, changes: dict[str, str]) -> tuple[str, dict]:
    """(command, the settings to replay): the recorded ones with ``changes``; refuses what cannot be replayed."""
    from ddpm_cli.engine.diffusion.registry import REGISTRY

    if not meta:
        raise fail(f"{path} has no ddpm metadata (not made by ddpm, or its text chunks were stripped); "
                   "nothing to replay", EXIT_USAGE)
    if "images" in meta and "seed" not in meta:
        raise fail(f"{path} is a grid of {meta['images']} images; replay the images themselves", EXIT_USAGE)
    command = command_of(meta)
    if command not in GENERATING:
        raise fail(f"{path}: unknown command {command!r} in its metadata; replay takes images of "
                   f"{', '.join(GENERATING)}", EXIT_USAGE)
    unknown = [name for name in meta if key_for(name, command) is None]
    if unknown:
        raise fail(f"{path}: replay does not know the setting {unknown[0]!r} of `ddpm {command}`, so it cannot "
                   "make the image again exactly (a newer ddpm wrote it?)", EXIT_USAGE)
    for name in changes:
        key = key_for(name, command)
        if key is None or key.flag is None:
            raise fail(f"--set {name}: not a setting of `ddpm {command}` that replay can change; one of "
                       f"{', '.join(settable(command))}", EXIT_USAGE)
    settings = {**meta, **changes}
    old, new = meta.get("sampler"), settings.get("sampler")
    if "sampler" in changes and old in REGISTRY and new in REGISTRY and new != old:
        # another sampler: the old one's options and usual spacing go, unless --set says otherwise
        for name in OPTIONS:
            if name not in REGISTRY[new].options and name not in changes:
                settings.pop(name, None)
        if "spacing" not in changes and settings.get("spacing") == REGISTRY[old].spacing:
            settings.pop("spacing")
    dropped = [name for name, value in changes.items() if value == ""]  # --set KEY= : not given at all
    return command, {name: value for name, value in settings.items() if value is not None and name not in dropped}


def check_inputs(path: Path, command: str, settings: dict, changes: dict[str, str]) -> None:
    """Every input file exists and, unless --set replaced it, is the one the image was made from."""
    from ddpm_cli.engine.models.fingerprint import file_sha256

    for key in KEYS:
        if key.checks is None or key.checks not in settings or command not in key.commands:
            continue
        source = Path(settings[key.checks])
        if not source.is_file():
            raise fail(f"{path}: its {key.checks.replace('_', ' ')} {source} is missing; restore it or "
                       f"--set {key.checks}=PATH", EXIT_USAGE)
        if key.checks not in changes and key.name in settings and file_sha256(source) != settings[key.name]:
            raise fail(f"{path}: {source} has changed since the image was made (SHA-256 differs); restore it, "
                       f"or --set {key.checks}={source} to use it as it is now", EXIT_USAGE)


def check_model(path: Path, settings: dict, quiet: bool) -> None:
    """Warn in one line when the model's U-Net weights are not the ones the image was made with."""
    from ddpm_cli.engine.models.fingerprint import weights_sha256
    from ddpm_cli.engine.models.resolve import resolve_model

    recorded = settings.get("model_sha256")
    if recorded is None:
        return
    now = weights_sha256(resolve_model(settings["model"], settings.get("revision")))
    if now != recorded:
        say(f"ddpm: warning: {path}: the weights of {settings['model']} changed since the image was made "
            f"(SHA-256 {recorded[:12]} then, {str(now)[:12]} now); the replay will differ", quiet)


def command_line(command: str, settings: dict, output: Path, *extra: str, single: bool = True) -> list[str]:
    """The arguments of `ddpm COMMAND` that make this one image again, written to ``output``, with
    the options ``extra``. A recorded setting whose flag the command does not have is left out: no one
    could have changed it from its default."""
    flags = options_of(command)
    options, positional = [], []
    done = set()
    for key in KEYS:
        if command not in key.commands or key.flag in (None, REPLAY) or key.name not in settings or key.name in done:
            continue
        done.add(key.name)
        value = settings[key.name]
        if key.flag == ARG:
            positional.append(str(value))
        elif key.switch:
            on, _, off = key.flag.partition("/")
            given = on if str(value).lower() in ("1", "true", "yes", "on") else off
            options += [given] if given in flags else []
        elif isinstance(value, list) and key.flag in flags:  # a repeatable option
            options += [word for item in value for word in (key.flag, str(item))]
        elif key.flag == "--width/--height":
            width, _, height = str(value).partition("x")
            options += ["--width", width, "--height", height]
        elif key.flag in flags:
            options += [key.flag, next((word for known, word in key.values if known == value), str(value))]
    count = ["-n", "1"] if single else []
    return [command, *options, *count, "-o", str(output), *extra, "--", *positional]


def commands():
    """The generating commands as one Click group, to run in this process."""
    from ddpm_cli.cli import inpaint, sample, txt2img, upscale

    group = typer.Typer(rich_markup_mode=None, pretty_exceptions_enable=False)
    for name, module in (("sample", sample), ("txt2img", txt2img), ("inpaint", inpaint), ("upscale", upscale)):
        group.command(name)(getattr(module, name))
    return typer.main.get_command(group)


def options_of(command: str) -> set[str]:
    """Every flag spelling `ddpm COMMAND` takes."""
    params = commands().commands[command].params
    return {flag for param in params for flag in (*param.opts, *getattr(param, "secondary_opts", ()))}


def run_command(args: list[str]) -> int:
    """Run `ddpm ARGS` in this process (sample, txt2img, inpaint or upscale) and return its exit code."""
    try:
        code = commands().main(args=args, prog_name="ddpm", standalone_mode=False)
    except typer.TyperException as exc:
        raise fail(f"{' '.join(exc.format_message().split())} (replaying: ddpm {' '.join(args)})", EXIT_USAGE) from None
    return code if isinstance(code, int) else 0


def made_alone(settings: dict) -> bool:
    """Whether the image was made alone: one image in its network batch and not a frame."""
    return "interpolate" not in settings and int(settings.get("batch_size", 1)) <= 1


def batch_run(settings: dict) -> tuple[dict, list[str], Callable[[Path], bool]]:
    """(settings, extra options, which file to keep) that remake the image inside a batch like its own.

    Batched kernels can round a pixel's last bit differently at another batch size (measured on the
    built-in emoji model: 2 of 3072 values differ by 1 between batches of 1 and 2), so an image made
    in a batch of B is made again in a batch of B at the same place, beside B - 1 other seeds, whose
    images are thrown away. A frame of --interpolate is made again with all its frames (frame k has
    the run's first seed + k), B at a time."""
    from ddpm_cli.engine.io.images import read_png_metadata

    size, index, seed = int(settings.get("batch_size", 1)), int(settings.get("batch_index", 0)), int(settings["seed"])
    if "interpolate" in settings:
        frame = int(settings.get("frame", 0))
        return {**settings, "seed": seed - frame}, ["-b", str(size)], lambda p: p.name.endswith(f"frame-{frame:03d}.png")
    before = list(range(seed - index, seed)) if seed >= index else [seed + size + j for j in range(index)]
    seeds = [*before, seed, *range(seed + 1, seed + size - index)]
    batch = {name: value for name, value in settings.items() if name != "seed"}
    if "init_noise_row" in settings:  # image j of the run starts from row N + j
        batch["init_noise_row"] = int(settings["init_noise_row"]) - index
    return batch, ["--seeds", ",".join(map(str, seeds)), "-b", str(size)], \
        lambda p: read_png_metadata(p).get("seed") == seed


def replay_in_batch(command: str, settings: dict, target: Path, overwrite: bool, extra: list[str]) -> int:
    """Make the image again as ``batch_run`` says, in a hidden folder beside ``target``; publish it as
    ``target`` and remove the rest."""
    import contextlib
    import io
    import shutil
    import tempfile

    from ddpm_cli.engine.io.atomic import publish

    batch, options, keep = batch_run(settings)
    folder = Path(tempfile.mkdtemp(prefix=".replay-", dir=target.parent))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the temporary paths
            code = run_command(command_line(command, batch, folder, *options, *extra, single=False))
        if code:
            return code
        made = [path for path in sorted(folder.glob("*.png")) if keep(path)]
        if len(made) != 1:
            raise fail(f"replaying {target.name} did not make it again (was --frames changed?)", EXIT_USAGE)
        publish(made[0], target, overwrite)
        print(target, flush=True)
        return 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@handle_errors
def replay(
    images: Annotated[list[Path], typer.Argument(metavar="IMG.png", show_default=False, help="PNGs written by sample, txt2img, inpaint or upscale.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the new images, each under its original file name.")] = Path("replay"),
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", show_default=False, help="Change one recorded setting (repeatable): steps=50, sampler=ddim, seed=7, cfg=3, prompt=..., device=cpu, dtype=fp32, image=PATH... Another sampler drops the old one's options and usual spacing.")] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Load pickle (.bin/.ckpt) weights. They can run code: only for sources you trust.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace output files that exist (the original too, if -o is its folder).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or log lines on stderr (errors still print).")] = False,
) -> None:
    """Make images again from the settings in their PNG metadata; print the new paths.

    With nothing changed, on the same device and dtype, each new PNG is byte-identical to the old one.
    --set takes the keys of the image's metadata (docs/usage.md lists them and the flag each becomes).
    A missing or changed input file (image, mask, init image or noise) is refused; weights that
    changed since (model_sha256) warn.
    """
    from ddpm_cli.engine.io.images import read_png_metadata

    changes = parse_sets(set_ or [])
    plans, targets = [], {}
    for path in images:
        command, settings = settings_for(path, read_png_metadata(path), changes)
        target = output / path.name
        if target in targets:
            raise fail(f"{targets[target]} and {path} would both be replayed to {target}; replay them to "
                       "different -o folders", EXIT_USAGE)
        if target.exists() and not overwrite:
            raise fail(f"{target} exists; pass --overwrite to replace it or choose another -o", EXIT_USAGE)
        check_inputs(path, command, settings, changes)
        targets[target] = path
        plans.append((path, command, settings, target))
    writable_folder(output)
    for path, command, settings, target in plans:
        check_model(path, settings, quiet)
        extra = ["--allow-pickle"] * allow_pickle + ["-q"] * quiet
        if made_alone(settings):
            code = run_command(command_line(command, settings, target, *extra, *["--overwrite"] * overwrite))
        else:
            code = replay_in_batch(command, settings, target, overwrite, extra)
        if code:
            raise typer.Exit(code)
