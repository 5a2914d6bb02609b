"""Where a foreground goes: FOPA's heatmaps turned into one chosen box, plain numpy.

For each query, every heatmap cell names a box (geometry.candidate_boxes: a
scale and a centre, with the foreground's aspect). A cell is a candidate when
its box lies wholly inside the background and, once rounded to pixels, no
occupied box covers more than `max_overlap` of it. The best candidate has the
highest heatmap value; the runners-up are the next-best *distinct* pixel boxes
(neighbouring cells can round to the same pixels on a small image).

Equal scores are ordered by a permutation drawn from the query's seed, so the
same query always gets the same box, and another seed may pick another of the
tied boxes.

The heatmaps of a whole batch come from one call of the `HeatmapSource` (one
Triton request for a polled batch of tasks). The source is not the caller:
heatmaps of the wrong shape or with NaNs are a `HeatmapError`, never
`InvalidInput`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from freemask.placement.geometry import (
    BACKGROUND_SIDE,
    FOREGROUND_SIDE,
    HEATMAP_SIDE,
    NUM_SCALES,
    background_input,
    candidate_boxes,
    foreground_aspect,
    foreground_input,
    inside_image,
    pixel_boxes,
)
from freemask.shared.errors import InvalidInput
from freemask.shared.images import check_cutout, check_rgb

MAX_QUERIES = 64  # PlaceBatchRequest: 1..64 requests
MAX_CANDIDATES = 100  # PlaceRequest.num_candidates: 0..100
MAX_SEED = 2**64 - 1  # seeds are uint64 on the wire

PixelBox = tuple[int, int, int, int]  # (x, y, width, height) in background pixels


class HeatmapSource(Protocol):
    """FOPA: (B, 3, 64, 64) backgrounds and (B, 4, 32, 32) foregrounds -> (B, 8, 32, 32) heatmaps in [0, 1]."""

    def __call__(self, backgrounds: np.ndarray, foregrounds: np.ndarray) -> np.ndarray: ...


class UniformHeatmaps:
    """Every candidate box scores the same, so `choose` draws the box uniformly among the valid
    ones from the query's seed: placement without FOPA (the ablation), with the same geometry."""

    def __call__(self, backgrounds: np.ndarray, foregrounds: np.ndarray) -> np.ndarray:
        return np.full((len(backgrounds), NUM_SCALES, HEATMAP_SIDE, HEATMAP_SIDE), 0.5, np.float32)

    def model_version(self) -> str:
        return "v1"


class HeatmapError(RuntimeError):
    """The heatmap source answered something unusable (wrong shape, NaN): a fault of the model
    or its server, not of the request, so it is retried rather than refused."""


@dataclass(frozen=True)
class PlacementQuery:
    """One foreground to place on one background."""

    background: np.ndarray  # uint8 (H, W, 3)
    foreground: np.ndarray  # uint8 (h, w, 3)
    foreground_mask: np.ndarray  # bool (h, w): the object's pixels
    occupied: tuple[PixelBox, ...]  # boxes of objects already in the scene, in background pixels
    max_overlap: float  # largest intersection over candidate area allowed with any occupied box, [0, 1]
    num_candidates: int = 0  # runners-up to return besides the best, 0..MAX_CANDIDATES
    seed: int = 0  # orders equal scores; 0..MAX_SEED


@dataclass(frozen=True)
class Placement:
    box: PixelBox
    score: float  # the heatmap value of the cell that produced the box
    scale_index: int  # index into geometry.SCALES


@dataclass(frozen=True)
class PlacementResult:
    best: Placement | None  # None when no box inside the image passes the overlap limit
    candidates: tuple[Placement, ...]  # runners-up by decreasing score, distinct from best and each other


def place(queries: Sequence[PlacementQuery], source: HeatmapSource) -> list[PlacementResult]:
    """Place every query; all queries are validated before the one call of `source`."""
    if not 1 <= len(queries) <= MAX_QUERIES:
        raise InvalidInput(f"a placement batch holds 1..{MAX_QUERIES} queries, got {len(queries)}")
    for index, query in enumerate(queries):
        try:
            validate_query(query)
        except InvalidInput as err:
            raise InvalidInput(f"request {index}: {err}" if len(queries) > 1 else str(err)) from None
    backgrounds = np.stack([background_input(q.background) for q in queries])
    foregrounds = np.stack([foreground_input(q.foreground, q.foreground_mask) for q in queries])
    heatmaps = _checked_heatmaps(source(backgrounds, foregrounds), len(queries))
    return [choose(query, heatmap) for query, heatmap in zip(queries, heatmaps)]


