"""Tests for captions: folders (metadata.jsonl, .txt sidecars) and the built-in emoji data set."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_cli.engine.errors import InputError
from ddpm_cli.data import captions as cap
from ddpm_cli.data.sources import BUILTIN_DATASETS, ArrayImageSet, FolderImageSet, open_dataset
from ddpm_cli.data.batches import BatchLoader, EpochBatches


def _save(path: Path, colour=(200, 100, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), colour).save(path)
    return path


def _jsonl(path: Path, *entries) -> None:
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------- folders


def test_metadata_jsonl_captions_including_subfolder(tmp_path):
    _save(tmp_path / "b.png")
    _save(tmp_path / "sub" / "a.jpg")
    _jsonl(tmp_path / "metadata.jsonl",
           {"file_name": "sub/a.jpg", "text": "an apple", "extra": 1},
           "",  # blank lines are allowed
           {"file_name": "b.png", "text": "a bee"})
    ds = open_dataset(str(tmp_path), 16)
    assert isinstance(ds, FolderImageSet) and len(ds) == 2  # metadata.jsonl is not an image
    assert [p.name for p in ds.paths] == ["b.png", "a.jpg"]
    assert ds.captions == ["a bee", "an apple"]


def test_txt_sidecars(tmp_path):
    _save(tmp_path / "cat.png")
    _save(tmp_path / "dog.webp")
    (tmp_path / "cat.txt").write_text("  a cat\n")
    (tmp_path / "dog.txt").write_text("a dog")
    ds = FolderImageSet(tmp_path, 16)
    assert len(ds) == 2  # .txt files are not images
    assert ds.captions == ["a cat", "a dog"]


def test_metadata_first_then_txt_for_the_rest(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _save(tmp_path / name)
    _jsonl(tmp_path / "metadata.jsonl", {"file_name": "a.png", "text": "from metadata"})
    (tmp_path / "a.txt").write_text("ignored: metadata wins")
    (tmp_path / "b.txt").write_text("from b.txt")
    (tmp_path / "c.txt").write_text("from c.txt")
    assert FolderImageSet(tmp_path, 16).captions == ["from metadata", "from b.txt", "from c.txt"]


def test_partially_captioned_names_the_first_image_without_one(tmp_path):
    for name in ("a.png", "b.png", "cat.png"):
        _save(tmp_path / name)
    (tmp_path / "a.txt").write_text("an a")
    _jsonl(tmp_path / "metadata.jsonl", {"file_name": "cat.png", "text": "a cat"})
    with pytest.raises(InputError) as exc:
        open_dataset(str(tmp_path), 16)
    message = _one_line(exc)
    assert str(tmp_path / "b.png") in message and "b.txt" in message
    assert "caption every image or none" in message
    assert exc.value.exit_code == 2


def test_bad_json_line_names_file_and_line(tmp_path):
    _save(tmp_path / "a.png")
    _save(tmp_path / "b.png")
    _jsonl(tmp_path / "metadata.jsonl", {"file_name": "a.png", "text": "x"}, '{"file_name": "b.png", "text": ')
    with pytest.raises(InputError) as exc:
        FolderImageSet(tmp_path, 16)
    message = _one_line(exc)
    assert "metadata.jsonl line 2" in message and "invalid JSON" in message


def test_entry_without_text_is_refused(tmp_path):
    _save(tmp_path / "a.png")
    _jsonl(tmp_path / "metadata.jsonl", {"file_name": "a.png", "caption": "x"})
    with pytest.raises(InputError, match=r"metadata\.jsonl line 1: .*\"text\""):
        FolderImageSet(tmp_path, 16)


def test_entry_for_missing_file(tmp_path):
    _save(tmp_path / "a.png")
    _jsonl(tmp_path / "metadata.jsonl", {"file_name": "a.png", "text": "x"}, {"file_name": "gone.png", "text": "y"})
    with pytest.raises(InputError) as exc:
        FolderImageSet(tmp_path, 16)
    message = _one_line(exc)
    assert "line 2" in message and "gone.png" in message and "does not exist" in message


def test_duplicate_entry_is_refused(tmp_path):
    _save(tmp_path / "a.png")
    _jsonl(tmp_path / "metadata.jsonl", {"file_name": "a.png", "text": "x"}, {"file_name": "./a.png", "text": "y"})
    with pytest.raises(InputError, match="line 2: second entry"):
        FolderImageSet(tmp_path, 16)


def test_no_captions_is_none(tmp_path):
    _save(tmp_path / "a.png")
    _save(tmp_path / "b.png")
    (tmp_path / "notes.md").write_text("not a caption")
    ds = FolderImageSet(tmp_path, 16)
    assert ds.captions is None and len(ds) == 2


def test_array_set_captions_and_loader():
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    ds = ArrayImageSet(images, captions=["a", "b", "c", "d"])
    assert ds.captions == ["a", "b", "c", "d"] and ArrayImageSet(images).captions is None
    with pytest.raises(ValueError):
        ArrayImageSet(images, captions=["a"])
    loader = BatchLoader(ds, EpochBatches(4, 2, seed=0))
    idx = loader.batches.indices(0)
    assert loader.captions(idx) == [ds.captions[i] for i in idx]
    assert BatchLoader(ArrayImageSet(images), EpochBatches(4, 2, seed=0)).captions(idx) is None


# ---------------------------------------------------------------- emoji


def test_emoji_missing_font_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r"fonts-noto-color-emoji \(apt-get install -y fonts-noto-color-emoji\)"):
        cap.load_emoji(32, font=tmp_path / "absent.ttf")
    assert "emoji" in BUILTIN_DATASETS


@pytest.mark.skipif(not cap.EMOJI_FONT.is_file(), reason="needs the Debian package fonts-noto-color-emoji")
def test_emoji_builtin_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = cap.emoji_cache_path()
    assert cache.parent == tmp_path / "cache" / "ddpm-cli" and cache.name.startswith("emoji-109-")
    assert cache.name.endswith("-64.npz") and not cache.exists()

    ds = open_dataset("emoji", 32)
    assert isinstance(ds, ArrayImageSet) and ds.name == "emoji" and ds.source == str(cap.EMOJI_FONT)
    assert ds.images.dtype == torch.uint8 and tuple(ds.images.shape[1:]) == (3, 32, 32) and ds.channels == 3
    assert len(ds) > 900 and len(ds.captions) == len(ds) and ds.labels is None
    assert "cat face" in ds.captions and "red apple" in ds.captions
    assert len(set(ds.captions)) == len(ds.captions)
    assert cache.is_file()

    apple = ds.images[ds.captions.index("red apple")].permute(1, 2, 0).numpy().astype(np.float64)
    coloured = apple[(apple < 230).any(axis=2)]  # pixels that are not near-white
    assert len(coloured) > 100
    r, g, b = coloured.mean(axis=0)
    assert r > g and r > b
    corners = ds.images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # N×3×4
    for name in ("red apple", "cat face"):
        assert (corners[ds.captions.index(name)] == 255).all()
    assert (corners == 255).all(dim=2).all(dim=1).float().mean() > 0.8

    def no_render(*args, **kwargs):
        raise AssertionError("rendered again instead of reading the cache")

    monkeypatch.setattr(cap, "render_emoji", no_render)
    start = time.perf_counter()
    again = open_dataset("emoji", 32, split="test")  # no held-out split: the same images
    assert time.perf_counter() - start < 1.0
    assert torch.equal(again.images, ds.images) and again.captions == ds.captions

    grey = open_dataset("emoji", 32, channels=1)
    assert tuple(grey.images.shape[1:]) == (1, 32, 32) and grey.channels == 1
    k = ds.captions.index("red apple")
    pil_grey = np.asarray(Image.fromarray(ds.images[k].permute(1, 2, 0).numpy()).convert("L"))
    assert np.array_equal(grey.images[k, 0].numpy(), pil_grey)
    with pytest.raises(InputError, match="16 or more"):
        open_dataset("emoji", 8)


@pytest.mark.skipif(not cap.EMOJI_FONT.is_file(), reason="needs the Debian package fonts-noto-color-emoji")
def test_emoji_corrupt_cache_is_rendered_again(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = cap.emoji_cache_path()
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"not a zip file")
    images, captions = cap.emoji_images()
    assert images.shape[1:] == (3, 64, 64) and len(captions) == len(images) > 900
    assert cap._read_cache(cache) is not None  # replaced by a good one
    assert not [p for p in cache.parent.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- emoji caption choices


def test_emoji_caption_phrases_without_cldr_are_the_unicode_names(tmp_path):
    assert cap.cldr_annotations(folder=tmp_path) == {}  # the package unicode-cldr-core is missing
    (tmp_path / "en.xml").write_text("<ldml><annotations><annotation cp=")  # unreadable: the same
    assert cap.cldr_annotations(folder=tmp_path) == {}
    names = ["cat face", "red apple"]
    assert cap.emoji_caption_phrases(names, {}) == [["cat face"], ["red apple"]]
    choices = cap.emoji_caption_choices(names, annotations={})
    assert choices[0] == [t.format("cat face") for t in cap.EMOJI_CAPTION_TEMPLATES]


def test_emoji_caption_phrases_from_annotations(tmp_path):
    (tmp_path / "en.xml").write_text(
        '<ldml><annotations>'
        '<annotation cp="🐱">cat | face | pet</annotation><annotation cp="🐱" type="tts">cat face</annotation>'
        '<annotation cp="🐈">cat | pet</annotation><annotation cp="🐈" type="tts">cat</annotation>'
        '<annotation cp="🐶">dog | face | pet</annotation><annotation cp="🐶" type="tts">dog face</annotation>'
        '<annotation cp="🍎">Apple | fruit | red</annotation>'
        '</annotations></ldml>', encoding="utf-8")
    notes = cap.cldr_annotations(folder=tmp_path)
    assert notes["🐱"] == ("cat face", ["cat", "face", "pet"]) and notes["🍎"] == (None, ["Apple", "fruit", "red"])
    names = ["cat face", "cat", "dog face", "red apple"]
    # "pet" captions three of these emoji and "face" two: with a limit of 2, "pet" is too vague
    assert cap.emoji_caption_phrases(names, notes, keyword_limit=2) == [
        ["cat face", "cat", "face"], ["cat"], ["dog face", "dog", "face"], ["red apple", "apple", "fruit", "red"]]


@pytest.mark.skipif(not cap.CLDR_ANNOTATIONS.is_dir(), reason="needs the Debian package unicode-cldr-core")
def test_emoji_dataset_has_cldr_caption_choices():
    ds = open_dataset("emoji", 16)
    assert len(ds.caption_choices) == len(ds)
    cat = ds.caption_choices[ds.captions.index("cat face")]
    assert cat[0] == "cat face" and "cat" in cat and "an emoji of cat" in cat and "face" not in cat
    assert "pizza" in ds.caption_choices[ds.captions.index("slice of pizza")]
    assert "car" in ds.caption_choices[ds.captions.index("automobile")]


def test_caption_choices_draw_uniformly():
    from ddpm_cli.training.feed import CaptionChoices

    class Encoder:  # one distinct vector per text
        def encode(self, texts):
            return torch.tensor([[[float(hash(t) % 1000)]] for t in texts]), torch.ones(len(texts), 1, dtype=torch.long)

    cache = CaptionChoices(Encoder(), [["a", "b", "c"], ["d"], ["b", "e"]])
    assert cache.captions[cache.null_row] == ""
    rows = cache.choose([0, 0, 0, 1, 2, 2], torch.tensor([0.0, 0.5, 0.999, 0.7, 0.2, 0.9]))
    assert [cache.captions[r] for r in rows.tolist()] == ["a", "b", "c", "d", "b", "e"]
    hidden, _ = cache.rows(rows)
    assert hidden.shape == (6, 1, 1) and hidden[1, 0, 0] == hidden[4, 0, 0]  # "b" is encoded once
