"""Lets DiffusionPipeline.from_pretrained find the Free-Mask pipeline class (diffusers custom pipeline)."""
from freemask.attention_mask.generator.pipeline import FreeMaskTextToImagePipeline  # noqa: F401
