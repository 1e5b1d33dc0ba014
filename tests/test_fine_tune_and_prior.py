"""`ddpm train --init-from` (fine-tuning from a model's weights), the caption index a sentence-embedding
run exports, and txt2img's nearest-caption prior that uses it."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ddpm_cli.engine.io.images import read_png_metadata
from ddpm_cli.engine.models.captions import CAPTIONS_FILE, CaptionIndex
from ddpm_cli.engine.models.text import TextEncoder
from tests.test_cli import ddpm
from tests.test_cli_vocabulary import one_error_line
from tests.test_text_conditional import COLOURS, captioned_folder

CAPTIONS = {f"a {colour} {shape}" for colour in COLOURS for shape in ("square", "circle")}


@pytest.fixture(scope="module")
def sentence_run(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("sentence")
    run = root / "run"
    trained = ddpm("train", captioned_folder(root / "data"), "--conditioning", "text", "--text-encoder", tiny_bert_dir,
                   "--text-embedding", "sentence", "--text-max-length", 8, "--resolution", 16, "--max-steps", 2,
                   "-b", 4, "--checkpoint-every", 2, "--num-workers", 0, "-o", run, "-q")
    assert trained.returncode == 0, trained.stderr
    return root, run


@pytest.mark.slow
def test_a_sentence_run_exports_its_captions_and_vectors(sentence_run, tiny_bert_dir):
    _, run = sentence_run
    index = CaptionIndex.load(run)
    assert set(index.captions) == CAPTIONS and len(index.captions) == len(CAPTIONS)
    encoder = TextEncoder.load(str(tiny_bert_dir), max_length=8, embedding="sentence")
    expected = torch.nn.functional.normalize(encoder.encode(index.captions)[0][:, 0].float(), dim=-1)
    torch.testing.assert_close(index.vectors, expected, atol=2e-3, rtol=0)  # stored in fp16


@pytest.mark.slow
def test_init_from_starts_at_the_models_weights_and_refuses_another_network(sentence_run, tiny_bert_dir, tmp_path):
    from ddpm_cli.training.config import TrainConfig
    from ddpm_cli.training.trainer import Trainer

    root, run = sentence_run
    config = TrainConfig(data=str(root / "data"), output=str(tmp_path / "tuned"), conditioning="text",
                         text_encoder=str(tiny_bert_dir), text_embedding="sentence", text_max_length=8, resolution=16,
                         max_steps=1, batch_size=4, num_workers=0, init_from=str(run))
    trainer = Trainer(config)
    source = load_file(str(run / "unet" / "diffusion_pytorch_model.safetensors"))
    state = trainer.model.state_dict()
    assert state.keys() == source.keys()
    for name, value in state.items():
        torch.testing.assert_close(value, source[name].to(value.dtype), atol=0, rtol=0)
    for name, value in trainer.ema.model.state_dict().items():  # the EMA starts there too
        torch.testing.assert_close(value, source[name].to(value.dtype), atol=0, rtol=0)

    other = ddpm("train", root / "data", "--conditioning", "text", "--text-encoder", tiny_bert_dir, "--text-embedding",
                 "sentence", "--text-max-length", 8, "--resolution", 16, "--model-size", "small", "--max-steps", 1,
                 "-b", 4, "--init-from", run, "-o", tmp_path / "other")
    one_error_line(other, 2, "--model-size small contradicts --init-from")
    assert not (tmp_path / "other" / "unet").exists()


@pytest.mark.slow
def test_txt2img_prior_draws_the_nearest_training_caption(sentence_run, tiny_bert_dir, tmp_path):
    _, run = sentence_run
    prompt = "red squares"
    encoder = TextEncoder.load(str(tiny_bert_dir), max_length=8, embedding="sentence")
    index = CaptionIndex.load(run)
    vector = torch.nn.functional.normalize(encoder.encode([prompt])[0][:, 0].float(), dim=-1)
    expected = index.captions[int((vector @ index.vectors.T).argmax())]

    near = ddpm("txt2img", run, prompt, "--prior", "nearest", "--steps", 2, "-o", tmp_path / "near")
    assert near.returncode == 0, near.stderr
    assert f"draws the model's training caption {expected!r}" in near.stderr
    meta = read_png_metadata(tmp_path / "near" / "red-squares-000000.png")
    assert (meta["prompt"], meta["caption"], meta["prior"]) == (prompt, expected, "nearest")

    plain = ddpm("txt2img", run, prompt, "--steps", 2, "-o", tmp_path / "plain")  # the run's own prior: none
    assert plain.returncode == 0, plain.stderr
    assert "caption" not in read_png_metadata(tmp_path / "plain" / "red-squares-000000.png")
    assert "training caption" not in plain.stderr

    # the model's ddpm_model.json may make the prior its default; --prior none turns it off
    info = json.loads((run / "ddpm_model.json").read_text())
    (run / "ddpm_model.json").write_text(json.dumps({**info, "prompt_prior": "nearest"}))
    try:
        default = ddpm("txt2img", run, prompt, "--steps", 2, "-o", tmp_path / "default")
        off = ddpm("txt2img", run, prompt, "--prior", "none", "--steps", 2, "-o", tmp_path / "off")
    finally:
        (run / "ddpm_model.json").write_text(json.dumps(info))
    assert default.returncode == 0 and off.returncode == 0, default.stderr + off.stderr
    assert read_png_metadata(tmp_path / "default" / "red-squares-000000.png")["caption"] == expected
    assert "caption" not in read_png_metadata(tmp_path / "off" / "red-squares-000000.png")


def test_prior_nearest_needs_a_caption_index(tmp_path, tiny_bert_dir):
    from ddpm_cli.engine.models.captions import prompt_captions

    class Pipeline:  # a text model without captions.safetensors
        info, folder, name, text_encoder, class_prompted = {}, tmp_path, "run", None, False

    with pytest.raises(Exception, match="needs a model trained with --text-embedding sentence"):
        prompt_captions(Pipeline(), ["a cat"], "nearest")
    assert prompt_captions(Pipeline(), ["a cat"], None) == {"a cat": ("a cat", 1.0)}
    assert not (tmp_path / CAPTIONS_FILE).exists()
