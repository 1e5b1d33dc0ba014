"""Shared fixtures: tiny random networks built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch


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
