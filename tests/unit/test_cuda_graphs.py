"""Denoising steps replayed from CUDA graphs (attention_mask/cuda_graphs.py).

On a CPU the context must change nothing, and a step that cannot be recorded must run
eagerly and say why. Where a GPU is present (not in CI; run on a lent GPU machine), a
tiny SD-layout pipeline checks that replayed steps give the eager steps' pixels, maps and
masks, and fill the attention store alike: the same sums, the same layer-call counts; and
that graphs of the torch.compile'd UNet (`compile_unet`) give the same output to within
the compiler's rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from pydantic import ValidationError

from freemask.attention_mask.capture import capture_attention
from freemask.attention_mask.cuda_graphs import GraphedStep, graphed_unet
from freemask.attention_mask.generation import MaskGenerator
from freemask.shared.config import AttentionMaskConfig

from sd_layout import TINY, build_sd_layout, write_bpe_files

PROMPT = "a photo of a dog on the grass"
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need an NVIDIA GPU")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> StableDiffusionPipeline:
    folder = tmp_path_factory.mktemp("bpe")
    write_bpe_files(folder, ("a", "photo", "of", "dog", "on", "the", "grass"))
    pipeline = build_sd_layout(folder, TINY)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def cuda_pipe(pipe: StableDiffusionPipeline) -> Iterator[StableDiffusionPipeline]:
    yield pipe.to("cuda")
    pipe.to("cpu")


def unet_inputs(pipe: StableDiffusionPipeline, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator("cpu").manual_seed(batch)
    config = pipe.unet.config
    sample = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    text = torch.randn(batch, TINY.max_length, config.cross_attention_dim, generator=generator)
    return sample.to(device), text.to(device)


def test_on_a_cpu_the_context_changes_nothing(pipe: StableDiffusionPipeline) -> None:
    with graphed_unet(pipe.unet) as step:
        assert step is None
        assert "forward" not in pipe.unet.__dict__


def test_compiling_without_graphs_is_refused() -> None:
    with pytest.raises(ValidationError, match="set cuda_graphs too"):
        AttentionMaskConfig(compile_unet=True, cuda_graphs=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine cannot record a CUDA graph")
def test_a_step_that_cannot_be_recorded_runs_eagerly_and_says_why(pipe: StableDiffusionPipeline) -> None:
    sample, text = unet_inputs(pipe, 2, "cpu")
    step = GraphedStep(pipe.unet.forward)
    with torch.no_grad():
        expected = pipe.unet(sample, torch.tensor(10), encoder_hidden_states=text, return_dict=False)[0]
        results = [step(sample, torch.tensor(10), text, return_dict=False)[0] for _ in range(3)]
    assert step.failure is not None and step.replays == 0
    for result in results:
        assert torch.equal(result, expected)


@GPU
@pytest.mark.parametrize("compiled", [False, True], ids=["eager-step", "compiled-step"])
def test_replayed_steps_fill_the_store_as_eager_steps_do(cuda_pipe: StableDiffusionPipeline, compiled: bool) -> None:
    unet, steps = cuda_pipe.unet, 4
    sample, text = unet_inputs(cuda_pipe, 2, "cuda")
    timesteps = torch.tensor([900, 600, 300, 10], device="cuda")
    # The compiled step fuses and reorders float32 arithmetic: equal to rounding, not to the bit.
    tolerance = {"atol": 1e-4, "rtol": 1e-3} if compiled else {}
    # Its convolutions also run in another layout, in TF32 as eager ones do (cuDNN's default), with
    # other algorithms: the predicted noise moved by up to 8.6e-4 on an H200.
    noise_tolerance = {"atol": 2e-3, "rtol": 1e-2} if compiled else {}
    stores, outputs = [], []
    for graphs in (False, True):
        with torch.no_grad(), capture_attention(unet, [3], self_attention_resolutions=(4,)) as store:
            forward = torch.compile(unet.forward, dynamic=False) if graphs and compiled else None
            with graphed_unet(unet, forward) if graphs else nullcontext() as step:
                noise = [unet(sample, timesteps[i], encoder_hidden_states=text, return_dict=False)[0]
                         for i in range(steps)]
        stores.append(store)
        outputs.append(noise)
    eager, graphed = stores
    warmups = 2 if compiled else 1  # a compiled step also runs once unrecorded, to compile
    assert step is not None and step.failure is None and step.captures == 1
    assert step.replays == steps - warmups
    assert "forward" not in unet.__dict__
    assert graphed.steps == eager.steps == steps
    assert graphed.cross_counts == eager.cross_counts and graphed.self_counts == eager.self_counts
    for resolution, level in eager.cross_attention_means().items():
        torch.testing.assert_close(graphed.cross_attention_means()[resolution], level, **tolerance)
    torch.testing.assert_close(graphed.self_attention_means()[(4, 4)], eager.self_attention_means()[(4, 4)],
                               **tolerance)
    for replayed, expected in zip(*reversed(outputs)):
        torch.testing.assert_close(replayed, expected, **noise_tolerance)


@GPU
def test_generation_with_graphs_matches_generation_without(cuda_pipe: StableDiffusionPipeline) -> None:
    config = AttentionMaskConfig(affinity="self_attention", num_inference_steps=5, device="cuda", guidance_scale=7.5)
    results = []
    for graphs in (False, True):
        generator = MaskGenerator(cuda_pipe, config.model_copy(update={"cuda_graphs": graphs}), "tiny-sd")
        results.append(generator.generate([generator.prompt_for(PROMPT, "dog", seed=seed) for seed in (0, 1)]))
    for eager, graphed in zip(*results):
        assert np.abs(eager.image.astype(int) - graphed.image.astype(int)).max() <= 1
        np.testing.assert_allclose(graphed.soft_map, eager.soft_map, atol=1e-4)
        assert (graphed.mask == eager.mask).mean() > 0.99


@GPU
def test_generation_with_graphs_of_the_compiled_unet_matches_generation_without(
        cuda_pipe: StableDiffusionPipeline) -> None:
    """Pixels and soft maps to within rounding. Masks are not compared: on random weights the
    random walk turns a 1e-5 relative change of the affinity into a different mask
    (README, GPU section); the store test above compares the affinity itself."""
    steps = 5
    config = AttentionMaskConfig(affinity="self_attention", num_inference_steps=steps, device="cuda",
                                 guidance_scale=7.5)
    uncompiled = MaskGenerator(cuda_pipe, config, "tiny-sd")
    compiled = MaskGenerator(cuda_pipe, config.model_copy(update={"compile_unet": True}), "tiny-sd")
    prompts = [uncompiled.prompt_for(PROMPT, "dog", seed=seed) for seed in (0, 1)]
    expected = uncompiled.generate(prompts)
    for _ in range(2):  # the second pass reuses the compiled step
        for eager, graphed in zip(expected, compiled.generate(prompts)):
            assert np.abs(eager.image.astype(int) - graphed.image.astype(int)).max() <= 2
            np.testing.assert_allclose(graphed.soft_map, eager.soft_map, atol=1e-3)
