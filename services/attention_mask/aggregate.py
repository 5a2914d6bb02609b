"""From attention probabilities to one soft map per sample (Free-Mask eq. 1 and eq. 2).

Pure functions on tensors, so the maths can be checked on hand-made numbers and
reused by the capture processors (eq. 1), the service and the benchmark (eq. 2).

Shapes used throughout:
- a *resolution* is the ``(height, width)`` of a UNet level's feature grid;
- captured cross-attention maps are ``(batch, tokens, height, width)``;
- a *token mask* ``(batch, tokens)`` says which token slots belong to the class word
  (several slots when the tokenizer splits the word; padding slots are ``False``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from freemask.shared.errors import InvalidInput

Resolution = tuple[int, int]


def attention_probabilities(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 1: ``softmax(Q Kᵀ · scale)`` over the key axis.

    ``query`` is ``(..., queries, d)`` and ``key`` ``(..., keys, d)``; the default scale is
    ``1/√d``. Scores and probabilities are float32 whatever the inputs are, because fp16
    logits would round by up to 1 % of a probability before the maps are averaged.
    ``attention_mask`` is an additive bias (or a boolean keep-mask) broadcastable to the
    scores, as diffusers passes it to SDPA.
    """
    if query.shape[-1] != key.shape[-1]:
        raise InvalidInput(
            f"query and key must share their last dimension, got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    if scale is None:
        scale = query.shape[-1] ** -0.5
    scores = float32_scores(query, key) * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask.float()
    return scores.softmax(dim=-1)


def float32_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``Q Kᵀ`` in float32.

    Half-precision inputs on a GPU of the same leading shape go to the tensor cores, which
    accumulate in float32 and here also write float32 (``bmm``'s ``out_dtype``): the float32
    product, without float32 copies of Q and K or float32 arithmetic (on an H100 at SD 1.5's
    size, the float32 products alone took 2.6 % of a captured pass's GPU time). Elsewhere
    both are upcast first.
    """
    half = query.dtype in (torch.float16, torch.bfloat16) and key.dtype == query.dtype
    if query.is_cuda and half and query.shape[:-2] == key.shape[:-2]:
        leading = query.shape[:-2]
        flat_query = query.reshape(-1, *query.shape[-2:])
        flat_key = key.reshape(-1, *key.shape[-2:])
        return torch.bmm(flat_query, flat_key.transpose(1, 2), out_dtype=torch.float32).view(
            *leading, query.shape[-2], key.shape[-2])
    return torch.matmul(query.float(), key.float().transpose(-1, -2))


def token_mask_for(token_indices: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack one group of token indices per sample into a padded index tensor and a mask.

    Groups may differ in length (a class word can be one token in one prompt and two in
    another); padding slots repeat the group's first index so a gather stays in range,
    and the mask keeps them out of every average.
    """
    if len(token_indices) == 0:
        raise InvalidInput("token_indices must name at least one sample's tokens")
    width = max(len(group) for group in token_indices)
    if width == 0 or any(len(group) == 0 for group in token_indices):
        raise InvalidInput("every sample needs at least one token index for its class word")
    indices = torch.zeros(len(token_indices), width, dtype=torch.long)
    mask = torch.zeros(len(token_indices), width, dtype=torch.bool)
    for row, group in enumerate(token_indices):
        for slot, index in enumerate(group):
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise InvalidInput(f"token indices must be non-negative integers, got {index!r}")
            indices[row, slot] = index
            mask[row, slot] = True
        indices[row, len(group) :] = group[0]
    return indices, mask


def merge_token_maps(maps: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 1 for a multi-token word: the mean of its tokens' maps.

    ``maps`` is ``(batch, tokens, h, w)``, ``token_mask`` ``(batch, tokens)`` or
    ``(1, tokens)`` for one word layout shared by the batch; returns ``(batch, h, w)``.
    Averaging (not summing) keeps a two-token word on the same scale as a one-token word,
    so one threshold grid serves both.
    """
    if maps.ndim != 4:
        raise InvalidInput(f"token maps must be (batch, tokens, h, w), got shape {tuple(maps.shape)}")
    if token_mask.ndim == 2 and token_mask.shape[0] == 1 and token_mask.shape[1] == maps.shape[1]:
        token_mask = token_mask.expand(maps.shape[0], -1)
    if token_mask.shape != maps.shape[:2]:
        raise InvalidInput(
            f"token mask {tuple(token_mask.shape)} does not match maps' (batch, tokens) {tuple(maps.shape[:2])}"
        )
    if not bool(token_mask.any(dim=1).all()):
        raise InvalidInput("every sample's token mask must select at least one token")
    weights = token_mask.to(device=maps.device, dtype=maps.dtype)
    weights = weights / weights.sum(dim=1, keepdim=True)
    return torch.einsum("bthw,bt->bhw", maps, weights)


def average_maps(total: torch.Tensor, count: int) -> torch.Tensor:
    """Eq. 2's mean over layers and steps, from a running sum and its number of terms.

    The capture keeps sums, not every step's map, so memory stays bounded; this divides.
    """
    if count <= 0:
        raise InvalidInput(f"cannot average {count} maps: nothing was captured at this resolution")
    return total / count


def upsample(maps: torch.Tensor, size: Resolution) -> torch.Tensor:
    """Bilinear resize of ``(batch, h, w)`` maps to ``size`` (align_corners=False, as torch).

    Bilinear rather than nearest so that coarse levels (8×8 on a 512 image) do not paint
    64-px blocks into the fused map.
    """
    if maps.ndim != 3:
        raise InvalidInput(f"maps to upsample must be (batch, h, w), got shape {tuple(maps.shape)}")
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)


def normalize_unit(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min–max normalise each ``(h, w)`` map of a ``(batch, h, w)`` stack to [0, 1].

    Thresholds (fixed 0.5 or the eq. 23 grid) only mean something on a common scale. A
    constant map becomes all zeros rather than NaN.
    """
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1)
    high = flat.max(dim=1).values.view(-1, 1, 1)
    return (maps - low) / (high - low).clamp_min(eps)


def fuse_resolutions(
    maps: Mapping[Resolution, torch.Tensor],
    output_size: Resolution,
    weights: Mapping[Resolution, float] | None = None,
    normalize_each: bool = False,
) -> torch.Tensor:
    """Eq. 2's fusion: upsample every level's ``(batch, h, w)`` map, weighted mean, then [0, 1].

    ``weights`` default to equal; a resolution missing from ``weights`` gets weight 0, so a
    caller can fuse a subset (e.g. the 16×16 levels only). ``normalize_each`` rescales every
    level to [0, 1] before fusing, for when one level's probabilities are systematically
    flatter than another's and would otherwise be drowned out.
    """
    if not maps:
        raise InvalidInput("no attention maps to fuse: nothing was captured")
    if weights is None:
        weights = {resolution: 1.0 for resolution in maps}
    unknown = set(weights) - set(maps)
    if unknown:
        raise InvalidInput(f"weights name resolutions that were not captured: {sorted(unknown)}")
    if any(weight < 0 for weight in weights.values()):
        raise InvalidInput("resolution weights must be non-negative")
    total_weight = float(sum(weights.values()))
    if total_weight <= 0:
        raise InvalidInput("resolution weights must not all be zero")
    batch = {tuple(level.shape[:1]) for level in maps.values()}
    if len(batch) != 1 or any(level.ndim != 3 for level in maps.values()):
        raise InvalidInput(
            "maps to fuse must all be (batch, h, w) with one batch size, got "
            + ", ".join(f"{res}: {tuple(level.shape)}" for res, level in maps.items())
        )
    fused: torch.Tensor | None = None
    for resolution, level in maps.items():
        weight = float(weights.get(resolution, 0.0))
        if weight == 0.0:
            continue
        if tuple(level.shape[-2:]) != tuple(resolution):
            raise InvalidInput(f"map keyed {resolution} has spatial shape {tuple(level.shape[-2:])}")
        level = normalize_unit(level) if normalize_each else level
        term = upsample(level.float(), output_size) * (weight / total_weight)
        fused = term if fused is None else fused + term
    assert fused is not None
    return normalize_unit(fused)


def soft_maps(
    cross_attention: Mapping[Resolution, torch.Tensor],
    token_mask: torch.Tensor,
    output_size: Resolution,
    weights: Mapping[Resolution, float] | None = None,
    normalize_each: bool = False,
) -> torch.Tensor:
    """Eq. 1 + eq. 2 end to end: per-level mean maps ``(batch, tokens, h, w)`` → ``(batch, H, W)``.

    ``cross_attention`` holds maps already averaged over layers and steps (what
    ``AttentionStore.cross_attention_means`` returns); the class word's tokens are merged,
    the levels upsampled and fused, and the result normalised to [0, 1].
    """
    merged = {resolution: merge_token_maps(level, token_mask) for resolution, level in cross_attention.items()}
    return fuse_resolutions(merged, output_size, weights=weights, normalize_each=normalize_each)
