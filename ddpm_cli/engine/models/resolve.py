"""Find a model: a local folder, a built-in name or a Hub id ("owner/name") -> a local folder.

One resolver for every kind of model (pipelines, VAEs, text encoders); each kind says which Hub
files it needs. Loading is in ``load.py``; the checks that run before anything loads weights are
in ``safety.py``. Imports no torch, so the CLI can list models without it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from ddpm_cli.engine.errors import ModelError

# What diffusers' configs cannot say (class names, training data) is kept beside them in this file.
MODEL_INFO_FILE = "ddpm_model.json"
BUILTIN_DIR = Path(__file__).resolve().parent.parent.parent / "data" / "models"

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
_TRUE = ("1", "true", "yes", "on")


# --------------------------------------------------------------------------- json

def read_json(path: Path | str) -> dict:
    """Read a JSON object from path; ModelError when it is missing, unreadable or not an object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError(f"{path} does not exist; re-download the model or pass a complete model folder") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} cannot be read ({exc}); re-download or re-export it") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); fix or re-download it") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} should hold a JSON object, not {type(data).__name__}; fix or re-download it")
    return data


def json_or_empty(path: Path | str) -> dict:
    """The JSON object in path, or {} when it is missing, unreadable or not an object (optional files)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------- resolution

def builtin_models() -> list[str]:
    """Names of the models shipped in ddpm_cli/data/models ([] when there are none)."""
    base = Path(BUILTIN_DIR)
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _is_model_folder(folder: Path) -> bool:
    return (
        (folder / "model_index.json").is_file()
        or (folder / "unet").is_dir()
        or (folder / "vae").is_dir()
        or (folder / "vqvae").is_dir()
        or (folder / "config.json").is_file()
    )


def _checked_folder(folder: Path) -> Path:
    pointer = folder / "ddpm_lora.json"  # a `ddpm train --lora-rank` run: adapters for a base model
    if not _is_model_folder(folder) and pointer.is_file():
        base = read_json(pointer).get("base_model")
        raise ModelError(f"{folder} holds LoRA adapters, not a model; load them onto their base model: "
                         f"ddpm sample {base} --lora {folder}")
    if not _is_model_folder(folder):
        raise ModelError(
            f"{folder} is not a diffusers model folder (no model_index.json); "
            "pass a folder written by save_pretrained or a Hub id"
        )
    return folder


def is_hub_id(model: str) -> bool:
    if model.count("/") != 1 or model.startswith(("/", ".", "~")) or "\\" in model:
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(model)
    except Exception:  # noqa: BLE001 - HFValidationError or anything odd means "not a Hub id"
        return False
    return True


def _hub_offline() -> bool:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        return False


def _hub_cache_dir() -> str | None:
    # huggingface_hub reads these at import time; read them again so a later change counts.
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"TransportError", "NetworkError", "ConnectError", "TimeoutException",
                         "ConnectTimeout", "ReadTimeout", "ProxyError", "SSLError", "OfflineModeIsEnabled"})


def hub_snapshot(repo: str, revision: str | None, allow_patterns: list[str],
                 ignore_patterns: list[str] | None = None) -> Path:
    """Download (or find in the cache) the matching files of a Hub repository; errors become one line."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    where = f"{repo}@{revision or 'main'}"
    unreachable = (
        f"{where} is not in the local cache and the Hub cannot be reached; "
        "download it on a connected machine or pass a local folder"
    )
    try:
        return Path(huggingface_hub.snapshot_download(
            repo,
            revision=revision,
            allow_patterns=allow_patterns,
            ignore_patterns=ignore_patterns,
            cache_dir=_hub_cache_dir(),
            local_files_only=_hub_offline(),
        ))
    except hf_errors.RevisionNotFoundError:
        raise ModelError(f"{where}: revision {revision or 'main'!r} does not exist on the Hub; check --revision") from None
    except hf_errors.GatedRepoError:
        raise ModelError(f"{where} is gated on the Hub; accept its terms and log in (hf auth login), or pass a local folder") from None
    except hf_errors.RepositoryNotFoundError:
        raise ModelError(f"{where} does not exist on the Hub or is private; check the name or log in (hf auth login)") from None
    except hf_errors.LocalEntryNotFoundError:
        raise ModelError(unreachable) from None
    except hf_errors.HfHubHTTPError as exc:
        if _is_connection_error(exc):
            raise ModelError(unreachable) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{where} could not be downloaded from the Hub ({first}); retry later or pass a local folder") from None
    except Exception as exc:  # noqa: BLE001 - only network-shaped errors are mapped here
        if _is_connection_error(exc):
            raise ModelError(unreachable) from None
        raise


def locate(spec: str, revision: str | None = None, *, what: str = "model",
           hub_files: list[str] | None = None, ignore: list[str] | None = None,
           builtins: dict[str, Callable[[], Path]] | None = None) -> Path:
    """The one resolver: spec -> local folder, for every kind of model.

    In order: an existing local folder; a built-in name (``builtins`` maps names to their folders,
    default the models shipped in ddpm_cli/data/models); a Hub id ("owner/name"), of which only
    ``hub_files`` are fetched (default every config, safetensors and tokenizer file). A missing path
    that looks local (./, ../, /, ~) is "no such folder", never a Hub look-up. ``what`` names the kind
    in messages ("VAE", "text encoder").
    """
    text = str(spec).strip()
    if builtins is None:
        builtins = {name: (lambda name=name: Path(BUILTIN_DIR) / name) for name in builtin_models()}
    listed = ", ".join(builtins) if builtins else "none installed"
    if not text:
        raise ModelError(f"no {what} was given; pass a local folder, a built-in name ({listed}) or a Hub id (owner/name)")
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ModelError(f"{local} is a file, not a {what} folder; pass the folder that holds its config")
    if text.startswith(("./", "../", "/", "~", ".\\", "..\\")):  # a local path, never a Hub id
        raise ModelError(f"no such folder: {text} is not an existing folder (built-in: {listed}; Hub ids: owner/name)")
    if text in builtins:
        return builtins[text]()
    if is_hub_id(text):
        return hub_snapshot(text, revision, hub_files or HUB_PATTERNS, ignore)
    raise ModelError(f"{what} {text!r} is not an existing folder, a built-in {what} ({listed}) or a Hub id "
                     "(owner/name); pass one of those")


def resolve_model(model: str, revision: str | None = None) -> Path:
    """Local folder, built-in name or Hub id ("owner/name") -> local folder holding a diffusers model."""
    return _checked_folder(locate(model, revision))
