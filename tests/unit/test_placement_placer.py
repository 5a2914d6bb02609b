"""The placement core on hand-made heatmaps, where the right box is known: the best
cell wins, the overlap limit holds, runners-up are distinct and sorted, ties follow
the seed, one source call serves a batch, and bad input is refused clearly."""

from __future__ import annotations

import numpy as np
import pytest

from freemask.placement.geometry import HEATMAP_SIDE, NUM_SCALES, candidate_boxes, inside_image, pixel_box
from freemask.placement.placer import (
    HeatmapError,
    PlacementQuery,
    PlacementResult,
    UniformHeatmaps,
    place,
)
from freemask.shared.errors import InvalidInput

SHAPE = (NUM_SCALES, HEATMAP_SIDE, HEATMAP_SIDE)


class FixedHeatmaps:
    """A HeatmapSource that answers given heatmaps (one per query, or one for all) and records its calls."""

    def __init__(self, *heatmaps: np.ndarray) -> None:
        self.heatmaps = heatmaps
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, backgrounds: np.ndarray, foregrounds: np.ndarray) -> np.ndarray:
        self.calls.append((backgrounds, foregrounds))
        chosen = self.heatmaps if len(self.heatmaps) == len(backgrounds) else self.heatmaps * len(backgrounds)
        return np.stack(chosen).astype(np.float32)


def peaks(*cells: tuple[int, int, int, float], floor: float = 0.0) -> np.ndarray:
    """A heatmap that is `floor` everywhere except the given (scale, row, column, value) cells."""
    heatmap = np.full(SHAPE, floor, np.float32)
    for s, i, j, value in cells:
        heatmap[s, i, j] = value
    return heatmap


def query(width: int = 64, height: int = 64, fg_size: tuple[int, int] = (10, 10), **fields) -> PlacementQuery:
    """A background of width x height and a foreground whose mask fills it (aspect = fg width / height)."""
    fg_w, fg_h = fg_size
    rng = np.random.default_rng(0)
    defaults = dict(background=rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
                    foreground=rng.integers(0, 256, (fg_h, fg_w, 3), dtype=np.uint8),
                    foreground_mask=np.ones((fg_h, fg_w), bool), occupied=(), max_overlap=0.3)
    return PlacementQuery(**{**defaults, **fields})


def cell_box(s: int, i: int, j: int, width: int = 64, height: int = 64, aspect: float = 1.0):
    return pixel_box(candidate_boxes(aspect, width, height)[s, i, j], width, height)


def overlap(box, other) -> float:
    x, y, w, h = box
    ox, oy, ow, oh = other
    inter = max(0, min(x + w, ox + ow) - max(x, ox)) * max(0, min(y + h, oy + oh) - max(y, oy))
    return inter / (w * h)


def all_placements(result: PlacementResult):
    return ([result.best] if result.best else []) + list(result.candidates)


def test_the_best_box_is_the_highest_scoring_cell() -> None:
    source = FixedHeatmaps(peaks((2, 10, 20, 0.9), (4, 25, 5, 0.6), floor=0.1))
    (result,) = place([query()], source)
    assert result.best is not None
    assert result.best.box == cell_box(2, 10, 20)
    assert result.best.score == pytest.approx(0.9) and result.best.scale_index == 2
    assert result.candidates == ()  # num_candidates defaults to 0


def test_cells_whose_box_leaves_the_image_are_never_chosen() -> None:
    assert not inside_image(candidate_boxes(1.0, 64, 64))[7, 0, 0]  # the largest box at the corner sticks out
    (result,) = place([query()], FixedHeatmaps(peaks((7, 0, 0, 1.0), (1, 16, 16, 0.5))))
    assert result.best is not None and result.best.box == cell_box(1, 16, 16)


def test_the_overlap_limit_moves_the_answer_and_a_limit_of_one_does_not() -> None:
    heatmap = peaks((3, 8, 8, 0.95), (3, 24, 24, 0.7), floor=0.05)
    top, runner_up = cell_box(3, 8, 8), cell_box(3, 24, 24)
    assert overlap(runner_up, top) == 0.0  # the two peaks are far apart

    (blocked,) = place([query(occupied=(top,), max_overlap=0.3)], FixedHeatmaps(heatmap))
    assert blocked.best is not None and blocked.best.box == runner_up and blocked.best.score == pytest.approx(0.7)

    (free,) = place([query(occupied=(top,), max_overlap=1.0)], FixedHeatmaps(heatmap))
    assert free.best is not None and free.best.box == top