def validate_query(query: PlacementQuery) -> None:
    """InvalidInput naming the first thing wrong with `query`."""
    check_rgb(query.background, "background")
    check_cutout(query.foreground, query.foreground_mask)
    height, width = query.background.shape[:2]
    for index, (x, y, w, h) in enumerate(query.occupied):
        if not (w >= 1 and h >= 1 and 0 <= x and 0 <= y and x + w <= width and y + h <= height):
            raise InvalidInput(f"occupied box {index} (x={x}, y={y}, width={w}, height={h}) does not lie inside "
                               f"the {width}x{height} background")
    if not 0.0 <= query.max_overlap <= 1.0:
        raise InvalidInput(f"max_overlap must be in [0, 1], got {query.max_overlap}")  # NaN fails the test too
    if not 0 <= query.num_candidates <= MAX_CANDIDATES:
        raise InvalidInput(f"num_candidates must be in 0..{MAX_CANDIDATES}, got {query.num_candidates}")
    if not 0 <= query.seed <= MAX_SEED:
        raise InvalidInput(f"seed must be in 0..2**64-1, got {query.seed}")


def choose(query: PlacementQuery, heatmap: np.ndarray) -> PlacementResult:
    """The best box and runners-up of one (validated) query, from its (NUM_SCALES, side, side) heatmap."""
    height, width = query.background.shape[:2]
    normalised = candidate_boxes(foreground_aspect(query.foreground_mask), width, height)
    cells = np.flatnonzero(inside_image(normalised))  # flat indices into the heatmap's layout
    boxes = pixel_boxes(normalised.reshape(-1, 4)[cells], width, height)
    allowed = _overlap_fractions(boxes, query.occupied).max(axis=1, initial=0.0) <= query.max_overlap
    cells, boxes = cells[allowed], boxes[allowed]
    scores = heatmap.reshape(-1)[cells]
    tie_break = np.random.default_rng(query.seed).permutation(len(cells))
    order = np.lexsort((tie_break, -scores))  # the last key sorts first: score, highest first
    # The first (best-scored) cell of each distinct pixel box stands for that box.
    _, first = np.unique(boxes[order], axis=0, return_index=True)
    kept = order[np.sort(first)][: 1 + query.num_candidates]
    placements = [Placement(box=tuple(int(v) for v in boxes[i]), score=float(scores[i]),  # type: ignore[arg-type]
                            scale_index=int(cells[i] // (HEATMAP_SIDE * HEATMAP_SIDE))) for i in kept]
    return PlacementResult(best=placements[0] if placements else None, candidates=tuple(placements[1:]))


def _checked_heatmaps(heatmaps: np.ndarray, count: int) -> np.ndarray:
    expected = (count, NUM_SCALES, HEATMAP_SIDE, HEATMAP_SIDE)
    heatmaps = np.asarray(heatmaps)
    if heatmaps.shape != expected:
        raise HeatmapError(f"the heatmap source returned shape {heatmaps.shape}, expected {expected} "
                           f"(inputs were {count}x3x{BACKGROUND_SIDE}x{BACKGROUND_SIDE} and "
                           f"{count}x4x{FOREGROUND_SIDE}x{FOREGROUND_SIDE})")
    if not np.isfinite(heatmaps).all():
        raise HeatmapError(f"the heatmap source returned {int((~np.isfinite(heatmaps)).sum())} non-finite values")
    return heatmaps.astype(np.float32, copy=False)


def _overlap_fractions(boxes: np.ndarray, occupied: Sequence[PixelBox]) -> np.ndarray:
    """(N, K): the share of each candidate's area that each occupied box covers."""
    if not occupied:
        return np.zeros((len(boxes), 0))
    taken = np.asarray(occupied, dtype=np.int64)
    left = np.maximum(boxes[:, None, 0], taken[None, :, 0])
    top = np.maximum(boxes[:, None, 1], taken[None, :, 1])
    right = np.minimum(boxes[:, None, 0] + boxes[:, None, 2], taken[None, :, 0] + taken[None, :, 2])
    bottom = np.minimum(boxes[:, None, 1] + boxes[:, None, 3], taken[None, :, 1] + taken[None, :, 3])
    intersection = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    return intersection / (boxes[:, None, 2] * boxes[:, None, 3])

