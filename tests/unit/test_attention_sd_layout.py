"""The attention-mask core runs unchanged on a Stable-Diffusion-1.5-layout pipeline.

No SD checkpoint is needed: a tiny, randomly initialised `StableDiffusionPipeline`
with SD's component classes and block layout (CLIP BPE tokenizer and text encoder,
`AutoencoderKL`, a `UNet2DConditionModel` with three `CrossAttnDownBlock2D` and one
`DownBlock2D`, DDIM) is saved as a diffusers folder and opened by
`MaskGenerator.from_config`, exactly as an SD 1.5 snapshot on a volume would be.
Proven here: the loader drops the safety checker and refuses nothing; class words are
located through CLIP's BPE offsets (BOS counted, plurals and BPE-split words found,
truncated mentions rejected); native size, latent scale and attention grids follow the
VAE and UNet structure; generation yields well-typed images, soft maps and masks,
deterministic per seed, with pixels bit-identical to the pipeline run without capture.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from freemask.attention_mask.generation import GeneratedObject, MaskGenerator, class_token_positions
from freemask.attention_mask.refine import DEFAULT_THRESHOLDS
from freemask.shared.config import AttentionMaskConfig
from freemask.shared.errors import InvalidInput

from sd_layout import TINY, build_sd_layout, write_bpe_files

WORDS = ("a", "photo", "of", "dog", "dogs", "on", "the", "grass")
PROMPT = "a photo of a dog on the grass"
MAX_LENGTH = TINY.max_length
VAE_SCALE = 2
IMAGE_SIDE = TINY.image_side


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> Path:
    root = tmp_path_factory.mktemp("tiny_sd")
    write_bpe_files(root / "bpe", WORDS)
    build_sd_layout(root / "bpe", TINY).save_pretrained(root / "sd", safe_serialization=True)
    return root / "sd"


@pytest.fixture(scope="module")
def gen(sd_dir: Path) -> MaskGenerator:
    return MaskGenerator.from_config(AttentionMaskConfig(weights=sd_dir, weights_version="tiny-sd",
                                                         affinity="self_attention", num_inference_steps=2,
                                                         device="cpu"))


@pytest.fixture(scope="module")
def dog(gen: MaskGenerator) -> GeneratedObject:
    return gen.generate([gen.prompt_for(PROMPT, "dog", seed=0)])[0]


def test_saved_folder_has_the_sd_layout(sd_dir: Path) -> None:
    index = json.loads((sd_dir / "model_index.json").read_text(encoding="utf-8"))
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    for part in ("unet", "vae"):
        assert (sd_dir / part / "diffusion_pytorch_model.safetensors").is_file()
    assert (sd_dir / "text_encoder" / "model.safetensors").is_file()


def test_loader_opens_it_as_stable_diffusion_and_refuses_nothing(gen: MaskGenerator) -> None:
    assert type(gen.pipe).__name__ == "StableDiffusionPipeline"
    assert gen.pipe.safety_checker is None
    assert gen.pipe.feature_extractor is None
    assert isinstance(gen.pipe.tokenizer, CLIPTokenizer) and gen.pipe.tokenizer.is_fast
    assert gen.pipe.unet.dtype == torch.float32 and gen.pipe.unet.device.type == "cpu"
    assert gen.version == "tiny-sd"


def test_class_word_position_counts_the_bos_token(gen: MaskGenerator) -> None:
    tokenizer = gen.pipe.tokenizer
    ids = tokenizer(PROMPT, padding="max_length", truncation=True, max_length=MAX_LENGTH).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[5]) == "dog</w>"
    assert class_token_positions(tokenizer, PROMPT, "dog") == (5,)
    assert class_token_positions(tokenizer, "a photo of dogs on the grass", "dog") == (4,)
    assert class_token_positions(tokenizer, "a dog on the dogs", "dog") == (2, 5)
    assert class_token_positions(tokenizer, PROMPT, "grass") == (8,)


def test_a_word_split_by_bpe_keeps_all_its_tokens(gen: MaskGenerator) -> None:
    tokenizer = gen.pipe.tokenizer
    prompt = "a photo of a grassdog"
    ids = tokenizer(prompt, padding="max_length", truncation=True, max_length=MAX_LENGTH).input_ids
    assert tokenizer.convert_ids_to_tokens(ids[5:8]) == ["gras", "s", "dog</w>"]
    assert class_token_positions(tokenizer, prompt, "grassdog") == (5, 6, 7)
    with pytest.raises(InvalidInput):
        class_token_positions(tokenizer, prompt, "dog")


def test_a_mention_truncated_away_is_rejected(gen: MaskGenerator) -> None:
    long_prompt = "a photo of the grass on the grass on the grass on the grass on a dog"
    with pytest.raises(InvalidInput, match="16-token limit"):
        class_token_positions(gen.pipe.tokenizer, long_prompt, "dog")


def test_sizes_and_grids_follow_the_vae_and_unet(gen: MaskGenerator) -> None:
    assert gen.native_size == IMAGE_SIDE
    assert gen.latent_scale == VAE_SCALE == gen.pipe.vae_scale_factor
    # down blocks at 8, 4, 2 and the mid block at the last level's 1x1, as SD 1.5's 64/32/16 + 8
    assert gen.attention_resolutions(IMAGE_SIDE, IMAGE_SIDE) == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert gen.attention_resolutions(32, 64) == [(16, 32), (8, 16), (4, 8), (2, 4)]
    assert gen.affinity_resolution(IMAGE_SIDE, IMAGE_SIDE) == (8, 8)


def test_affinity_grid_obeys_affinity_max_side(gen: MaskGenerator) -> None:
    def with_max_side(side: int) -> MaskGenerator:
        config = gen.config.model_copy(update={"affinity_max_side": side})
        return MaskGenerator(gen.pipe, config, gen.version)

    assert with_max_side(7).affinity_resolution(IMAGE_SIDE, IMAGE_SIDE) == (4, 4)
    assert with_max_side(2).affinity_resolution(IMAGE_SIDE, IMAGE_SIDE) == (2, 2)
    assert with_max_side(1).affinity_resolution(IMAGE_SIDE, IMAGE_SIDE) == (1, 1)


def test_generate_returns_well_typed_maps(dog: GeneratedObject) -> None:
    assert dog.image.shape == (IMAGE_SIDE, IMAGE_SIDE, 3) and dog.image.dtype == np.uint8
    assert dog.soft_map.shape == (IMAGE_SIDE, IMAGE_SIDE) and dog.soft_map.dtype == np.float32
    assert np.isfinite(dog.soft_map).all()
    assert 0.0 <= float(dog.soft_map.min()) and float(dog.soft_map.max()) <= 1.0
    assert float(dog.soft_map.max()) > float(dog.soft_map.min())
    assert dog.mask.shape == (IMAGE_SIDE, IMAGE_SIDE) and dog.mask.dtype == np.bool_
    assert dog.threshold in DEFAULT_THRESHOLDS
    assert 0.0 <= dog.threshold_iou <= 1.0
    assert dog.token_positions == (5,)
    assert dog.affinity_resolution == (8, 8)
    assert dog.cross_attention_resolutions[:3] == ((8, 8), (4, 4), (2, 2))


def test_same_seed_is_bit_identical_other_seed_differs(gen: MaskGenerator, dog: GeneratedObject) -> None:
    again = gen.generate([gen.prompt_for(PROMPT, "dog", seed=0)])[0]
    np.testing.assert_array_equal(again.image, dog.image)
    np.testing.assert_array_equal(again.soft_map, dog.soft_map)
    np.testing.assert_array_equal(again.mask, dog.mask)
    other = gen.generate([gen.prompt_for(PROMPT, "dog", seed=1)])[0]
    assert not np.array_equal(other.image, dog.image)


def test_capture_leaves_the_pixels_of_the_plain_pipeline(gen: MaskGenerator, dog: GeneratedObject) -> None:
    plain = gen.pipe(PROMPT, height=IMAGE_SIDE, width=IMAGE_SIDE, num_inference_steps=2,
                     guidance_scale=gen.config.guidance_scale, generator=torch.Generator("cpu").manual_seed(0),
                     output_type="pt").images
    pixels = (plain.float().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
    np.testing.assert_array_equal(pixels[0], dog.image)


def test_sizes_off_the_latent_grid_are_rejected(gen: MaskGenerator) -> None:
    with pytest.raises(InvalidInput, match="multiple of 16"):
        gen.generate([gen.prompt_for(PROMPT, "dog", seed=0, height=24, width=24)])