def test_every_returned_box_respects_the_limit_and_lies_inside_the_image() -> None:
    width, height = 96, 48
    occupied = ((10, 5, 30, 30), (50, 20, 40, 25))
    heatmap = np.random.default_rng(3).random(SHAPE).astype(np.float32)
    (result,) = place([query(width, height, fg_size=(12, 20), occupied=occupied, max_overlap=0.2,
                             num_candidates=100)], FixedHeatmaps(heatmap))
    placements = all_placements(result)
    assert len(placements) == 101
    for placement in placements:
        x, y, w, h = placement.box
        assert 0 <= x and 0 <= y and w >= 1 and h >= 1 and x + w <= width and y + h <= height
        assert max(overlap(placement.box, taken) for taken in occupied) <= 0.2


def test_candidates_are_distinct_pixel_boxes_by_decreasing_score() -> None:
    # On a 16 px image many of the 32x32 cells round to the same pixels.
    heatmap = np.random.default_rng(5).random(SHAPE).astype(np.float32)
    (result,) = place([query(16, 16, num_candidates=100, max_overlap=1.0)], FixedHeatmaps(heatmap))
    placements = all_placements(result)
    boxes = [p.box for p in placements]
    scores = [p.score for p in placements]
    assert len(set(boxes)) == len(boxes)
    assert scores == sorted(scores, reverse=True)
    # each distinct box carries the best score of the cells that round to it
    normalised = candidate_boxes(1.0, 16, 16)
    inside = inside_image(normalised)
    best_of: dict[tuple[int, ...], float] = {}
    for s, i, j in zip(*np.nonzero(inside)):
        box = pixel_box(normalised[s, i, j], 16, 16)
        best_of[box] = max(best_of.get(box, 0.0), float(heatmap[s, i, j]))
    assert len(best_of) > len(boxes) - 1  # fewer than 101 distinct boxes exist; all are returned
    assert {b: s for b, s in zip(boxes, scores)} == pytest.approx(
        {b: s for b, s in best_of.items() if b in set(boxes)})
    assert result.best is not None and result.best.score == pytest.approx(max(best_of.values()))


def test_ties_are_broken_by_the_seed_reproducibly() -> None:
    flat = np.full(SHAPE, 0.5, np.float32)

    def best_box(seed: int):
        (result,) = place([query(seed=seed, num_candidates=3)], FixedHeatmaps(flat))
        assert result.best is not None
        return result.best.box, tuple(c.box for c in result.candidates)

    assert best_box(7) == best_box(7)
    assert len({best_box(seed)[0] for seed in range(10)}) > 1  # another seed may pick another tied box


def test_a_batch_is_one_source_call_and_each_query_gets_its_own_heatmap() -> None:
    source = FixedHeatmaps(peaks((1, 5, 5, 0.8)), peaks((5, 16, 16, 0.8)), peaks((2, 20, 3, 0.8)))
    queries = [query(), query(80, 40, fg_size=(20, 10)), query(fg_size=(5, 15))]
    results = place(queries, source)
    assert len(source.calls) == 1
    backgrounds, foregrounds = source.calls[0]
    assert backgrounds.shape == (3, 3, 64, 64) and foregrounds.shape == (3, 4, 32, 32)
    assert backgrounds.dtype == foregrounds.dtype == np.float32
    assert [r.best.box for r in results if r.best] == [cell_box(1, 5, 5), cell_box(5, 16, 16, 80, 40, aspect=2.0),
                                                       cell_box(2, 20, 3, aspect=1 / 3)]


def test_the_foreground_aspect_comes_from_its_mask_box() -> None:
    mask = np.zeros((40, 40), bool)
    mask[5:15, 10:30] = True  # 20 wide, 10 high
    (result,) = place([query(fg_size=(40, 40), foreground_mask=mask)], FixedHeatmaps(peaks((4, 16, 16, 0.9))))
    assert result.best is not None and result.best.box == cell_box(4, 16, 16, aspect=2.0)
    assert result.best.box[2] == 2 * result.best.box[3]


def test_nothing_passes_when_every_box_overlaps_too_much() -> None:
    (result,) = place([query(occupied=((0, 0, 64, 64),), max_overlap=0.0, num_candidates=5)],
                      FixedHeatmaps(peaks((3, 16, 16, 0.9))))
    assert result.best is None and result.candidates == ()
    (touching,) = place([query(occupied=((0, 0, 64, 64),), max_overlap=1.0)], FixedHeatmaps(peaks((3, 16, 16, 0.9))))
    assert touching.best is not None


