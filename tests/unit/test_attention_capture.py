"""Attention capture and aggregation (eq. 1, eq. 2) of the attention-mask stage.

The maths is checked on hand-made tensors; the capture on a randomly initialised tiny
`UNet2DConditionModel` (attention at 16×16 and 8×8 for a 32×32 input), which exercises
the same code path as SD 1.5 at a fraction of the cost.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from freemask.attention_mask.aggregate import (
    attention_probabilities,
    average_maps,
    float32_scores,
    fuse_resolutions,
    merge_token_maps,
    normalize_unit,
    soft_maps,
    token_mask_for,
    upsample,
)
from freemask.attention_mask.capture import AttentionStore, CaptureAttnProcessor, capture_attention
from freemask.shared.errors import InvalidInput

PROMPT_TOKENS = 8
TEXT_WIDTH = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, two threads on tiny matrices spend
    their time waiting for each other (a forward goes from ~0.05 s to ~3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,  # the number of heads, in this class
        norm_num_groups=8,
    )
    return model.eval()


def inputs(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 3, 32, 32, generator=generator)
    text = torch.randn(batch, PROMPT_TOKENS, TEXT_WIDTH, generator=generator)
    return sample, text


# -- eq. 1 and eq. 2 on hand-made tensors ------------------------------------------------


def test_eq1_is_the_softmax_of_scaled_query_key_products() -> None:
    query = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    key = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    e = math.e
    expected_unit_scale = torch.tensor(
        [[e / (e + 2), 1 / (e + 2), 1 / (e + 2)], [1 / (e**2 + 2), e**2 / (e**2 + 2), 1 / (e**2 + 2)]]
    )
    assert torch.allclose(attention_probabilities(query, key, scale=1.0), expected_unit_scale, atol=1e-7)
    # The default scale is 1/√d.
    scores = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]) / math.sqrt(2)
    assert torch.allclose(attention_probabilities(query, key), scores.softmax(-1), atol=1e-7)


def test_multi_token_words_are_merged_by_averaging_their_maps() -> None:
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    indices, mask = token_mask_for([[4, 5], [7]])
    assert indices.tolist() == [[4, 5], [7, 7]] and mask.tolist() == [[True, True], [True, False]]
    mask3 = torch.tensor([[True, True, False], [False, False, True]])
    merged = merge_token_maps(maps, mask3)
    assert torch.equal(merged[0], (maps[0, 0] + maps[0, 1]) / 2)
    assert torch.equal(merged[1], maps[1, 2])


def test_eq2_averages_over_layers_and_steps() -> None:
    store = AttentionStore([0])
    layers_and_steps = [torch.full((1, 1, 2, 2), value) for value in (1.0, 2.0, 6.0)]
    for number, value in enumerate(layers_and_steps):
        store.add_cross(f"layer{number % 2}", (2, 2), value)
    assert store.cross_counts[(2, 2)] == 3
    assert torch.equal(store.cross_attention_means()[(2, 2)], torch.full((1, 1, 2, 2), 3.0))
    assert torch.equal(average_maps(torch.full((2, 2), 9.0), 3), torch.full((2, 2), 3.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core path needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scores_on_a_gpu_are_the_float32_product(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(7)
    # (batch, tokens, heads, d) seen as (batch, heads, tokens, d), strided as the capture processors pass it
    query = torch.randn(2, 64, 3, 40, generator=generator).to("cuda", dtype).transpose(1, 2)
    key = torch.randn(2, 3, 77, 40, generator=generator).to("cuda", dtype)
    expected = (query.double() @ key.double().transpose(-1, -2)).float()
    scores = float32_scores(query, key)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(attention_probabilities(query, key), (expected * 40**-0.5).softmax(dim=-1))


def test_upsampling_a_2x2_map_to_4x4_is_torch_bilinear_interpolation() -> None:
    coarse = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    expected = F.interpolate(coarse[:, None], size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(upsample(coarse, (4, 4)), expected)


def test_eq2_fuses_resolutions_with_weights_and_normalises_to_unit_range() -> None:
    fine = torch.tensor([[[0.0, 0.2, 0.4, 0.6], [0.1, 0.3, 0.5, 0.7], [0.2, 0.4, 0.6, 0.8], [0.3, 0.5, 0.7, 0.9]]])
    coarse = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    maps = {(4, 4): fine, (2, 2): coarse}
    equal = fuse_resolutions(maps, (4, 4))
    assert torch.allclose(equal, normalize_unit(0.5 * fine + 0.5 * upsample(coarse, (4, 4))), atol=1e-6)
    assert float(equal.min()) == 0.0 and float(equal.max()) == pytest.approx(1.0)
    weighted = fuse_resolutions(maps, (4, 4), weights={(4, 4): 3.0, (2, 2): 1.0})
    assert torch.allclose(weighted, normalize_unit(0.75 * fine + 0.25 * upsample(coarse, (4, 4))), atol=1e-6)
    only_fine = fuse_resolutions(maps, (4, 4), weights={(4, 4): 1.0})
    assert torch.allclose(only_fine, normalize_unit(fine), atol=1e-6)


def test_soft_maps_merges_tokens_then_fuses() -> None:
    level = torch.rand(1, 2, 2, 2)
    mask = torch.tensor([[True, True]])
    expected = normalize_unit(upsample(level.mean(dim=1), (4, 4)))
    assert torch.allclose(soft_maps({(2, 2): level}, mask, (4, 4)), expected, atol=1e-6)


# -- the processor against diffusers' default ---------------------------------------------


@pytest.mark.parametrize("which", ["attn1", "attn2"])
def test_processor_output_equals_attn_processor_2_0_and_its_maps_equal_get_attention_scores(
    unet: UNet2DConditionModel, which: str
) -> None:
    attn = getattr(unet.down_blocks[1].attentions[0].transformer_blocks[0], which)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 16 * 16, 64, generator=generator)
    text = torch.randn(2, PROMPT_TOKENS, TEXT_WIDTH, generator=generator) if which == "attn2" else None
    store = AttentionStore([2, 3], self_attention_resolutions=(16,))
    with torch.no_grad():
        reference = AttnProcessor2_0()(attn, hidden, text)
        captured = CaptureAttnProcessor(store, which)(attn, hidden, text)
        context = hidden if text is None else text
        query = attn.head_to_batch_dim(attn.to_q(hidden))
        key = attn.head_to_batch_dim(attn.to_k(context))
        probabilities = attn.get_attention_scores(query, key).view(2, attn.heads, 256, -1).mean(dim=1)
    assert torch.equal(captured, reference)
    if which == "attn2":
        expected = probabilities[:, :, [2, 3]].transpose(1, 2).reshape(2, 2, 16, 16)
        assert torch.allclose(store.cross_attention_means()[(16, 16)], expected, atol=1e-6)
        assert not store.self_sums
    else:
        assert torch.allclose(store.self_attention_means()[(16, 16)], probabilities, atol=1e-6)
        assert not store.cross_sums


def test_a_unet_forward_with_capture_is_identical_to_one_without(unet: UNet2DConditionModel) -> None:
    sample, text = inputs(2)
    with torch.no_grad():
        plain = unet(sample, 10, encoder_hidden_states=text).sample
        with capture_attention(unet, [1], self_attention_resolutions=(16, 8)):
            captured = unet(sample, 10, encoder_hidden_states=text).sample
    assert torch.equal(plain, captured)


# -- labels, counts, guidance, restoring ----------------------------------------------------


def test_maps_are_labelled_by_resolution_and_counted_per_layer_and_step(unet: UNet2DConditionModel) -> None:
    sample, text = inputs(1)
    steps = 2
    with torch.no_grad(), capture_attention(unet, [1, 2], self_attention_resolutions=(8,)) as store:
        for timestep in range(steps):
            unet(sample, 10 * timestep, encoder_hidden_states=text)
    # attention sits at 16×16 (down 1, up 1 ×2) and 8×8 (down 2, mid, up 0 ×2)
    assert set(store.cross_sums) == {(16, 16), (8, 8)}
    assert store.steps == steps
    assert store.cross_counts == {(16, 16): 3 * steps, (8, 8): 4 * steps}
    assert {res: len(names) for res, names in store.cross_layers.items()} == {(16, 16): 3, (8, 8): 4}
    assert "mid_block.attentions.0.transformer_blocks.0.attn2" in store.cross_layers[(8, 8)]
    assert store.self_counts == {(8, 8): 4 * steps}
    means = store.cross_attention_means()
    assert means[(16, 16)].shape == (1, 2, 16, 16) and means[(8, 8)].shape == (1, 2, 8, 8)
    affinity = store.self_attention_means()[(8, 8)]
    assert affinity.shape == (1, 64, 64)
    assert torch.allclose(affinity.sum(dim=-1), torch.ones(1, 64), atol=1e-5)


def test_a_compiled_unet_traces_capture_in_one_graph_that_later_passes_reuse(unet: UNet2DConditionModel) -> None:
    """`attention_mask.compile_unet` records the torch.compile'd forward: a graph break in the
    processors would split it into pieces, and a guard on a store's own objects would
    recompile every pass. Traced here with dynamo's eager backend (what inductor is handed)."""
    from torch._dynamo.utils import counters

    sample, text = inputs(4, seed=5)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(unet.forward, backend="eager", dynamic=False, fullgraph=True)

    def one_pass(forward: object) -> AttentionStore:
        # As the graphed step runs it: the first step eagerly (it allocates the sums), the rest through `forward`.
        with torch.no_grad(), capture_attention(unet, [[1, 2], [3]], self_attention_resolutions=(8,),
                                                classifier_free_guidance=True) as store:
            for step, timestep in enumerate((900, 500, 100)):
                if step == 1:
                    unet.forward = forward
                unet(sample, torch.tensor(timestep), encoder_hidden_states=text, return_dict=False)
            del unet.forward
        return store

    eager = one_pass(unet.forward)
    for _ in range(2):  # a new store, new processors, the same compiled graph
        store = one_pass(compiled)
        assert store.steps == 3 and store.cross_counts == eager.cross_counts and store.self_counts == eager.self_counts
        for resolution, level in eager.cross_attention_means().items():
            torch.testing.assert_close(store.cross_attention_means()[resolution], level)
        torch.testing.assert_close(store.self_attention_means()[(8, 8)], eager.self_attention_means()[(8, 8)])
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    torch._dynamo.reset()


