"""The small generator: diffusers save/load, determinism, tokenizer, a training step, input checks.

Fast by design: a tiny freshly built model (16 px, 8-channel UNet) and a few
denoising steps. Quality is measured in tests/benchmarks/bench_generator.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

from freemask.attention_mask.generator import (
    PAD_TOKEN,
    UNK_TOKEN,
    WEIGHTS_DIR,
    FreeMaskTextToImagePipeline,
    WordTextEncoder,
    build_pipeline,
    build_tokenizer,
    token_words,
)
from freemask.attention_mask.generator.model import TINY_CONFIG, build_training_scheduler

WORDS = ["a", "photo", "of", "dog", "cat", "on", "the", "grass", "sea", "boat", ","]


@pytest.fixture(scope="module")
def tiny() -> FreeMaskTextToImagePipeline:
    torch.manual_seed(0)
    pipe = build_pipeline(TINY_CONFIG, WORDS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved_dir(tiny: FreeMaskTextToImagePipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("generator")
    tiny.save_pretrained(path)
    return path


def test_saved_layout_is_standard_diffusers(saved_dir: Path) -> None:
    names = {p.name for p in saved_dir.iterdir()}
    assert {"model_index.json", "unet", "text_encoder", "tokenizer", "scheduler", "pipeline.py"} <= names
    assert (saved_dir / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (saved_dir / "text_encoder" / "diffusion_pytorch_model.safetensors").exists()


def test_generic_loader_returns_our_pipeline_and_draws_configured_size(saved_dir: Path, tiny) -> None:
    pipe = DiffusionPipeline.from_pretrained(saved_dir, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "FreeMaskTextToImagePipeline"
    images = pipe("a photo of a dog on the grass", num_inference_steps=2, seed=0).images
    assert images.shape == (1, 16, 16, 3) and images.dtype == np.uint8
    same = tiny("a photo of a dog on the grass", num_inference_steps=2, seed=0).images
    np.testing.assert_array_equal(images, same)  # the weights survived the round trip


def test_same_seed_same_pixels_other_seed_differs(tiny: FreeMaskTextToImagePipeline) -> None:
    run = lambda seed: tiny("a cat on the grass", num_inference_steps=3, seed=seed).images  # noqa: E731
    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))


def test_per_image_seeds_do_not_depend_on_the_batch(tiny: FreeMaskTextToImagePipeline) -> None:
    alone = tiny("a boat on the sea", num_inference_steps=2, seed=[7]).images
    batch = tiny(["a dog", "a boat on the sea"], num_inference_steps=2, seed=[3, 7]).images
    np.testing.assert_array_equal(alone[0], batch[1])


def test_output_types(tiny: FreeMaskTextToImagePipeline) -> None:
    pil = tiny("a dog", num_inference_steps=1, seed=0, output_type="pil").images
    assert pil[0].size == (16, 16)
    pt = tiny("a dog", num_inference_steps=1, seed=0, output_type="pt", num_images_per_prompt=2).images
    assert pt.shape == (2, 3, 16, 16) and 0.0 <= float(pt.min()) and float(pt.max()) <= 1.0


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"prompt": []}, "prompt list is empty"),
    ({"prompt": 3}, "prompt must be a string"),
    ({"prompt": "a dog", "num_inference_steps": -1}, "num_inference_steps"),
    ({"prompt": "a dog", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "a dog", "guidance_scale": float("nan")}, "guidance_scale"),
    ({"prompt": "a dog", "height": 15}, "height"),
    ({"prompt": "a dog", "num_images_per_prompt": 0}, "num_images_per_prompt"),
    ({"prompt": "a dog", "output_type": "jpeg"}, "output_type"),
    ({"prompt": ["a dog", "a cat"], "seed": [1]}, "seed"),
])
def test_bad_inputs_raise_clear_value_errors(tiny: FreeMaskTextToImagePipeline, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_tokenizer_round_trip_unknown_words_and_word_positions(tmp_path: Path) -> None:
    tok = build_tokenizer(WORDS, max_length=8)
    ids = tok("A Photo of a DOG", padding="max_length", max_length=8).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a dog"
    assert tok.convert_ids_to_tokens(ids)[-1] == PAD_TOKEN
    assert tok("a zebra").input_ids[1] == tok.unk_token_id and tok.unk_token == UNK_TOKEN
    tok.save_pretrained(tmp_path)
    again = type(tok).from_pretrained(tmp_path)
    assert again("a dog on the grass").input_ids == tok("a dog on the grass").input_ids
    assert again.model_max_length == 8
    assert token_words(tok, "a photo of a dog") == [(0, "a"), (1, "photo"), (2, "of"), (3, "a"), (4, "dog")]


def test_text_encoder_keeps_tokens_apart() -> None:
    # A word's state must not depend on its neighbours: that is what keeps the class out of pad tokens.
    enc = WordTextEncoder(vocab_size=12, hidden_size=8, max_length=4)
    a = enc(torch.tensor([[2, 3, 0, 0]]))[0]
    b = enc(torch.tensor([[5, 3, 0, 0]]))[0]
    torch.testing.assert_close(a[:, 1:], b[:, 1:])
    with pytest.raises(ValueError, match="max_length"):
        enc(torch.zeros(1, 5, dtype=torch.long))


def test_two_training_steps_give_finite_loss() -> None:
    torch.manual_seed(0)
    pipe = build_pipeline(TINY_CONFIG, WORDS)
    sched = build_training_scheduler()
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    ids = pipe.tokenize(["a dog on the grass", "a boat on the sea", "", "a cat"])
    for _ in range(2):
        t = torch.randint(0, 1000, (4,))
        noise = torch.randn_like(x0)
        pred = pipe.unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)


@pytest.mark.skipif(not (WEIGHTS_DIR / "model_index.json").exists(), reason="no shipped generator weights")
def test_shipped_generator_loads_and_draws() -> None:
    pipe = DiffusionPipeline.from_pretrained(WEIGHTS_DIR, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size
    images = pipe("a photo of a dog on the grass", num_inference_steps=4, seed=0).images
    assert images.shape == (1, size, size, 3)
    assert images.std() > 1.0  # not a blank image


def test_own_class_loads_without_flag_but_a_foreign_shim_is_not_trusted(saved_dir: Path, tmp_path: Path) -> None:
    pipe = FreeMaskTextToImagePipeline.from_pretrained(saved_dir)
    assert isinstance(pipe, FreeMaskTextToImagePipeline)
    import shutil
    other = tmp_path / "other"
    shutil.copytree(saved_dir, other)
    (other / "pipeline.py").write_text("import os  # not our shim\n", encoding="utf-8")
    with pytest.raises(ValueError, match="trust_remote_code"):
        FreeMaskTextToImagePipeline.from_pretrained(other)


def test_ancestral_ddim_stays_finite_at_every_step_count(tiny: FreeMaskTextToImagePipeline) -> None:
    # From t=999 of the cosine schedule, eta=1 puts DDIM's sqrt(1 - a_prev - sigma^2) at zero, where float32
    # rounding went negative and gave NaN at some step counts (5 did); the pipeline now caps eta per step.
    for steps in range(1, 13):
        images = tiny("a dog", num_inference_steps=steps, seed=0, output_type="pt").images
        assert torch.isfinite(images).all(), f"non-finite pixels with {steps} steps"


def test_the_training_pool_takes_the_largest_of_several_draws_of_the_same_class_and_background() -> None:
    from freemask.attention_mask.generator.train import _larger_single_object
    from freemask.world import DEFAULT_WORLD, sample_scene_spec

    def area(spec) -> float:
        return sum((o.box[2] - o.box[0]) * (o.box[3] - o.box[1]) for o in spec.objects)

    firsts, chosen = [], []
    for seed in range(60):
        first = sample_scene_spec(np.random.default_rng(seed), DEFAULT_WORLD, 32, n_objects=1)
        pick = _larger_single_object(np.random.default_rng(seed), 32)
        assert [o.cls for o in pick.objects] == [o.cls for o in first.objects]
        assert pick.background == first.background and area(pick) >= area(first)
        firsts.append(area(first))
        chosen.append(area(pick))
    assert np.mean(chosen) > 1.2 * np.mean(firsts)


def test_training_stops_on_its_step_count_and_says_so(tmp_path: Path) -> None:
    from freemask.attention_mask.generator.train import train

    threads = torch.get_num_threads()  # train() sets torch's thread count; later tests keep theirs
    summary = train(tmp_path, minutes=10.0, seed=0, config=TINY_CONFIG, batch_size=4, pool_size=16, workers=1,
                    threads=threads, max_steps=3, progress=False)
    assert summary["steps"] == 3 and summary["stopped_on"] == "max_steps"
    log = (tmp_path / "train_log.txt").read_text(encoding="utf-8")
    assert '"max_steps": 3' in log and '"stopped_on": "max_steps"' in log
    assert FreeMaskTextToImagePipeline.from_pretrained(tmp_path).unet.config.sample_size == TINY_CONFIG.image_size
    timed_out = train(tmp_path / "timed", minutes=0.0, seed=0, config=TINY_CONFIG, batch_size=4, pool_size=16,
                      workers=1, threads=threads, max_steps=3, progress=False)
    assert timed_out["steps"] == 0 and timed_out["stopped_on"] == "minutes"