EMPTY = np.zeros((10, 10), bool)


@pytest.mark.parametrize(("fields", "fragment"), [
    (dict(foreground_mask=np.ones((10, 12), bool)), "foreground mask is 12x10 bool; it must be a boolean mask the "
                                                    "size of the foreground (10x10)"),
    (dict(foreground_mask=np.ones((10, 10), np.uint8)), "must be a boolean mask"),
    (dict(foreground_mask=EMPTY), "foreground mask is empty"),
    (dict(background=np.zeros((64, 64), np.uint8)), "background must be a non-empty (H, W, 3) uint8 image"),
    (dict(foreground=np.zeros((10, 10, 3), np.float32)), "foreground must be a non-empty (h, w, 3) uint8 image"),
    (dict(occupied=((60, 0, 10, 10),)), "occupied box 0 (x=60, y=0, width=10, height=10) does not lie inside the "
                                        "64x64 background"),
    (dict(occupied=((0, 0, 5, 5), (-1, 0, 5, 5))), "occupied box 1 (x=-1"),
    (dict(occupied=((0, 0, 0, 5),)), "occupied box 0 (x=0, y=0, width=0"),
    (dict(max_overlap=-0.1), "max_overlap must be in [0, 1], got -0.1"),
    (dict(max_overlap=1.5), "max_overlap must be in [0, 1], got 1.5"),
    (dict(max_overlap=float("nan")), "max_overlap must be in [0, 1], got nan"),
    (dict(num_candidates=101), "num_candidates must be in 0..100, got 101"),
    (dict(seed=-1), "seed must be in 0..2**64-1"),
])
def test_bad_queries_are_refused_before_the_source_is_called(fields: dict, fragment: str) -> None:
    source = FixedHeatmaps(peaks())
    with pytest.raises(InvalidInput) as info:
        place([query(**fields)], source)
    assert fragment in str(info.value)
    assert source.calls == []


def test_a_bad_query_in_a_batch_is_named_by_its_index() -> None:
    source = FixedHeatmaps(peaks())
    with pytest.raises(InvalidInput, match=r"^request 1: foreground mask is empty"):
        place([query(), query(foreground_mask=EMPTY)], source)
    assert source.calls == []


@pytest.mark.parametrize("count", [0, 65])
def test_batches_hold_one_to_sixty_four_queries(count: int) -> None:
    source = FixedHeatmaps(peaks())
    with pytest.raises(InvalidInput, match=f"a placement batch holds 1..64 queries, got {count}"):
        place([query()] * count, source)
    assert source.calls == []


@pytest.mark.parametrize(("answer", "fragment"), [
    (lambda b, f: np.zeros((len(b), NUM_SCALES, 16, 16), np.float32), "returned shape (2, 8, 16, 16)"),
    (lambda b, f: np.zeros((1, *SHAPE), np.float32), "returned shape (1, 8, 32, 32), expected (2, 8, 32, 32)"),
    (lambda b, f: np.full((len(b), *SHAPE), np.nan, np.float32), "returned 16384 non-finite values"),
])
def test_a_broken_heatmap_source_is_a_server_fault_not_bad_input(answer, fragment: str) -> None:
    with pytest.raises(HeatmapError) as info:
        place([query(), query()], answer)
    assert fragment in str(info.value)
    assert isinstance(info.value, RuntimeError) and not isinstance(info.value, InvalidInput)


def test_uniform_heatmaps_spread_boxes_over_the_valid_positions_and_keep_the_overlap_limit() -> None:
    """The no-FOPA ablation: any valid box may be drawn, one per seed, never over the limit."""
    occupied = ((0, 0, 32, 32),)
    boxes = [place([query(seed=seed, occupied=occupied, max_overlap=0.0)], UniformHeatmaps())[0].best.box
             for seed in range(200)]
    assert len(set(boxes)) > 50
    assert all(overlap((x, y, w, h), occupied[0]) == 0.0 and x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
               for x, y, w, h in boxes)
    centres = np.array([(x + w / 2, y + h / 2) for x, y, w, h in boxes])
    assert centres[:, 0].min() < 24 and centres[:, 0].max() > 40  # spread across, not one FOPA-like peak
