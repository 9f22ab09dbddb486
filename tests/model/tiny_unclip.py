"""A tiny randomly initialised Stable unCLIP image-variation pipeline, saved as a diffusers folder (tests only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def write_clip_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer over lowercase letters (vocab.json and merges.txt) into `folder`."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", "!", *LETTERS, *(c + "</w>" for c in LETTERS), "th", "th</w>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nt h</w>\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16).save_pretrained(folder)


def build_tiny_unclip(folder: Path, embedding_dim: int = 1024, seed: int = 0) -> Path:
    """Save a tiny StableUnCLIPImg2ImgPipeline (16 x 16 pixels, random weights, no image encoder) into `folder`.

    The normalizer's mean and std are drawn at random (not 0 and 1), so that scaling by its statistics is seen.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    write_clip_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            vocab_size=len(tokenizer),
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=2 * embedding_dim,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=16,
    )
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=embedding_dim)
    with torch.no_grad():
        normalizer.mean.normal_(0.0, 0.2)
        normalizer.std.uniform_(0.5, 1.5)
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=None,
        image_encoder=None,
        image_normalizer=normalizer,
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=tokenizer,
        text_encoder=text,
        unet=unet,
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
        ),
        vae=vae,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def unclip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline of 1024-d embeddings (tiny ImageBind's size), saved once for the session."""
    return build_tiny_unclip(tmp_path_factory.mktemp("unclip") / "generator")
