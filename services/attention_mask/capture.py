"""Capture cross- and self-attention maps from any diffusers ``UNet2DConditionModel``.

Capture goes through diffusers' attention-processor hook, never by patching model code:
``capture_attention`` installs one weight-free ``CaptureAttnProcessor`` per attention
layer and puts the original processors back on exit. Every processor computes its
layer's output exactly as ``AttnProcessor2_0`` does (same ops, same order, SDPA), so a
generation with capture gives bit-identical pixels; only for the layers it captures does
it *also* recompute the probabilities ``softmax(QKᵀ/√d)`` (eq. 1), which SDPA never exposes.

Why the choices below:
- **Labels come from the data, not from processor names.** ``unet.attn_processors`` lists
  layers down, up, mid, but they execute down, mid, up; so a processor labels what it sees
  by its query's token count (``h·w``), resolved against the latent size the UNet was
  called with (a forward pre-hook records it), which also handles non-square latents.
- **Bounded memory.** The ``AttentionStore`` keeps one running *sum* per resolution plus a
  count, never a per-step list: cross-attention costs ``batch × tokens × h × w`` floats per
  resolution, self-attention ``batch × (h·w)²`` per *requested* resolution (16×16 → 256 KiB
  per sample, 32×32 → 4 MiB, 64×64 → 64 MiB; request the coarse ones). Self-attention
  probabilities are built a group of heads at a time, so the transient peak stays under
  ``SELF_ATTENTION_CHUNK_BYTES`` however large the batch.
- **Classifier-free guidance.** diffusers pipelines run the UNet on
  ``torch.cat([negative_prompt_embeds, prompt_embeds])``: the unconditional half first, the
  conditional half second. With ``classifier_free_guidance=True`` the store keeps rows
  ``[B/2:]`` only. This is told to the store, not guessed from the batch, because an even
  batch of plain prompts is indistinguishable from a guided one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from freemask.attention_mask.aggregate import Resolution, attention_probabilities, token_mask_for
from freemask.shared.errors import InvalidInput

_MAX_DOWNSAMPLING_STEPS = 8  # factors 1, 2, ... 128: deeper than any diffusers UNet


def _spatial_shape(tokens: int, latent_size: Resolution | None) -> Resolution:
    """The ``(h, w)`` of a feature grid with ``tokens`` positions.

    diffusers downsamples by stride-2 convolutions with padding 1, i.e. ``ceil(H/2)``, so
    the level with factor ``f`` has ``ceil(H/f) × ceil(W/f)`` positions. Without a latent
    size (a layer called outside a UNet forward) the grid is taken to be square.
    """
    if latent_size is not None:
        height, width = latent_size
        for step in range(_MAX_DOWNSAMPLING_STEPS):
            factor = 2**step
            h, w = -(-height // factor), -(-width // factor)
            if h * w == tokens:
                return (h, w)
    side = round(tokens**0.5)
    if side * side != tokens:
        raise InvalidInput(f"cannot tell the spatial shape of a {tokens}-position attention layer")
    return (side, side)


# The most float32 self-attention probabilities held at once while capturing (see _capture_self).
SELF_ATTENTION_CHUNK_BYTES = 256 * 1024 * 1024


class AttentionStore:
    """Owns the running sums of captured maps; one per generation (or per batch of them).

    Cross-attention sums are ``(batch, tokens, h, w)`` per resolution, self-attention sums
    ``(batch, h·w, h·w)`` per requested resolution; both are averaged over heads before they
    are added, and counted in layer-calls, so ``count == layers at that resolution × steps``.
    ``enabled`` can be switched off between UNet calls to skip steps (e.g. capture only the
    late, low-noise steps) at no cost; not under ``graphed_unet``, whose replays repeat the
    captured step whatever ``enabled`` says.

    Everything a layer-call changes lives on the sums' device, the layer-call counters
    included: a step replayed from a CUDA graph (``cuda_graphs.graphed_unet``) runs none of
    this Python, yet updates the store exactly as an eager step does.
    """

    def __init__(
        self,
        token_indices: Sequence[int] | Sequence[Sequence[int]],
        *,
        self_attention_resolutions: Iterable[int | Resolution] = (),
        cross_attention_resolutions: Iterable[int | Resolution] | None = None,
        classifier_free_guidance: bool = False,
    ) -> None:
        if len(token_indices) == 0:
            raise InvalidInput("token_indices is empty: name the class word's token positions")
        if all(isinstance(index, int) and not isinstance(index, bool) for index in token_indices):
            groups: list[list[int]] = [list(token_indices)]  # type: ignore[arg-type]
            self._broadcast = True
        elif all(isinstance(group, Sequence) for group in token_indices):
            groups = [list(group) for group in token_indices]  # type: ignore[arg-type]
            self._broadcast = False
        else:
            raise InvalidInput("token_indices must be a list of ints or one list of ints per sample")
        self.token_indices, self.token_mask = token_mask_for(groups)
        # Read once, here: a host read of a tensor inside every cross-attention call would also
        # split a torch.compile'd UNet into a graph per layer.
        self._highest_token = int(self.token_indices.max())
        self._device_indices: dict[tuple[torch.device, int], torch.Tensor] = {}
        self.self_attention_resolutions = {self._as_resolution(r) for r in self_attention_resolutions}
        self.cross_attention_resolutions = (
            None if cross_attention_resolutions is None
            else {self._as_resolution(r) for r in cross_attention_resolutions}
        )
        self.classifier_free_guidance = classifier_free_guidance
        self.enabled = True
        self.latent_size: Resolution | None = None
        self.steps = 0
        self.cross_sums: dict[Resolution, torch.Tensor] = {}
        self.cross_calls: dict[Resolution, torch.Tensor] = {}  # 0-d layer-call counters on the sums' device
        self.cross_layers: dict[Resolution, set[str]] = {}
        self.self_sums: dict[Resolution, torch.Tensor] = {}
        self.self_calls: dict[Resolution, torch.Tensor] = {}

    @staticmethod
    def _as_resolution(value: int | Resolution) -> Resolution:
        if isinstance(value, int):
            return (value, value)
        height, width = value
        return (int(height), int(width))

    def reset(self) -> None:
        """Forget everything captured, keep the configuration (reuse across generations)."""
        self.steps = 0
        self.latent_size = None
        for table in (self.cross_sums, self.cross_calls, self.cross_layers, self.self_sums, self.self_calls):
            table.clear()

    # -- what the processors call -------------------------------------------------------

    def conditional_rows(self, batch_size: int) -> slice:
        """The rows of a UNet batch whose maps are kept (see the module docstring on CFG)."""
        if not self.classifier_free_guidance:
            return slice(0, batch_size)
        if batch_size % 2:
            raise InvalidInput(
                f"classifier-free guidance needs an even UNet batch (uncond, cond), got {batch_size}"
            )
        return slice(batch_size // 2, batch_size)

    def wants_cross(self, resolution: Resolution) -> bool:
        return self.enabled and (
            self.cross_attention_resolutions is None or resolution in self.cross_attention_resolutions
        )

    def wants_self(self, resolution: Resolution) -> bool:
        return self.enabled and resolution in self.self_attention_resolutions

    def gather_indices(self, batch_size: int, sequence_length: int, device: torch.device) -> torch.Tensor:
        """The ``(batch, tokens)`` token positions to keep, checked against the prompt length."""
        if self._highest_token >= sequence_length:
            raise InvalidInput(
                f"token index {self._highest_token} is out of range for a prompt encoding of {sequence_length} tokens"
            )
        indices = self.token_indices
        if self._broadcast:
            indices = indices.expand(batch_size, -1)
        elif indices.shape[0] != batch_size:
            raise InvalidInput(
                f"token_indices has {indices.shape[0]} per-sample groups but the batch has {batch_size} prompts"
            )
        # A copy from pageable host memory waits for the GPU's queue to drain; done once per
        # (device, batch) instead of in every cross-attention call, it keeps the launches ahead.
        cached = self._device_indices.get((device, batch_size))
        if cached is None:
            cached = self._device_indices[(device, batch_size)] = indices.to(device)
        return cached

    def add_cross(self, layer: str, resolution: Resolution, maps: torch.Tensor) -> None:
        """Add one layer-call's ``(batch, tokens, h, w)`` head-averaged maps."""
        self._accumulate(self.cross_sums, self.cross_calls, resolution, maps)
        layers = self.cross_layers.setdefault(resolution, set())
        if layer not in layers:  # from the second step on a lookup only, which torch.compile treats as a constant
            layers.add(layer)

    def add_self(self, resolution: Resolution, affinity: torch.Tensor) -> None:
        """Add one layer-call's ``(batch, h·w, h·w)`` head-averaged self-attention."""
        self._accumulate(self.self_sums, self.self_calls, resolution, affinity)

    @staticmethod
    def _accumulate(
        sums: dict[Resolution, torch.Tensor], calls: dict[Resolution, torch.Tensor], resolution: Resolution,
        value: torch.Tensor
    ) -> None:
        total = sums.get(resolution)
        if total is None:
            sums[resolution] = value.detach().float().clone()
            calls[resolution] = torch.ones((), device=value.device)
            return
        if total.shape != value.shape:
            raise InvalidInput(
                f"captured maps at {resolution} changed shape from {tuple(total.shape)} to {tuple(value.shape)}:"
                " reset() the store between generations of different batch sizes"
            )
        total.add_(value.detach().float())
        calls[resolution].add_(1)

    def on_unet_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the UNet: count a denoising step and note the latent size."""
        sample = args[0] if args else kwargs.get("sample")
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            self.latent_size = (int(sample.shape[-2]), int(sample.shape[-1]))
        if self.enabled:
            self.steps += 1

    # -- what the caller reads ----------------------------------------------------------

    def cross_attention_means(self) -> dict[Resolution, torch.Tensor]:
        """Eq. 2's per-resolution mean over layers and steps: ``(batch, tokens, h, w)``."""
        return {res: total / self.cross_calls[res] for res, total in self.cross_sums.items()}

    def self_attention_means(self) -> dict[Resolution, torch.Tensor]:
        """Mean self-attention per requested resolution: ``(batch, h·w, h·w)``, rows sum to 1."""
        return {res: total / self.self_calls[res] for res, total in self.self_sums.items()}

    @property
    def cross_counts(self) -> dict[Resolution, int]:
        """Layer-calls added per cross-attention resolution (read back from the device: a sync)."""
        return {res: int(calls) for res, calls in self.cross_calls.items()}

    @property
    def self_counts(self) -> dict[Resolution, int]:
        """Layer-calls added per self-attention resolution (read back from the device: a sync)."""
        return {res: int(calls) for res, calls in self.self_calls.items()}


