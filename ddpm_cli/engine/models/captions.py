"""The training captions of a text-conditional model, kept beside it with their sentence embeddings
(``captions.safetensors``), and the nearest-caption prompt prior that uses them.

A class-conditional model takes prompts through the same prior: its class names are its captions
(``captions.safetensors`` when its folder has them for exactly those names, else encoded when first
needed by the sentence encoder ``PRIOR_ENCODER``), and a prompt draws the class nearest in meaning.

A small model trained on a few hundred captions draws those captions well and other wordings badly:
a prompt's sentence vector that lies between several captions ("a cat" between "cat face", "cat" and
"lion face") gets a mixture of them. The nearest-caption prior maps each prompt to the training
caption whose sentence vector is nearest (cosine similarity), which the model then draws: a
retrieval prior in the sense of DALL-E 2's text-to-image-embedding prior, by table look-up. Which
caption was drawn is said on stderr and stored in the image's metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm_cli.engine.choices import PRIORS
from ddpm_cli.engine.errors import ModelError

CAPTIONS_FILE = "captions.safetensors"
PRIOR_ENCODER = "minilm"  # encodes a class model's prompts and class names when its folder names no encoder


@dataclass
class CaptionIndex:
    """Captions and their unit-length sentence vectors (N×D float32)."""

    captions: list[str]
    vectors: torch.Tensor
    encoder: str  # the text encoder that made the vectors

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CaptionIndex | None:
        """The index in a model folder; None when it has none; ModelError when it is damaged."""
        from safetensors import SafetensorError, safe_open

        path = Path(folder) / CAPTIONS_FILE
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as file:
                meta = file.metadata() or {}
                vectors = file.get_tensor("vectors").float()
            captions = json.loads(meta["captions"])
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            raise ModelError(f"{path} is damaged ({exc}); re-export the model") from None
        if not isinstance(captions, list) or len(captions) != vectors.shape[0]:
            raise ModelError(f"{path} holds {vectors.shape[0]} vectors for {len(captions)} captions; re-export the model")
        return cls(captions, torch.nn.functional.normalize(vectors, dim=-1), meta.get("encoder", ""))

    def save(self, folder: str | os.PathLike, overwrite: bool = True) -> Path:
        """Write atomically (fp16 vectors, captions in the metadata)."""
        from safetensors.torch import save_file

        from ddpm_cli.engine.io.atomic import atomic_output

        path = Path(folder) / CAPTIONS_FILE
        with atomic_output(path, overwrite) as tmp:
            save_file({"vectors": self.vectors.to(torch.float16).contiguous().cpu()}, tmp,
                      metadata={"captions": json.dumps(self.captions, ensure_ascii=False), "encoder": self.encoder})
        return path

    def nearest(self, encoder, prompts: list[str]) -> list[tuple[str, float]]:
        """(nearest caption, cosine similarity) per prompt; a prompt that is a caption maps to itself."""
        known = {caption: i for i, caption in enumerate(self.captions)}
        unknown = [p for p in dict.fromkeys(prompts) if p not in known]
        found = {p: (p, 1.0) for p in prompts if p in known}
        if unknown:
            vectors = torch.nn.functional.normalize(encoder.encode(unknown)[0][:, 0].float(), dim=-1)
            similarity = vectors.cpu() @ self.vectors.T
            best = similarity.max(dim=1)
            for prompt, value, index in zip(unknown, best.values.tolist(), best.indices.tolist()):
                found[prompt] = (self.captions[index], round(value, 4))
        return [found[p] for p in prompts]


def prompt_captions(pipeline, prompts: list[str], prior: str | None = None) -> dict[str, tuple[str, float]]:
    """{prompt: (what the model is given, cosine similarity)} under ``prior`` ("nearest": the nearest
    training caption; "none": the prompt itself; None: the model's own, ``prompt_prior`` in its
    ddpm_model.json, else "none"). A class-conditional model is given the nearest class name."""
    from ddpm_cli.engine.errors import InputError

    if pipeline.class_prompted:
        if prior == "none":
            raise InputError(f"{pipeline.name} is class-conditional: a prompt draws the class nearest in meaning "
                             "(--prior nearest); --prior none needs a text-conditional model")
        index, encoder = class_captions(pipeline)
        return dict(zip(prompts, index.nearest(encoder, prompts)))
    prior = prior or pipeline.info.get("prompt_prior") or "none"
    if prior not in PRIORS:
        raise InputError(f"unknown prompt prior {prior!r}; choose one of {', '.join(PRIORS)}")
    if prior == "none":
        return {p: (p, 1.0) for p in prompts}
    index = CaptionIndex.load(pipeline.folder)
    if index is None or getattr(pipeline.text_encoder, "embedding", None) != "sentence":
        raise InputError(f"--prior nearest needs a model trained with --text-embedding sentence, whose run folder "
                         f"holds its training captions ({CAPTIONS_FILE}); {pipeline.name} has none")
    return dict(zip(prompts, index.nearest(pipeline.text_encoder, prompts)))


def class_captions(pipeline) -> tuple[CaptionIndex, object]:
    """(the caption index of a class model's names, the sentence encoder of its prompts): the index in the
    folder when it holds exactly these names, else made now. The encoder is loaded once per pipeline
    (``prompt_encoder``) and only when needed: a prompt that is a class name needs none."""
    names = pipeline.class_list
    index = CaptionIndex.load(pipeline.folder)
    if index is not None and index.captions == names and index.encoder:
        return index, _PromptEncoder(pipeline, index.encoder)
    encoder = _PromptEncoder(pipeline, PRIOR_ENCODER)
    return encode_captions(names, encoder), encoder


class _PromptEncoder:
    """A class model's prompt encoder, loaded on first use and kept on the pipeline."""

    def __init__(self, pipeline, spec: str):
        self.pipeline, self.identity = pipeline, spec

    def encode(self, texts: list[str]):
        from ddpm_cli.engine.models.text import TextEncoder

        loaded = self.pipeline.prompt_encoder
        if loaded is None or loaded.identity != self.identity:
            loaded = self.pipeline.prompt_encoder = TextEncoder.load(self.identity, self.pipeline.device,
                                                                     embedding="sentence")
        return loaded.encode(texts)


def encode_captions(names: list[str], encoder) -> CaptionIndex:
    """The caption index of ``names`` (class names: "_" reads as a space) under a sentence encoder."""
    vectors = torch.cat([encoder.encode([name.replace("_", " ") for name in names[start:start + 256]])[0][:, 0]
                         for start in range(0, len(names), 256)]).float().cpu()
    return CaptionIndex(list(names), torch.nn.functional.normalize(vectors, dim=-1), encoder.identity)
