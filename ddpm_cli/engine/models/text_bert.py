"""Plain BERT encoders (the built-in MiniLM among them) on torch's own encoder layers, without transformers.

Importing transformers' BertModel and AutoTokenizer costs about 2.3 s of a cold ``ddpm txt2img`` on a 2-core
CPU (its model machinery imports torch._dynamo, torch.distributed.tensor and scipy.optimize), more than the
sampling. A plain BERT is word, position and token-type embeddings, a LayerNorm, then post-norm encoder
layers with GELU, which is what ``torch.nn.TransformerEncoderLayer`` computes: this module loads a BERT
checkpoint's safetensors onto those layers and tokenizes with its tokenizer.json through the `tokenizers`
library, the same tokenizer that transformers' fast tokenizer wraps. tests/test_text_bert.py checks that
ids, masks and hidden states equal transformers' (states to float rounding).

Anything else (another architecture, relative positions, other activations, pickled or sharded weights, no
tokenizer.json, a tokenizer class or settings other than BERT's) is loaded by transformers as before: see
:func:`plain_bert` and :func:`load_tokens`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch import nn

from ddpm_cli.engine.models.resolve import json_or_empty

WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
_TOKENIZER_CLASSES = (None, "BertTokenizer", "BertTokenizerFast")
_NO_LIMIT = 10 ** 30  # transformers' model_max_length when a tokenizer names none


def _tokenizer_settings(folder: Path) -> dict:
    """special_tokens_map.json overlaid by tokenizer_config.json, tokens given as {"content": ...} unwrapped."""
    settings = {**json_or_empty(folder / "special_tokens_map.json"), **json_or_empty(folder / "tokenizer_config.json")}
    return {key: value.get("content") if isinstance(value, dict) and "content" in value else value
            for key, value in settings.items()}


def plain_bert(config: dict, enc_dir: Path, tok_dir: Path) -> bool:
    """Whether the encoder in enc_dir is one this module reproduces, with a BERT tokenizer.json in tok_dir
    (whose content :func:`load_tokens` checks)."""
    return (config.get("model_type") == "bert"
            and config.get("position_embedding_type", "absolute") == "absolute"
            and config.get("hidden_act", "gelu") == "gelu"
            and not config.get("is_decoder") and not config.get("add_cross_attention")
            and all(isinstance(config.get(key), int) and config[key] > 0 for key in
                    ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                     "vocab_size", "max_position_embeddings", "type_vocab_size"))
            and (enc_dir / WEIGHTS).is_file() and (tok_dir / TOKENIZER).is_file()
            and _tokenizer_settings(tok_dir).get("tokenizer_class") in _TOKENIZER_CLASSES)


class BertOutput(NamedTuple):
    last_hidden_state: torch.Tensor


class BertEncoder(nn.Module):
    """BertModel's encoder stack (no pooler): input ids -> the last layer's hidden states."""

    def __init__(self, config: dict):
        super().__init__()
        width, eps = config["hidden_size"], float(config.get("layer_norm_eps", 1e-12))
        self.config = SimpleNamespace(hidden_size=width, max_position_embeddings=config["max_position_embeddings"])
        # Built on the meta device and then given the checkpoint's tensors: the embeddings skip their random
        # init, whose meta-device version imports torch._dynamo (0.6 s).
        self.word = nn.Embedding(config["vocab_size"], width, _weight=torch.empty(config["vocab_size"], width))
        self.position = nn.Embedding(config["max_position_embeddings"], width,
                                     _weight=torch.empty(config["max_position_embeddings"], width))
        self.token_type = nn.Embedding(config["type_vocab_size"], width,
                                       _weight=torch.empty(config["type_vocab_size"], width))
        self.norm = nn.LayerNorm(width, eps=eps)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, config["num_attention_heads"], config["intermediate_size"], dropout=0.0,
                                       activation="gelu", layer_norm_eps=eps, batch_first=True)
            for _ in range(config["num_hidden_layers"]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> BertOutput:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        states = self.norm(self.word(input_ids) + self.position(positions) + self.token_type(types))
        padding = None if attention_mask is None else attention_mask == 0
        for layer in self.layers:
            states = layer(states, src_key_padding_mask=padding)
        return BertOutput(states)


def _weight_names(layers: int) -> dict[str, str | tuple[str, ...]]:
    """BertEncoder's parameter -> the checkpoint's tensor (three for the packed query/key/value)."""
    names: dict[str, str | tuple[str, ...]] = {
        "word.weight": "embeddings.word_embeddings.weight",
        "position.weight": "embeddings.position_embeddings.weight",
        "token_type.weight": "embeddings.token_type_embeddings.weight",
        "norm.weight": "embeddings.LayerNorm.weight", "norm.bias": "embeddings.LayerNorm.bias"}
    for i in range(layers):
        ours, theirs = f"layers.{i}.", f"encoder.layer.{i}."
        for end in ("weight", "bias"):
            names[ours + f"self_attn.in_proj_{end}"] = tuple(theirs + f"attention.self.{part}.{end}"
                                                             for part in ("query", "key", "value"))
            names[ours + f"self_attn.out_proj.{end}"] = theirs + f"attention.output.dense.{end}"
            names[ours + f"norm1.{end}"] = theirs + f"attention.output.LayerNorm.{end}"
            names[ours + f"linear1.{end}"] = theirs + f"intermediate.dense.{end}"
            names[ours + f"linear2.{end}"] = theirs + f"output.dense.{end}"
            names[ours + f"norm2.{end}"] = theirs + f"output.LayerNorm.{end}"
    return names


def load_model(folder: str) -> BertEncoder:
    """The encoder in folder (config.json, model.safetensors); KeyError when a tensor is missing."""
    from safetensors import safe_open

    config = json_or_empty(Path(folder) / "config.json")
    with torch.device("meta"):
        model = BertEncoder(config)
    with safe_open(str(Path(folder) / WEIGHTS), framework="pt") as weights:
        stored = set(weights.keys())
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in stored else ""

        def tensor(name: str) -> torch.Tensor:
            if prefix + name not in stored:
                raise KeyError(f"{WEIGHTS} has no tensor {prefix + name}")
            return weights.get_tensor(prefix + name).float()

        state = {ours: torch.cat([tensor(n) for n in theirs]) if isinstance(theirs, tuple) else tensor(theirs)
                 for ours, theirs in _weight_names(config["num_hidden_layers"]).items()}
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


class BertTokens:
    """A BERT tokenizer.json through the `tokenizers` library: the calls TextEncoder makes of a tokenizer."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(Path(folder) / TOKENIZER))
        self.settings = _tokenizer_settings(Path(folder))
        pad = self.settings.get("pad_token", "[PAD]")  # transformers' default for BERT
        self.pad_token_id = self.tokenizer.token_to_id(pad) if isinstance(pad, str) else None
        self.pad_token = pad if self.pad_token_id is not None else None
        limit = self.settings.get("model_max_length")
        self.model_max_length = limit if isinstance(limit, int) else _NO_LIMIT

    def special_tokens(self) -> int:
        return self.tokenizer.num_special_tokens_to_add(False)

    def batch(self, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and token_type_ids, padded and truncated to max_length tokens."""
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(length=max_length, pad_id=self.pad_token_id, pad_token=self.pad_token)
        encoded = self.tokenizer.encode_batch(prompts)
        return {"input_ids": torch.tensor([e.ids for e in encoded], dtype=torch.long),
                "attention_mask": torch.tensor([e.attention_mask for e in encoded], dtype=torch.long),
                "token_type_ids": torch.tensor([e.type_ids for e in encoded], dtype=torch.long)}

    def pieces(self, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The prompt's token ids without special tokens, and each token's (start, end) in the prompt."""
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        encoded = self.tokenizer.encode(prompt, add_special_tokens=False)
        return list(encoded.ids), list(encoded.offsets)


def _single(processor: dict, cls: str, sep: str) -> bool:
    """Whether a post-processor makes [CLS] text [SEP] of one text, all of token type 0."""
    if processor.get("type") == "BertProcessing":
        return [p[0] for p in (processor.get("cls"), processor.get("sep")) if p] == [cls, sep]
    pieces = [next(iter(piece.items())) for piece in processor.get("single") or []]
    return (processor.get("type") == "TemplateProcessing"
            and [(kind, part.get("id"), part.get("type_id")) for kind, part in pieces]
            == [("SpecialToken", cls, 0), ("Sequence", "A", 0), ("SpecialToken", sep, 0)])


def _same_as_transformers(tokens: BertTokens) -> bool:
    """Whether the tokenizer tokenizes as transformers' BERT tokenizer does with the folder's settings:
    transformers builds its normalizer and special tokens from tokenizer_config.json, not from the file."""
    from tokenizers import models, normalizers, pre_tokenizers

    tokenizer, settings = tokens.tokenizer, tokens.settings
    model, normalizer, processor = tokenizer.model, tokenizer.normalizer, tokenizer.post_processor
    return (isinstance(model, models.WordPiece) and model.continuing_subword_prefix == "##"
            and model.unk_token == settings.get("unk_token", "[UNK]")
            and isinstance(normalizer, normalizers.BertNormalizer) and normalizer.clean_text
            and (normalizer.handle_chinese_chars, normalizer.strip_accents, normalizer.lowercase)
            == (settings.get("tokenize_chinese_chars", True), settings.get("strip_accents"),
                settings.get("do_lower_case", True))
            and isinstance(tokenizer.pre_tokenizer, pre_tokenizers.BertPreTokenizer)
            and processor is not None
            and _single(json.loads(processor.__getstate__()), settings.get("cls_token", "[CLS]"),
                        settings.get("sep_token", "[SEP]")))


def load_tokens(folder: str) -> BertTokens | None:
    """The BERT tokenizer in folder, or None where transformers would tokenize otherwise (it then loads it)."""
    tokens = BertTokens(folder)
    try:
        return tokens if _same_as_transformers(tokens) else None
    except (AttributeError, TypeError, ValueError, StopIteration):  # a post-processor of another shape
        return None