def test_only_the_conditional_half_is_captured_under_guidance(unet: UNet2DConditionModel) -> None:
    sample, conditional = inputs(1, seed=3)
    _, unconditional = inputs(1, seed=4)
    with torch.no_grad():
        with capture_attention(
            unet, [1], self_attention_resolutions=(8,), classifier_free_guidance=True
        ) as guided:
            unet(sample.repeat(2, 1, 1, 1), 10, encoder_hidden_states=torch.cat([unconditional, conditional]))
        with capture_attention(unet, [1], self_attention_resolutions=(8,)) as alone:
            unet(sample, 10, encoder_hidden_states=conditional)
    for resolution, level in alone.cross_attention_means().items():
        assert guided.cross_attention_means()[resolution].shape == level.shape == (1, 1, *resolution)
        assert torch.allclose(guided.cross_attention_means()[resolution], level, atol=1e-5)
    assert torch.allclose(guided.self_attention_means()[(8, 8)], alone.self_attention_means()[(8, 8)], atol=1e-5)


def test_per_sample_token_groups_of_different_lengths(unet: UNet2DConditionModel) -> None:
    sample, text = inputs(2)
    with torch.no_grad(), capture_attention(unet, [[1, 2], [5]], cross_attention_resolutions=(8,)) as store:
        unet(sample, 10, encoder_hidden_states=text)
    assert set(store.cross_sums) == {(8, 8)}
    fused = soft_maps(store.cross_attention_means(), store.token_mask, (32, 32))
    assert fused.shape == (2, 32, 32)
    assert torch.allclose(fused.amin(dim=(1, 2)), torch.zeros(2)) and torch.allclose(fused.amax(dim=(1, 2)), torch.ones(2))


