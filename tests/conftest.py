"""Shared fixtures: tiny random networks built from configs (no downloads)."""

from __future__ import annotations

import json
import os

# CLI calls run cold unless a test asks for the warm worker (tests/test_serve.py): a worker started from a
# developer's shell would run the code it imported, not the checkout's.
os.environ.pop("DDPM_SERVER", None)
XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if XDIST_WORKER:  # two workers share the cores: one thread each, the CLI calls they fork too
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

if XDIST_WORKER:  # in case torch was imported before the variable was set
    torch.set_num_threads(1)


# Tests that train a model (through a shared fixture or themselves) or compile one carry the `slow`
# marker; `python -m pytest -m "not slow"` is the fast inner loop, plain `python -m pytest` runs all.
TRAINING_FIXTURES = {"fashion_class_run"}  # defined here; any test that asks for one is slow


# The files that take longest (minutes each), longest first. xdist (--dist loadfile --no-loadscope-reorder,
# pyproject) hands files to its two workers in collection order, so these start first and the many short
# files fill in behind them on both workers; xdist's own order (most tests first) left the longest files,
# which hold few tests, to the end, on one worker.
LONGEST_FILES = [  # seconds in one process, December 2026: 340, 240, 220, 190, 160, 135, 130, 125, 100, 100, 60
    "test_readme_examples.py", "test_distributed.py", "test_latent.py", "test_speed.py", "test_vlb.py",
    "test_examples.py", "test_inpaint.py", "test_faults.py", "test_superres.py", "test_prompt_score.py",
    "test_fid.py",
]


def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


def tiny_unet(channels: int = 1, size: int = 8, seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    # A random network amplifies rounding differences chaotically along a deterministic chain; a
    # smaller output layer makes it a smooth, contractive stand-in for a trained denoiser.
    with torch.no_grad():
        model.conv_out.weight.mul_(0.1)
    return model


@pytest.fixture(scope="session")
def fashion_class_run(tmp_path_factory):
    """A class-conditional 16x16 Fashion-MNIST model trained here for 200 steps (its null class makes
    it an unconditional model as well); shared by the tests that need a model of real data. Its samples'
    class accuracy at guidance 0, 1 and 3 (tests/test_class_conditional.py): 0.10, 0.36, 0.71 after 150
    steps, 0.12, 0.47, 0.79 after 200, 0.11, 0.48, 0.84 after 300; hole MSE (tests/test_inpaint.py) 0.31,
    0.31, 0.30 against the bound 0.49. It is
    trained once per test session: under xdist the first worker to need it trains it into the session's
    shared temporary folder, under a file lock, and the other worker reads that run."""
    import shutil

    from filelock import FileLock

    from ddpm_cli.training.loop import train

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if XDIST_WORKER else base  # a worker's basetemp is popen-gwN inside the session's folder
    run, done = shared / "fashion-class" / "run", shared / "fashion-class" / "done"
    with FileLock(str(shared / "fashion-class.lock")):
        if not done.is_file():
            shutil.rmtree(run, ignore_errors=True)  # a worker that failed part-way left it
            train({"data": "fashion-mnist", "output": str(run), "resolution": 16, "conditioning": "class",
                   "max_steps": 200, "batch_size": 64, "lr": 2e-3, "checkpoint_every": 200, "num_workers": 0})
            done.touch()
    return run


@pytest.fixture
def unet():
    return tiny_unet()


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny random unconditional model saved as diffusers' DDPMPipeline (as on the Hub)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    folder = tmp_path_factory.mktemp("tiny-ddpm")
    DDPMPipeline(unet=tiny_unet(channels=3, size=16), scheduler=DDPMScheduler(variance_type="fixed_large")).save_pretrained(folder)
    return folder


TINY_WORDS = ["a", "cat", "dog", "on", "the", "mat", "red", "blue", "green", "yellow", "square", "circle", "photo",
              "of", "sitting"]


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A flat transformers folder: a tiny random BertModel + BertTokenizerFast (stands in for MiniLM)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS, "##s"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                         vocab_size=len(vocab), max_position_embeddings=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def clip_tokenizer(folder):
    """A CLIP BPE tokenizer whose vocabulary holds TINY_WORDS whole and every letter."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(set("".join(TINY_WORDS))):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=32, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                                num_hidden_layers=2, vocab_size=1000, max_position_embeddings=77))
    tokenizer = clip_tokenizer(tmp_path_factory.mktemp("vocab") / "tok")
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            timestep_spacing="trailing")
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder
