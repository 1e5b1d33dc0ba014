"""A plain BERT loads without transformers (engine/models/text_bert.py) and encodes as transformers does:
same token ids, masks and truncated words, the same hidden states to float rounding; every other encoder
still loads with transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ddpm_cli.engine.models.text import TextEncoder
from ddpm_cli.engine.models.text_bert import BertEncoder, BertTokens

PROMPTS = ["a cat", "A RED Cat sitting on the Mat!", "naïve café crème brûlée", "🐱 emoji and 漢字 mixed", "",
           "   spaces   ", "word " * 50, "don't stop-believing, O'Neil's co-op", "tab\tand\nnewline",
           "[CLS] [SEP] [PAD] [MASK] cats", "x" * 150, "a blue dog on the mat"]


def both(spec: str, **options) -> tuple[TextEncoder, TextEncoder]:
    return TextEncoder.load(spec, "cpu", **options), TextEncoder.load(spec, "cpu", native=False, **options)


def assert_same(native: TextEncoder, reference: TextEncoder, atol: float):
    assert isinstance(native.model, BertEncoder) and isinstance(native.tokenizer, BertTokens)
    assert not isinstance(reference.model, BertEncoder) and not isinstance(reference.tokenizer, BertTokens)
    assert (native.max_length, native.hidden_size, native.kind) == (reference.max_length, reference.hidden_size, "bert")
    ours, theirs = native.tokenizer.batch(PROMPTS, native.max_length), reference.tokenizer.batch(PROMPTS, native.max_length)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert [native.truncated_words(p) for p in PROMPTS] == [reference.truncated_words(p) for p in PROMPTS]
    (hidden, mask), (expected, expected_mask) = native.encode(PROMPTS), reference.encode(PROMPTS)
    assert torch.equal(mask, expected_mask) and hidden.shape == expected.shape
    scale = expected.abs().max().item()
    assert torch.allclose(hidden, expected, atol=atol * scale, rtol=0)
    assert not torch.allclose(hidden[0], hidden[-1], atol=0.01 * scale)  # a check that can fail


def test_tiny_bert_tokens_and_states_equal_transformers(tiny_bert_dir):
    native, reference = both(str(tiny_bert_dir), max_length=12)
    assert_same(native, reference, atol=1e-5)
    assert native.truncated_words("a red cat sitting on the blue mat photo of cats") == ["cats"]


def test_builtin_minilm_sentence_vectors_equal_transformers():
    native, reference = both("minilm", embedding="sentence")
    assert_same(native, reference, atol=2e-5)
    tokens_native, tokens_reference = both("minilm")
    assert_same(tokens_native, tokens_reference, atol=2e-5)


def test_a_checkpoint_saved_with_its_head_loads_natively(tmp_path, tiny_bert_dir):
    """BertForMaskedLM stores the encoder under "bert."; both loaders take it and agree."""
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path / "mlm"
    shutil.copytree(tiny_bert_dir, folder)
    torch.manual_seed(1)
    BertForMaskedLM(BertConfig.from_pretrained(tiny_bert_dir)).save_pretrained(folder)
    native, reference = both(str(folder), max_length=12)
    assert_same(native, reference, atol=1e-5)


@pytest.mark.parametrize("change", ["relative_positions", "gelu_new", "cased_settings", "no_tokenizer_json",
                                    "pickled_weights"])
def test_what_it_does_not_reproduce_loads_with_transformers(tmp_path, tiny_bert_dir, change):
    folder = tmp_path / change
    shutil.copytree(tiny_bert_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    if change == "relative_positions":
        config["position_embedding_type"] = "relative_key"
    elif change == "gelu_new":
        config["hidden_act"] = "gelu_new"
    elif change == "cased_settings":  # transformers follows tokenizer_config.json over tokenizer.json
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "do_lower_case": False}))
    elif change == "no_tokenizer_json":
        (folder / "tokenizer.json").unlink()
    else:
        from safetensors.torch import load_file

        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    encoder = TextEncoder.load(str(folder), "cpu", max_length=12, allow_pickle=change == "pickled_weights")
    assert not isinstance(encoder.model, BertEncoder)
    assert encoder.encode(["a cat"])[0].shape == (1, 12, 32)
    if change == "cased_settings":
        assert encoder.tokenizer.batch(["A Cat"], 12)["input_ids"][0, 1].item() == 1  # [UNK]: "A" is not in the vocabulary


def test_dtype_and_frozen(tiny_bert_dir):
    encoder = TextEncoder.load(str(tiny_bert_dir), "cpu", dtype=torch.float64)
    assert isinstance(encoder.model, BertEncoder)
    assert encoder.encode(["a cat"])[0].dtype == torch.float64
    assert not any(p.requires_grad for p in encoder.model.parameters())