def test_disabling_the_store_skips_a_step(unet: UNet2DConditionModel) -> None:
    sample, text = inputs(2)
    with torch.no_grad(), capture_attention(unet, [1]) as store:
        unet(sample, 10, encoder_hidden_states=text)
        store.enabled = False
        unet(sample, 20, encoder_hidden_states=text)
    assert store.steps == 1 and store.cross_counts == {(16, 16): 3, (8, 8): 4}
    # A word layout given once applies to every sample of the batch.
    fused = soft_maps(store.cross_attention_means(), store.token_mask, (32, 32))
    assert fused.shape == (2, 32, 32)


def test_original_processors_are_restored_even_on_exception(unet: UNet2DConditionModel) -> None:
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(unet, [1]):
            assert all(isinstance(p, CaptureAttnProcessor) for p in unet.attn_processors.values())
            raise RuntimeError("boom")
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)
    assert not unet._forward_pre_hooks


# -- bad input ------------------------------------------------------------------------------


def test_a_token_index_beyond_the_prompt_is_refused_and_processors_come_back(unet: UNet2DConditionModel) -> None:
    before = dict(unet.attn_processors)
    sample, text = inputs(1)
    with pytest.raises(InvalidInput, match=f"token index {PROMPT_TOKENS} is out of range"):
        with torch.no_grad(), capture_attention(unet, [PROMPT_TOKENS]):
            unet(sample, 10, encoder_hidden_states=text)
    assert all(unet.attn_processors[name] is before[name] for name in before)


def test_bad_inputs_get_clear_errors(unet: UNet2DConditionModel) -> None:
    with pytest.raises(InvalidInput, match="empty"):
        AttentionStore([])
    with pytest.raises(InvalidInput, match="non-negative"):
        AttentionStore([-1])
    with pytest.raises(InvalidInput, match="even UNet batch"):
        AttentionStore([0], classifier_free_guidance=True).conditional_rows(3)
    with pytest.raises(InvalidInput, match="per-sample groups"):
        AttentionStore([[0], [1], [2]]).gather_indices(2, 8, torch.device("cpu"))
    with pytest.raises(InvalidInput, match="does not match"):
        merge_token_maps(torch.zeros(1, 2, 4, 4), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(InvalidInput, match="one batch size"):
        fuse_resolutions({(2, 2): torch.zeros(1, 2, 2), (4, 4): torch.zeros(2, 4, 4)}, (4, 4))
    with pytest.raises(InvalidInput, match="has spatial shape"):
        fuse_resolutions({(2, 2): torch.zeros(1, 4, 4)}, (4, 4))
    with pytest.raises(InvalidInput, match="not captured"):
        fuse_resolutions({(2, 2): torch.zeros(1, 2, 2)}, (4, 4), weights={(8, 8): 1.0})
    with pytest.raises(InvalidInput, match="nothing was captured"):
        fuse_resolutions({}, (4, 4))
