"""Find a diffusers-format model (local folder, built-in, Hub id) and load it safely.

Safety rules: weights are checked by content before anything loads them. Pickle files
(torch.save, .bin/.ckpt/.pt) are refused unless the user passes --allow-pickle, since
unpickling can run arbitrary code; safetensors headers are validated so that truncated or
corrupt files fail with a clear message; folders that ship Python code are refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import torch

from ddpm_cli.engine.errors import ModelError, ResourceError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "data" / "models"

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".pkl")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
TRUSTED_LIBRARIES = ("diffusers", "transformers")

_MAX_HEADER = 100 * 1024 * 1024  # safetensors itself refuses headers above 100 MB
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
    "C64": 8,
}
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


def _download(repo: str, revision: str | None) -> Path:
    return _checked_folder(hub_snapshot(repo, revision, HUB_PATTERNS))


def resolve_model(model: str, revision: str | None = None) -> Path:
    """Local folder, built-in name or Hub id ("owner/name") -> local folder holding the model."""
    text = str(model).strip()
    if not text:
        raise ModelError("no model was given; pass a local folder, a built-in name or a Hub id (owner/name)")
    local = Path(text).expanduser()
    if local.is_dir():
        return _checked_folder(local)
    if local.exists():
        raise ModelError(f"{local} is a file, not a model folder; pass the folder that holds model_index.json")
    names = builtin_models()
    listed = ", ".join(names) if names else "none installed"
    if text.startswith(("./", "../", "/", "~", ".\\", "..\\")):  # a local path, never a Hub id
        raise ModelError(f"no such folder: {text} is not an existing folder (built-in models: {listed}; "
                         "Hub ids: owner/name)")
    if text in names:
        return _checked_folder(Path(BUILTIN_DIR) / text)
    if is_hub_id(text):
        return _download(text, revision)
    raise ModelError(
        f"model {text!r} is not an existing folder, a built-in model ({listed}) or a Hub id (owner/name); "
        "pass one of those"
    )


# --------------------------------------------------------------------------- safety checks

def _corrupt(path: Path, reason: str) -> ModelError:
    return ModelError(f"{path} is truncated or corrupt ({reason}); re-download or re-export it")


def _pickle_refused(path: Path) -> ModelError:
    return ModelError(
        f"{path} is a pickle checkpoint, which can run code when loaded; refused. "
        "Convert it to safetensors, or pass --allow-pickle if you trust its source"
    )


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file: u64 header length, then a JSON object starting with '{'."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _looks_like_pickle(head: bytes) -> bool:
    if head.startswith(b"PK\x03\x04"):  # torch.save zip archive (holds data.pkl)
        return True
    return head[:1] == b"\x80" and len(head) > 1 and 1 <= head[1] <= 5  # PROTO opcode


def _validate_safetensors(path: Path, size: int) -> None:
    if size == 0:
        raise _corrupt(path, "empty file")
    if size < 8:
        raise _corrupt(path, f"only {size} bytes, shorter than the 8-byte header length")
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n == 0:
            raise _corrupt(path, "header length is 0")
        if n > _MAX_HEADER:
            raise _corrupt(path, f"header length {n} is implausibly large")
        if 8 + n > size:
            raise _corrupt(path, f"header of {n} bytes runs past the end of the {size}-byte file")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(path, "header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise _corrupt(path, f"tensor {name!r} has no description")
        offsets, shape, dtype = info.get("data_offsets"), info.get("shape"), info.get("dtype")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in offsets)
            or offsets[0] > offsets[1]
        ):
            raise _corrupt(path, f"tensor {name!r} has bad data_offsets")
        if offsets[1] > data_size:
            raise _corrupt(path, f"tensor {name!r} ends at byte {offsets[1]} but only {data_size} data bytes exist")
        if isinstance(shape, list) and all(isinstance(v, int) and v >= 0 for v in shape) and dtype in _DTYPE_BYTES:
            expected = math.prod(shape) * _DTYPE_BYTES[dtype]
            if expected != offsets[1] - offsets[0]:
                raise _corrupt(path, f"tensor {name!r} should take {expected} bytes, not {offsets[1] - offsets[0]}")


def _check_no_code(folder: Path) -> None:
    index = folder / "model_index.json"
    if index.is_file():
        for key, value in read_json(index).items():
            if key.startswith("_") or not isinstance(value, (list, tuple)) or not value:
                continue
            library = value[0]
            if library is not None and library not in TRUSTED_LIBRARIES:
                raise ModelError(
                    f"{folder} ships its own code, which ddpm never runs (component {key!r} comes from "
                    f"{library!r}); use a model built only from diffusers/transformers classes"
                )
    for path in _walk(folder):
        if path.suffix == ".py":
            raise ModelError(
                f"{folder} ships its own code, which ddpm never runs ({path.relative_to(folder)}); "
                "use a model built only from diffusers/transformers classes"
            )


def _walk(folder: Path):
    """Files under folder, skipping hidden folders (such as .cache from the Hub)."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            yield Path(root) / name


