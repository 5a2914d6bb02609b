"""The attention-mask core on the shipped small generator: class-word tokens,
batched passes, determinism, untouched pixels, and clear errors."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from freemask.attention_mask.generation import (
    GeneratedObject,
    MaskGenerator,
    class_token_positions,
    load_pipeline,
    weights_digest,
)
from freemask.attention_mask.generator import WEIGHTS_DIR
from freemask.attention_mask.refine import DEFAULT_THRESHOLDS
from freemask.shared.config import AttentionMaskConfig
from freemask.shared.errors import InvalidInput, Unusable

STEPS = 3


@pytest.fixture(scope="module")
def gen(one_torch_thread: None) -> MaskGenerator:
    return MaskGenerator.from_config(AttentionMaskConfig(num_inference_steps=STEPS, device="cpu"))


@pytest.fixture(scope="module")
def dog(gen: MaskGenerator) -> GeneratedObject:
    return gen.generate([gen.prompt_for("a photo of a dog on the grass", "dog", seed=3)])[0]


@pytest.mark.parametrize(
    ("prompt", "cls", "positions"),
    [
        ("a photo of a dog on the grass", "dog", (4,)),
        ("two dogs and a dog", "dog", (1, 4)),
        ("A Photo Of A DOG", "dog", (4,)),
        ("sheep in a field", "sheep", (0,)),
        ("buses on the road", "bus", (0,)),
    ],
)
def test_class_token_positions_find_every_mention_and_plural(gen: MaskGenerator, prompt: str, cls: str,
                                                            positions: tuple[int, ...]) -> None:
    assert class_token_positions(gen.pipe.tokenizer, prompt, cls) == positions


def test_a_prompt_without_the_class_or_with_it_truncated_away_is_invalid(gen: MaskGenerator) -> None:
    with pytest.raises(InvalidInput, match="no token for the class 'cat'"):
        class_token_positions(gen.pipe.tokenizer, "a photo of a dog", "cat")
    with pytest.raises(InvalidInput, match="catalogue|no token"):
        class_token_positions(gen.pipe.tokenizer, "a catalogue", "cat")
    long_prompt = "a " * gen.pipe.tokenizer.model_max_length + "dog"
    with pytest.raises(InvalidInput, match="16-token limit"):
        class_token_positions(gen.pipe.tokenizer, long_prompt, "dog")


def test_grids_of_the_small_generator(gen: MaskGenerator) -> None:
    assert gen.native_size == 32 and gen.latent_scale == 1
    assert gen.attention_resolutions(32, 32) == [(16, 16), (8, 8)]
    # The learned head runs on the image itself, halved until it fits affinity_max_side.
    assert gen.affinity_resolution(32, 32) == (32, 32) and gen.self_attention_grids((32, 32)) == []
    assert gen.reconfigured(affinity_max_side=16).affinity_resolution(64, 32) == (16, 8)
    assert gen.reconfigured(affinity_max_side=5).affinity_resolution(32, 32) == (4, 4)
    attention = MaskGenerator(gen.pipe, gen.config.model_copy(update={"affinity": "self_attention"}), gen.version)
    assert attention.affinity_resolution(32, 32) == (16, 16) and attention.self_attention_grids((16, 16)) == [(16, 16)]
    with pytest.raises(InvalidInput, match="affinity_max_side=4"):
        attention.reconfigured(affinity_max_side=4).affinity_resolution(32, 32)


def test_the_affinity_setting_and_the_head_must_agree(gen: MaskGenerator) -> None:
    with pytest.raises(InvalidInput, match="needs an affinity head"):
        MaskGenerator(gen.pipe, gen.config, gen.version)
    with pytest.raises(InvalidInput, match="needs no affinity head"):
        MaskGenerator(gen.pipe, gen.config.model_copy(update={"affinity": "self_attention"}), gen.version,
                      gen.affinity_head)


def test_self_attention_affinity_still_gives_masks(gen: MaskGenerator) -> None:
    attention = MaskGenerator(gen.pipe, gen.config.model_copy(update={"affinity": "self_attention",
                                                                      "refine_cut": "attention"}), gen.version)
    result = attention.generate([attention.prompt_for("a photo of a dog on the grass", "dog", seed=3)])[0]
    assert result.affinity_resolution == (16, 16) and result.mask.shape == (32, 32) and result.mask.any()
    assert attention.affinity_source == "self-attention"


def test_a_generated_object_is_well_formed(dog: GeneratedObject) -> None:
    assert dog.image.shape == (32, 32, 3) and dog.image.dtype == np.uint8
    assert dog.soft_map.shape == (32, 32) and dog.soft_map.dtype == np.float32
    assert float(dog.soft_map.min()) == 0.0 and float(dog.soft_map.max()) == pytest.approx(1.0)
    assert dog.mask.shape == (32, 32) and dog.mask.dtype == bool and dog.mask.any()
    assert dog.threshold in DEFAULT_THRESHOLDS and 0.0 <= dog.threshold_iou <= 1.0
    assert dog.token_positions == (4,)
    assert dog.affinity_resolution == (32, 32) and dog.cross_attention_resolutions == ((16, 16), (8, 8))
    x, y, w, h = dog.mask_box
    rows, cols = np.nonzero(dog.mask)
    assert (x, y, x + w - 1, y + h - 1) == (cols.min(), rows.min(), cols.max(), rows.max())


def test_the_same_seed_gives_identical_outputs_and_another_seed_does_not(gen: MaskGenerator,
                                                                          dog: GeneratedObject) -> None:
    again = gen.generate([gen.prompt_for("a photo of a dog on the grass", "dog", seed=3)])[0]
    other = gen.generate([gen.prompt_for("a photo of a dog on the grass", "dog", seed=4)])[0]
    assert np.array_equal(again.image, dog.image) and np.array_equal(again.soft_map, dog.soft_map)
    assert np.array_equal(again.mask, dog.mask)
    assert not np.array_equal(other.image, dog.image)


def test_capture_does_not_change_the_pixels(gen: MaskGenerator, dog: GeneratedObject) -> None:
    plain = gen.pipe("a photo of a dog on the grass", num_inference_steps=STEPS,
                     guidance_scale=gen.config.guidance_scale, generator=[torch.Generator().manual_seed(3)],
                     output_type="pt").images
    pixels = (plain.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)[0]
    assert np.array_equal(pixels, dog.image)


def test_prompts_are_grouped_into_passes_and_returned_in_order(gen: MaskGenerator) -> None:
    two_per_pass = gen.reconfigured(max_batch=2)
    prompts = [
        two_per_pass.prompt_for("a photo of a cow in a field", "cow", seed=1),
        two_per_pass.prompt_for("a photo of a boat on the sea", "boat", seed=2, num_inference_steps=2),
        two_per_pass.prompt_for("a photo of a bus on the road", "bus", seed=3),
        two_per_pass.prompt_for("a photo of a cat in a room", "cat", seed=4),
        two_per_pass.prompt_for("a photo of a bird in the sky", "bird", seed=5, height=16, width=16),
    ]
    together = two_per_pass.generate(prompts)
    assert [r.image.shape[:2] for r in together] == [(32, 32)] * 4 + [(16, 16)]
    for prompt, result in zip(prompts, together):
        alone = gen.generate([prompt])[0]
        # Different batch shapes may round differently in the last bit; never by more than a grey level or two.
        assert int(np.abs(alone.image.astype(int) - result.image).max()) <= 2
        assert result.token_positions == alone.token_positions


def test_one_bad_prompt_fails_the_call_before_anything_runs(gen: MaskGenerator) -> None:
    calls = []
    hook = gen.pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(InvalidInput, match="'cat'"):
            gen.generate([gen.prompt_for("a photo of a dog", "dog", 0), gen.prompt_for("a photo of a dog", "cat", 0)])
        with pytest.raises(InvalidInput, match="multiple of 8"):
            gen.generate([gen.prompt_for("a photo of a dog", "dog", 0, height=20, width=32)])
    finally:
        hook.remove()
    assert calls == []


def test_an_empty_mask_is_unusable(dog: GeneratedObject) -> None:
    empty = GeneratedObject(**{**dog.__dict__, "mask": np.zeros_like(dog.mask)})
    with pytest.raises(Unusable, match="sample 'x'.*empty"):
        empty.require_mask("sample 'x'")
    assert dog.require_mask("sample 'x'") is dog


def test_a_mask_larger_than_the_limit_is_unusable(dog: GeneratedObject) -> None:
    fraction = float(dog.mask.mean())
    assert 0 < fraction < 1
    with pytest.raises(Unusable, match=r"sample 'x'.*covers \d+% of the image, more than "
                                       r"attention_mask.max_mask_fraction"):
        dog.require_mask("sample 'x'", max_fraction=fraction * 0.99)
    assert dog.require_mask("sample 'x'", max_fraction=fraction) is dog  # at the limit is allowed
    assert dog.require_mask("sample 'x'", max_fraction=None) is dog


def test_the_version_is_a_content_digest(tmp_path: Path) -> None:
    copy = tmp_path / "generator"
    shutil.copytree(WEIGHTS_DIR, copy)
    assert weights_digest(copy) == weights_digest(WEIGHTS_DIR)
    (copy / "scheduler" / "scheduler_config.json").write_text("{}", encoding="utf-8")
    assert weights_digest(copy) != weights_digest(WEIGHTS_DIR)


def test_a_folder_that_is_not_a_diffusers_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="model_index.json is missing"):
        load_pipeline(tmp_path, torch.device("cpu"))
    with pytest.raises(InvalidInput, match="no diffusers weights"):
        weights_digest(tmp_path)


def test_segmenting_an_existing_image_gives_one_unit_map_per_class_that_finds_the_object(
        gen: MaskGenerator, dog: GeneratedObject) -> None:
    """Generate-then-segment: the dog word's attention on the dog's own image sits on the dog."""
    maps = gen.segment(dog.image, "a photo of a dog on the grass", ["dog", "grass"], seed=1)
    assert maps.shape == (2, *dog.image.shape[:2]) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() == pytest.approx(1.0)
    assert maps[0][dog.mask].mean() > maps[0][~dog.mask].mean()
    np.testing.assert_array_equal(maps, gen.segment(dog.image, "a photo of a dog on the grass", ["dog", "grass"],
                                                    seed=1))
    assert not np.array_equal(maps, gen.segment(dog.image, "a photo of a dog on the grass", ["dog", "grass"],
                                                seed=2, noise_level=0.6))


@pytest.mark.parametrize(("image", "classes", "noise_level", "fragment"), [
    (np.zeros((32, 32, 3), np.uint8), ["cat"], 0.3, "no token for the class 'cat'"),
    (np.zeros((32, 32, 3), np.uint8), [], 0.3, "at least one class"),
    (np.zeros((30, 32, 3), np.uint8), ["dog"], 0.3, "must be a multiple of"),
    (np.zeros((32, 32), np.uint8), ["dog"], 0.3, "uint8 (H, W, 3)"),
    (np.zeros((32, 32, 3), np.uint8), ["dog"], 1.0, "noise_level"),
])
def test_segmenting_refuses_bad_input(gen: MaskGenerator, image: np.ndarray, classes: list[str], noise_level: float,
                                      fragment: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(fragment)):
        gen.segment(image, "a photo of a dog on the grass", classes, noise_level=noise_level)


def test_passes_from_several_threads_at_once_give_what_they_give_alone(gen: MaskGenerator) -> None:
    """The gRPC workers and the stage worker share one generator (and its one UNet)."""
    import threading

    batches = [[gen.prompt_for("a photo of a dog on the grass", "dog", seed=s) for s in range(size)]
               for size in (1, 2, 3)]
    alone = [gen.generate(batch) for batch in batches]
    together: dict[int, list[GeneratedObject]] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, gen.generate(batches[i])))
               for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, results in enumerate(alone):
        assert len(together[i]) == len(results)
        for mine, reference in zip(together[i], results):
            np.testing.assert_array_equal(mine.mask, reference.mask)
            np.testing.assert_array_equal(mine.soft_map, reference.soft_map)
