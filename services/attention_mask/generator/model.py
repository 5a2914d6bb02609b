"""Architecture of the small generator: one place that turns a config into diffusers components.

The shapes follow what was measured on 2 CPU cores (issue 4): pixel space (no
VAE), attention only at 16x16 and below because self-attention at 32x32 made
a step 4x slower, and a cosine (squaredcos_cap_v2) noise schedule, which
suits small images better than SD's linear one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from freemask.attention_mask.generator.pipeline import FreeMaskTextToImagePipeline
from freemask.attention_mask.generator.text_encoder import WordTextEncoder
from freemask.attention_mask.generator.tokenizer import DEFAULT_MAX_LENGTH, build_tokenizer

# The shipped model, in diffusers layout (model_index.json + one folder per component).
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights" / "generator"
NUM_TRAIN_TIMESTEPS = 1000

@dataclass(frozen=True)
class GeneratorConfig:
    """Everything that shapes the model; recorded in the training log and the benchmark results."""

    image_size: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    cross_attention_dim: int = 64
    attention_heads: int = 4  # diffusers calls this attention_head_dim, but it is the number of heads
    norm_num_groups: int = 8
    max_length: int = DEFAULT_MAX_LENGTH

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

TINY_CONFIG = GeneratorConfig(image_size=16, block_out_channels=(8, 16, 16), cross_attention_dim=8,
                              attention_heads=2, norm_num_groups=4, max_length=8)

def build_unet(config: GeneratorConfig) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=config.image_size,
        in_channels=3,
        out_channels=3,
        down_block_types=tuple(config.down_block_types),
        up_block_types=tuple(config.up_block_types),
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=config.attention_heads,
        norm_num_groups=config.norm_num_groups,
    )

def build_training_scheduler() -> DDPMScheduler:
    """The forward process used in training: cosine betas, epsilon prediction as in SD."""
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2",
                         prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0)

def build_sampling_scheduler() -> DDIMScheduler:
    """Deterministic DDIM on the same betas; "trailing" spacing so sampling starts from pure noise at t=999."""
    return DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2",
                         prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0,
                         set_alpha_to_one=False, timestep_spacing="trailing")

def build_pipeline(config: GeneratorConfig, words: Sequence[str]) -> FreeMaskTextToImagePipeline:
    """A freshly initialised generator (random weights) for the given vocabulary."""
    tokenizer = build_tokenizer(words, max_length=config.max_length)
    text_encoder = WordTextEncoder(vocab_size=len(tokenizer), hidden_size=config.cross_attention_dim,
                                   max_length=config.max_length, pad_token_id=tokenizer.pad_token_id)
    return FreeMaskTextToImagePipeline(unet=build_unet(config), text_encoder=text_encoder, tokenizer=tokenizer,
                                       scheduler=build_sampling_scheduler())

def count_parameters(pipe: FreeMaskTextToImagePipeline) -> dict[str, int]:
    return {name: sum(p.numel() for p in module.parameters())
            for name, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))}