def check_weights(folder: Path, allow_pickle: bool = False) -> None:
    """Refuse pickle weights (unless allowed), corrupt safetensors and folders shipping code.

    The format is read from each file's first bytes, never from its extension, and no
    file is unpickled here.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a folder; pass a diffusers model folder")
    _check_no_code(folder)
    for path in _walk(folder):
        if not path.name.lower().endswith(WEIGHT_SUFFIXES):
            continue
        try:
            size = path.stat().st_size
            with path.open("rb") as fh:
                head = fh.read(16)
        except OSError as exc:
            raise ModelError(f"{path} cannot be read ({exc.strerror or exc}); re-download it") from None
        if _looks_like_safetensors(head, size):
            _validate_safetensors(path, size)
        elif _looks_like_pickle(head):
            if not allow_pickle:
                raise _pickle_refused(path)
        elif path.name.lower().endswith(".safetensors"):
            _validate_safetensors(path, size)  # raises with the precise reason
            raise _corrupt(path, "not in safetensors format")
        elif size == 0:
            raise _corrupt(path, "empty file")
        elif not allow_pickle:
            # Neither safetensors nor a recognised torch file: a loader would try to unpickle it.
            raise _pickle_refused(path)


# --------------------------------------------------------------------------- loading

def _unet_location(folder: Path) -> tuple[str | None, Path]:
    if (folder / "unet" / "config.json").is_file():
        return "unet", folder / "unet" / "config.json"
    if (folder / "unet").is_dir():
        raise ModelError(f"{folder / 'unet'} has no config.json; re-download or re-export the model")
    if (folder / "config.json").is_file():
        return None, folder / "config.json"
    raise ModelError(f"{folder} has neither unet/config.json nor config.json; pass a diffusers model folder")


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers logs advice (install accelerate, dtype notes) that is noise on a CLI's stderr."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def load_unet(folder: Path, device: torch.device | str, dtype: torch.dtype, allow_pickle: bool = False):
    """Load the UNet of a diffusers folder (checked first), in eval mode on device/dtype."""
    import diffusers
    import safetensors

    folder = Path(folder)
    subfolder, config_path = _unet_location(folder)
    class_name = read_json(config_path).get("_class_name")
    if class_name not in UNET_CLASSES:
        raise ModelError(
            f"{config_path} describes a {class_name or 'model without _class_name'}, "
            f"but ddpm only loads {' or '.join(UNET_CLASSES)}; pass a pixel-space DDPM model"
        )
    check_weights(folder, allow_pickle=allow_pickle)
    cls = getattr(diffusers, class_name)
    loader_errors: tuple[type[BaseException], ...] = (
        OSError, ValueError, RuntimeError, KeyError, TypeError, EOFError,
        pickle.UnpicklingError, safetensors.SafetensorError,
    )
    try:
        with _quiet_diffusers():
            model = cls.from_pretrained(
                folder,
                subfolder=subfolder,
                use_safetensors=None if allow_pickle else True,
                local_files_only=True,
                low_cpu_mem_usage=False,
                torch_dtype=dtype,
            )
    except torch.OutOfMemoryError:
        raise ResourceError(f"out of memory while loading the UNet from {folder}; free memory or use a smaller model") from None
    except loader_errors as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ModelError(f"{folder} could not be loaded ({reason}); re-download or re-export the model") from None
    try:
        with _quiet_diffusers():
            model = model.to(device=torch.device(device), dtype=dtype)
    except torch.OutOfMemoryError:
        raise ResourceError(
            f"out of memory moving the UNet from {folder} to {device}; use a smaller dtype, "
            "another device or --device cpu"
        ) from None
    model.eval()
    return model


def load_scheduler_config(folder: Path) -> dict[str, Any]:
    """scheduler/scheduler_config.json (or a top-level scheduler_config.json); {} if none."""
    folder = Path(folder)
    for path in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if path.is_file():
            return read_json(path)
    return {}


def load_vae(folder: Path, device: torch.device | str, dtype: torch.dtype, subfolder: str | None = "vae",
             kind: str = "AutoencoderKL"):
    """The autoencoder in ``folder/vae`` (or ``folder`` itself with ``subfolder=None``), in eval mode:
    an AutoencoderKL, or with ``kind="VQModel"`` the VQ autoencoder of an LDM pipeline (``vqvae/``).

    The caller has checked the weights (check_weights)."""
    import diffusers

    folder = Path(folder)
    where = folder / subfolder if subfolder else folder
    class_name = read_json(where / "config.json").get("_class_name")
    if class_name != kind:
        raise ModelError(f"{where} holds a {class_name or 'model without _class_name'}; ddpm loads {kind} autoencoders there")
    try:
        with _quiet_diffusers():
            vae = getattr(diffusers, kind).from_pretrained(folder, subfolder=subfolder, use_safetensors=True,
                                                           local_files_only=True, low_cpu_mem_usage=False,
                                                           torch_dtype=dtype)
            return vae.to(device=torch.device(device), dtype=dtype).eval()
    except torch.OutOfMemoryError:
        raise ResourceError(f"out of memory while loading the VAE from {where}") from None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ModelError(f"{where} could not be loaded ({reason}); re-download or re-export the model") from None
