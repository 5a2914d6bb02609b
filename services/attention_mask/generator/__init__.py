"""The small pixel-space text-to-image generator trained on the reference world.

It is the embedded stand-in for Stable Diffusion (DESIGN §3): the same
diffusers building blocks (a cross-attention `UNet2DConditionModel`, a text
encoder with its tokenizer, a DDPM-family scheduler) saved in the standard
diffusers layout, so the attention-capture code of the attention-mask service
runs unchanged on it and on SD 1.5.

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(WEIGHTS_DIR)      # -> FreeMaskTextToImagePipeline
    images = pipe("a photo of a dog on the grass", seed=0).images  # uint8 (1, 32, 32, 3)
"""

from freemask.attention_mask.generator.model import WEIGHTS_DIR, GeneratorConfig, build_pipeline
from freemask.attention_mask.generator.pipeline import FreeMaskPipelineOutput, FreeMaskTextToImagePipeline
from freemask.attention_mask.generator.text_encoder import WordTextEncoder, WordTextEncoderOutput
from freemask.attention_mask.generator.tokenizer import (
    PAD_TOKEN,
    UNK_TOKEN,
    build_tokenizer,
    token_words,
    world_vocabulary,
)

__all__ = [
    "PAD_TOKEN", "UNK_TOKEN", "WEIGHTS_DIR",
    "FreeMaskPipelineOutput", "FreeMaskTextToImagePipeline", "GeneratorConfig", "WordTextEncoder",
    "WordTextEncoderOutput", "build_pipeline", "build_tokenizer", "token_words", "world_vocabulary",
]
