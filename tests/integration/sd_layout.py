"""Randomly initialised Stable-Diffusion-layout pipelines: SD's component classes and block
layout (CLIP BPE tokenizer and text encoder, `AutoencoderKL`, a `UNet2DConditionModel` with
three `CrossAttnDownBlock2D` and one `DownBlock2D`, DDIM) at a chosen size.

`TINY` is what the unit tests open on CPU; `SD15` has Stable Diffusion 1.5's published sizes
(860 M UNet parameters, 512 px images), for the GPU benchmark. No weights are downloaded:
nothing here is trained, only the shapes and the code paths are real.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


@dataclass(frozen=True)
class SDShape:
    latent_side: int
    vae_channels: tuple[int, ...]  # one VAE level per entry: images are latent_side * 2**(levels - 1) pixels
    vae_layers: int
    unet_channels: tuple[int, int, int, int]
    norm_groups: int
    attention_head_dim: int
    cross_attention_dim: int  # = the text encoder's width
    text_layers: int
    text_heads: int
    text_intermediate: int
    max_length: int

    @property
    def image_side(self) -> int:
        return self.latent_side * 2 ** (len(self.vae_channels) - 1)


TINY = SDShape(latent_side=8, vae_channels=(8, 8), vae_layers=1, unet_channels=(8, 16, 16, 16), norm_groups=8,
               attention_head_dim=4, cross_attention_dim=16, text_layers=2, text_heads=2, text_intermediate=32,
               max_length=16)
SD15 = SDShape(latent_side=64, vae_channels=(128, 256, 512, 512), vae_layers=2, unet_channels=(320, 640, 1280, 1280),
               norm_groups=32, attention_head_dim=8, cross_attention_dim=768, text_layers=12, text_heads=12,
               text_intermediate=3072, max_length=77)


def write_bpe_files(folder: Path, words: Sequence[str]) -> None:
    """A CLIP-style vocab.json and merges.txt in which every word of `words` is one `word</w>` token."""
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[str] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{merged} {piece}")
            merged += piece
            vocab.setdefault(merged, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n", encoding="utf-8")


def build_sd_layout(tokenizer_files: Path, shape: SDShape, seed: int = 0) -> StableDiffusionPipeline:
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_files, model_max_length=shape.max_length)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=shape.latent_side, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=shape.unet_channels, norm_num_groups=shape.norm_groups,
        attention_head_dim=shape.attention_head_dim,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=shape.cross_attention_dim,
    )
    levels = len(shape.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=shape.vae_channels,
        layers_per_block=shape.vae_layers, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, norm_num_groups=shape.norm_groups,
        sample_size=shape.image_side,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=shape.cross_attention_dim, intermediate_size=shape.text_intermediate,
        num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
        max_position_embeddings=shape.max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