class CaptureAttnProcessor:
    """``AttnProcessor2_0``'s computation, plus probabilities for the layers the store wants.

    Weight-free: it holds only the store and its layer's name (for diagnostics), so one
    instance per layer costs nothing and names never leak into the maths.
    """

    def __init__(self, store: AttentionStore, layer_name: str) -> None:
        self.store = store
        self.layer_name = layer_name

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        # `args`/`kwargs` carry only diffusers' deprecated `scale`, which the default ignores too.
        is_cross = encoder_hidden_states is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
            resolution: Resolution = (height, width)
        else:
            resolution = _spatial_shape(hidden_states.shape[1], self.store.latent_size)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if is_cross and self.store.wants_cross(resolution):
            self._capture_cross(attn, query, key, attention_mask, resolution)
        elif not is_cross and self.store.wants_self(resolution):
            self._capture_self(attn, query, key, attention_mask, resolution)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _conditional(
        self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The rows of the conditional prompts (all rows unless guidance doubles the batch)."""
        rows = self.store.conditional_rows(query.shape[0])
        mask = None if attention_mask is None else attention_mask[rows]
        return query[rows], key[rows], mask

    def _capture_cross(
        self,
        attn: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        resolution: Resolution,
    ) -> None:
        """Eq. 1 for the class tokens only: full-row softmax, then keep the wanted columns."""
        query, key, mask = self._conditional(query, key, attention_mask)
        batch = query.shape[0]
        indices = self.store.gather_indices(batch, key.shape[-2], query.device)
        # The softmax must see every key (it normalises over the whole prompt); only
        # `tokens` columns of the head-averaged result are kept.
        probabilities = attention_probabilities(query, key, attn.scale, mask).mean(dim=1)  # (b, hw, seq)
        picked = probabilities.gather(2, indices[:, None, :].expand(-1, probabilities.shape[1], -1))
        maps = picked.transpose(1, 2).reshape(batch, indices.shape[1], *resolution)
        self.store.add_cross(self.layer_name, resolution, maps)

    def _capture_self(
        self,
        attn: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        resolution: Resolution,
    ) -> None:
        """Head-averaged self-attention, built a group of heads at a time to bound the peak memory.

        A group's float32 probabilities stay under SELF_ATTENTION_CHUNK_BYTES: all heads at once
        where that fits (few launches, which is what a GPU at small batch is bound by), one at a
        time for large grids.
        """
        query, key, mask = self._conditional(query, key, attention_mask)
        batch, heads, queries = query.shape[:3]
        per_head = batch * queries * key.shape[2] * 4
        group = max(1, min(heads, SELF_ATTENTION_CHUNK_BYTES // per_head))
        total: torch.Tensor | None = None
        for first in range(0, heads, group):
            last = min(first + group, heads)
            group_mask = None if mask is None else (mask if mask.shape[1] == 1 else mask[:, first:last])
            probabilities = attention_probabilities(query[:, first:last], key[:, first:last], attn.scale,
                                                    group_mask).sum(dim=1)
            total = probabilities if total is None else total.add_(probabilities)
        assert total is not None
        self.store.add_self(resolution, total / heads)


@contextmanager
def capture_attention(
    unet: Any,
    token_indices: Sequence[int] | Sequence[Sequence[int]],
    *,
    self_attention_resolutions: Iterable[int | Resolution] = (),
    cross_attention_resolutions: Iterable[int | Resolution] | None = None,
    classifier_free_guidance: bool = False,
) -> Iterator[AttentionStore]:
    """Install capture processors on ``unet`` for the duration of the block; yield the store.

    ``token_indices``: the class word's positions in the encoded prompt, either one list for
    every sample or one list per (conditional) sample. Cross-attention is captured at every
    resolution unless ``cross_attention_resolutions`` narrows it; self-attention only at
    ``self_attention_resolutions`` (ints mean square grids). The original processors are put
    back on exit, also when the block raises.
    """
    store = AttentionStore(
        token_indices,
        self_attention_resolutions=self_attention_resolutions,
        cross_attention_resolutions=cross_attention_resolutions,
        classifier_free_guidance=classifier_free_guidance,
    )
    original: Mapping[str, Any] = dict(unet.attn_processors)
    processors = {name: CaptureAttnProcessor(store, name.removesuffix(".processor")) for name in original}
    hook = unet.register_forward_pre_hook(store.on_unet_forward, with_kwargs=True)
    try:
        unet.set_attn_processor(dict(processors))  # a copy: set_attn_processor empties its argument
        yield store
    finally:
        hook.remove()
        unet.set_attn_processor(dict(original))
