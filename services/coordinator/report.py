"""A run as one self-contained HTML page: what each round of Algorithm 1 did, and what it kept.

The page holds, from the saved run state and the store's pixels alone:

1. the run (id, state and phase, settings, D_0);
2. a table with one row per round: slots requested, scored and dead-lettered, samples
   retained, the α cut on S(x), the segmenter f_t and its validation mIoU;
3. the validation mIoU per round as a line plot;
4. per round, a histogram of S(x) (10 bins over [0, 1]) with the cut drawn on it;
5. per round, up to `samples_per_round` scored samples (retained first, best first; then
   rejected, best first), each as its image, its label map in the Pascal-VOC colours with
   a legend of the classes present, the label map blended over the image and, for a
   single-object sample, its attention (soft) map as a heat map.

Nothing is fetched when the page is opened: pictures are PNG data URIs, charts are inline
SVG drawn here, the style sheet is inline. Small images are scaled up by whole factors
(nearest neighbour) so a 32 px sample is visible; large ones are scaled down. Every string
from the run, the store or the configuration is escaped. A picture that cannot be read
becomes an "unavailable: <reason>" cell; the report is still written.

The file is written to a temporary sibling and renamed over `out_path`, so a reader never
sees half a report.
"""

from __future__ import annotations

import base64
import html
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from freemask.coordinator.job import StageTotals
from freemask.coordinator.selection import DESCRIPTIONS
from freemask.coordinator.rounds import BOOTSTRAP, GENERATE, TRAIN, RoundRecord, RunRecord, Slot
from freemask.coordinator.service import RunRepository
from freemask.shared.config import FreemaskConfig, LimitsConfig
from freemask.shared.errors import InvalidInput, NotFound, Unavailable
from freemask.shared.image_refs import ImageReader
from freemask.shared.images import decode_soft_map, encode_png, voc_colour_map
from freemask.shared.keys import segmenter_version, validate_key
from freemask.shared.store import ObjectNotFound, ObjectStore
from freemask.world.names import IGNORE_ID

HISTOGRAM_BINS = 10
DISPLAY_MIN_PX = 128  # smaller pictures are scaled up by a whole factor to at least this
DISPLAY_MAX_PX = 256  # larger pictures are scaled down to this (keeps the page small)
BLEND_ALPHA = 0.5
_READ_ERRORS = (ValueError, LookupError, OSError, Unavailable)  # InvalidInput, NotFound, KeyError, store outages

# Anchors of an "inferno"-like ramp for heat maps: value in [0, 1] -> RGB.
_HEAT_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_HEAT_RGB = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float64)

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 code, td code { font-size: 0.95em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; }
td.text { text-align: left; }
dl.settings { display: grid; grid-template-columns: max-content auto; gap: 0.15em 1em; }
dl.settings dt { font-weight: 600; }
dl.settings dd { margin: 0; }
.empty { color: #777; font-style: italic; }
.error { color: #a00; }
.sample { border: 1px solid #ccc; border-radius: 4px; margin: 0.6em 0; padding: 0.5em; }
.sample.kept { border-left: 6px solid #2a8f3a; }
.sample.rejected { border-left: 6px solid #b33; }
.sample .title { margin: 0 0 0.4em; }
.cells { display: flex; flex-wrap: wrap; gap: 0.6em; align-items: flex-start; }
figure { margin: 0; }
figure img { display: block; image-rendering: pixelated; border: 1px solid #999; }
figcaption { font-size: 0.8em; color: #555; text-align: center; }
.unavailable { width: 128px; min-height: 64px; border: 1px dashed #b33; color: #a00; font-size: 0.8em;
  padding: 0.3em; box-sizing: border-box; overflow-wrap: anywhere; }
ul.legend { list-style: none; padding: 0; margin: 0; font-size: 0.8em; }
ul.legend li { margin: 0.1em 0; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #555; vertical-align: middle;
  margin-right: 0.3em; }
.badge { font-weight: 600; }
.kept .badge { color: #2a8f3a; }
.rejected .badge { color: #b33; }
svg { background: #fff; border: 1px solid #ddd; margin: 0.3em 0; }
svg text { font-family: system-ui, sans-serif; font-size: 11px; fill: #333; }
"""


def write_report(store: ObjectStore, config: FreemaskConfig, run_id: str, out_path: Path,
                 samples_per_round: int = 8, stages: Mapping[str, StageTotals] | None = None) -> Path:
    """Write `run_id`'s report to `out_path` (one HTML file) and return its path; NotFound if no such run."""
    if samples_per_round < 0:
        raise InvalidInput(f"samples_per_round must be at least 0; got {samples_per_round}")
    record = RunRepository(store).load(run_id)
    if record is None:
        raise NotFound(f"no run {run_id!r}: coordinator/runs/{run_id}/state.json does not exist")
    page = render_report(record, store, config, samples_per_round, stages)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(out_path, page.encode("utf-8"))
    return out_path


def render_report(record: RunRecord, store: ObjectStore, config: FreemaskConfig, samples_per_round: int = 8,
                  stages: Mapping[str, StageTotals] | None = None) -> str:
    """The report's HTML text for a loaded run; `stages` (from the services' metrics) adds where time went."""
    reader = ImageReader(store, config.limits)
    classes = tuple(config.world.classes)
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        f"<title>Free-Mask run {_e(record.run_id)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n",
        f"<h1>Free-Mask run <code>{_e(record.run_id)}</code></h1>\n",
        _header(record),
        _rounds_table(record),
        _miou_section(record),
        _stages_table(stages) if stages else "",
    ]
    for round_record in record.rounds:
        parts.append(_round_section(record.run_id, round_record, store, reader, config.limits, classes,
                                    samples_per_round))
    parts.append("</body>\n</html>\n")
    return "".join(parts)


def _stages_table(stages: Mapping[str, StageTotals]) -> str:
    rows = "".join(f"<tr><td>{_e(name)}</td><td>{t.messages}</td><td>{_number(t.seconds, 1)}</td>"
                   f"<td>{_number(t.seconds / t.messages if t.messages else None, 3)}</td></tr>\n"
                   for name, t in stages.items())
    return ("<h2>Where the time went</h2>\n<p>Messages each stage handled and the seconds it spent on them, "
            "from the services' Prometheus metrics at the end of the run.</p>\n<table class=\"stages\">"
            "<tr><th>stage</th><th>messages</th><th>seconds</th><th>seconds per message</th></tr>\n"
            f"{rows}</table>\n")


# --- text ------------------------------------------------------------------------------

def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _state(phase: str) -> str:
    return "running" if phase in (BOOTSTRAP, TRAIN, GENERATE) else phase


def _header(record: RunRecord) -> str:
    settings = record.settings
    generated = sum(1 for slot in record.bootstrap if slot.single is not None)
    dead = sum(1 for slot in record.bootstrap if slot.dead_letter is not None)
    rows = [
        ("state", f"{_state(record.phase)} (phase {record.phase}, round {record.round})"),
        ("seed", record.seed),
        ("rounds (T + 1)", settings.rounds),
        ("α (share of D′_t kept)", settings.alpha),
        ("selection", DESCRIPTIONS[settings.selection]),
        ("|D_0| requested", settings.initial_samples),
        ("|D′_t| per round", settings.samples_per_round),
        ("composed fraction", settings.composed_fraction),
        ("objects added per composed scene", settings.objects_to_add),
        ("image size", f"{settings.image_size} × {settings.image_size} px"),
        ("training epochs", "service default" if settings.train_epochs is None else settings.train_epochs),
        ("classes", ", ".join(settings.classes)),
        ("D_0", f"{len(record.bootstrap)} requested, {generated} generated, {dead} dead-lettered"),
        ("accepted samples", len(record.accepted)),
    ]
    if record.error:
        rows.append(("error", record.error))
    if record.stop_requested:
        rows.append(("stop requested", record.stop_requested))
    items = "".join(f"<dt>{_e(name)}</dt><dd>{_e(value)}</dd>\n" for name, value in rows)
    return f"<section id=\"run\">\n<h2>Run</h2>\n<dl class=\"settings\">\n{items}</dl>\n</section>\n"


def _round_counts(round_record: RoundRecord) -> tuple[int, int, int, int]:
    """(requested, scored, dead-lettered, retained) of a round."""
    slots = round_record.slots
    scored = sum(1 for s in slots if s.score is not None)
    return len(slots), scored, sum(1 for s in slots if s.dead_letter is not None), len(round_record.retained)


def _cut(round_record: RoundRecord, each_group: bool = False) -> str:
    """The round's score cut; under a selection by group, the range of the group cuts, or each of them."""
    cuts = round_record.class_thresholds
    if not cuts:
        return _number(round_record.threshold)
    if each_group:
        return "by group: " + ", ".join(f"{group} {_number(cut)}" for group, cut in cuts.items())
    return f"{_number(min(cuts.values()))}–{_number(max(cuts.values()))} by group"


def _rounds_table(record: RunRecord) -> str:
    head = ("round", "requested", "scored", "dead-lettered", "retained", "score cut", "segmenter", "validation mIoU")
    lines = ["<section id=\"rounds\">\n<h2>Rounds</h2>\n"]
    if not record.rounds:
        lines.append("<p class=\"empty\">No round has started yet.</p>\n</section>\n")
        return "".join(lines)
    lines.append("<table class=\"rounds\">\n<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head)
                 + "</tr></thead>\n<tbody>\n")
    for round_record in record.rounds:
        requested, scored, dead, kept = _round_counts(round_record)
        cells = [round_record.round, requested, scored, dead, kept, _cut(round_record)]
        segmenter = segmenter_version(record.run_id, round_record.round)
        lines.append(f"<tr class=\"round-row\" data-round=\"{_e(round_record.round)}\">"
                     + "".join(f"<td>{_e(c)}</td>" for c in cells)
                     + f"<td class=\"text\"><code>{_e(segmenter)}</code></td>"
                     + f"<td>{_e(_number(round_record.validation_mean_iou))}</td></tr>\n")
    lines.append("</tbody>\n</table>\n</section>\n")
    return "".join(lines)


# --- charts ----------------------------------------------------------------------------

def _svg_open(width: int, height: int, label: str, css_class: str) -> str:
    return (f"<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"{css_class}\" width=\"{width}\" height=\"{height}\" "
            f"viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"{_e(label)}\">\n<title>{_e(label)}</title>\n")


def _text(x: float, y: float, text: str, anchor: str = "middle", extra: str = "") -> str:
    return f"<text x=\"{x:.1f}\" y=\"{y:.1f}\" text-anchor=\"{anchor}\"{extra}>{_e(text)}</text>\n"


def _line(x1: float, y1: float, x2: float, y2: float, style: str = "stroke:#333;stroke-width:1") -> str:
    return f"<line x1=\"{x1:.1f}\" y1=\"{y1:.1f}\" x2=\"{x2:.1f}\" y2=\"{y2:.1f}\" style=\"{style}\"></line>\n"


def _miou_section(record: RunRecord) -> str:
    points = [(r.round, r.validation_mean_iou) for r in record.rounds if r.validation_mean_iou is not None]
    head = "<section id=\"miou\">\n<h2>Validation mIoU per round</h2>\n"
    if not points:
        return head + ("<p class=\"empty\">No round has a validation mIoU (no validation set configured, or no "
                       "segmenter trained yet).</p>\n</section>\n")
    last_round = max(record.settings.rounds - 1, max(r.round for r in record.rounds))
    return head + miou_svg(points, last_round) + "</section>\n"


def miou_svg(points: Sequence[tuple[int, float]], last_round: int) -> str:
    """A line plot of (round, mIoU) points: x = round 0..last_round, y = mIoU in [0, 1]."""
    width, height, left, right, top, bottom = 460, 260, 52, 20, 16, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    span = max(last_round, 1)

    def x_of(round_index: float) -> float:
        return left + plot_w * (round_index / span if last_round > 0 else 0.5)

    def y_of(value: float) -> float:
        return top + plot_h * (1.0 - min(max(value, 0.0), 1.0))

    out = [_svg_open(width, height, "validation mIoU per round", "miou-plot")]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y_of(tick)
        out.append(_line(left, y, left + plot_w, y, "stroke:#e4e4e4;stroke-width:1"))
        out.append(_text(left - 6, y + 4, f"{tick:.2f}", "end"))
    for round_index in range(last_round + 1):
        x = x_of(round_index)
        out.append(_line(x, top + plot_h, x, top + plot_h + 4))
        out.append(_text(x, top + plot_h + 16, str(round_index)))
    out.append(_line(left, top, left, top + plot_h))
    out.append(_line(left, top + plot_h, left + plot_w, top + plot_h))
    out.append(_text(left + plot_w / 2, height - 6, "round"))
    out.append(_text(14, top + plot_h / 2, "mIoU", "middle", f" transform=\"rotate(-90 14 {top + plot_h / 2:.1f})\""))
    ordered = sorted(points)
    if len(ordered) > 1:
        path = " ".join(f"{x_of(r):.1f},{y_of(v):.1f}" for r, v in ordered)
        out.append(f"<polyline points=\"{path}\" style=\"fill:none;stroke:#1f63b5;stroke-width:2\"></polyline>\n")
    for round_index, value in ordered:
        x, y = x_of(round_index), y_of(value)
        out.append(f"<circle cx=\"{x:.1f}\" cy=\"{y:.1f}\" r=\"4\" style=\"fill:#1f63b5\">"
                   f"<title>{_e(f'round {round_index}: mIoU {value:.4f}')}</title></circle>\n")
        out.append(_text(x, y - 8, f"{value:.3f}"))
    out.append("</svg>\n")
    return "".join(out)


def histogram_counts(scores: Sequence[float], bins: int = HISTOGRAM_BINS) -> list[int]:
    """Counts of `scores` in `bins` equal bins over [0, 1]; 1.0 falls in the last, out-of-range scores are clipped."""
    counts = [0] * bins
    for score in scores:
        counts[min(max(int(math.floor(min(max(score, 0.0), 1.0) * bins)), 0), bins - 1)] += 1
    return counts


def histogram_svg(scores: Sequence[float], cut: float | None, label: str) -> str:
    """A histogram of S(x) over [0, 1] with the cut as a vertical line."""
    width, height, left, right, top, bottom = 420, 220, 44, 16, 22, 42
    plot_w, plot_h = width - left - right, height - top - bottom
    counts = histogram_counts(scores)
    top_count = max(max(counts), 1)
    step = max(1, math.ceil(top_count / 5))
    y_max = step * math.ceil(top_count / step)

    def x_of(value: float) -> float:
        return left + plot_w * min(max(value, 0.0), 1.0)

    def y_of(count: float) -> float:
        return top + plot_h * (1.0 - count / y_max)

    out = [_svg_open(width, height, label, "histogram")]
    for tick in range(0, y_max + 1, step):
        y = y_of(tick)
        out.append(_line(left, y, left + plot_w, y, "stroke:#e4e4e4;stroke-width:1"))
        out.append(_text(left - 6, y + 4, str(tick), "end"))
    bin_w = plot_w / HISTOGRAM_BINS
    for index, count in enumerate(counts):
        if count == 0:
            continue
        low = index / HISTOGRAM_BINS
        x, y = left + index * bin_w, y_of(count)
        out.append(f"<rect x=\"{x + 1:.1f}\" y=\"{y:.1f}\" width=\"{bin_w - 2:.1f}\" height=\"{top + plot_h - y:.1f}\" "
                   f"style=\"fill:#7a9cc6\"><title>{_e(f'S(x) in [{low:.1f}, {low + 0.1:.1f}): {count}')}</title>"
                   "</rect>\n")
    for tick in range(0, HISTOGRAM_BINS + 1, 2):
        x = x_of(tick / HISTOGRAM_BINS)
        out.append(_line(x, top + plot_h, x, top + plot_h + 4))
        out.append(_text(x, top + plot_h + 16, f"{tick / HISTOGRAM_BINS:.1f}"))
    out.append(_line(left, top, left, top + plot_h))
    out.append(_line(left, top + plot_h, left + plot_w, top + plot_h))
    out.append(_text(left + plot_w / 2, height - 6, "S(x)"))
    out.append(_text(12, top + plot_h / 2, "samples", "middle",
                     f" transform=\"rotate(-90 12 {top + plot_h / 2:.1f})\""))
    if cut is not None:
        x = x_of(cut)
        out.append(f"<line class=\"cut\" x1=\"{x:.1f}\" y1=\"{top - 4:.1f}\" x2=\"{x:.1f}\" y2=\"{top + plot_h:.1f}\" "
                   "style=\"stroke:#c0262d;stroke-width:2;stroke-dasharray:5,3\"></line>\n")
        out.append(_text(x, top - 8, f"cut {cut:.3f}", "end" if cut > 0.8 else "start" if cut < 0.2 else "middle",
                         " style=\"fill:#c0262d\""))
    out.append("</svg>\n")
    return "".join(out)


# --- pictures --------------------------------------------------------------------------

def _display_factor(height: int, width: int) -> tuple[int, float]:
    """(whole up-scale factor, down-scale ratio) that brings a picture to a visible, modest size."""
    side = max(height, width, 1)
    if side < DISPLAY_MIN_PX:
        return math.ceil(DISPLAY_MIN_PX / side), 1.0
    if side > DISPLAY_MAX_PX:
        return 1, DISPLAY_MAX_PX / side
    return 1, 1.0


def display_pixels(pixels: np.ndarray, smooth: bool = False) -> np.ndarray:
    """`pixels` (uint8 H×W or H×W×3) at display size: small ones repeated (nearest neighbour), large ones shrunk
    (area-averaged when `smooth`, for photographs; nearest otherwise, for label colours)."""
    factor, ratio = _display_factor(*pixels.shape[:2])
    if factor > 1:
        return np.repeat(np.repeat(pixels, factor, axis=0), factor, axis=1)
    if ratio < 1.0:
        height, width = pixels.shape[:2]
        size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
        return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX if smooth
                                                         else Image.Resampling.NEAREST))
    return pixels


def png_data_uri(pixels: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_png(np.ascontiguousarray(pixels))).decode("ascii")


PALETTE = voc_colour_map()


def colour_labels(labels: np.ndarray) -> np.ndarray:
    return PALETTE[labels]


def blend_labels(image: np.ndarray, labels: np.ndarray, alpha: float = BLEND_ALPHA) -> np.ndarray:
    """The label colours over the image where a pixel is not background; background pixels are the image's."""
    coloured = colour_labels(labels).astype(np.float64)
    mixed = image.astype(np.float64)
    foreground = labels != 0
    mixed[foreground] = (1.0 - alpha) * mixed[foreground] + alpha * coloured[foreground]
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def heat_map(values: np.ndarray) -> np.ndarray:
    """A soft map as RGB: values in [0, 1] (a map peaking above 1 is divided by its peak) on an inferno-like ramp."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    peak = float(values.max()) if values.size else 0.0
    if peak > 1.0:
        values = values / peak
    values = np.clip(values, 0.0, 1.0)
    rgb = np.stack([np.interp(values, _HEAT_STOPS, _HEAT_RGB[:, c]) for c in range(3)], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def class_name(class_id: int, classes: tuple[str, ...]) -> str:
    if class_id == IGNORE_ID:
        return "ignore"
    if 1 <= class_id <= len(classes):
        return classes[class_id - 1]
    return f"class {class_id}"


def read_softmap(store: ObjectStore, limits: LimitsConfig, key: str) -> np.ndarray:
    """A stored soft attention map (.npz, array `softmap`) as float H×W; the archive's header is
    checked before anything is inflated (`images.decode_soft_map`)."""
    validate_key(key, "soft map key")
    try:
        data = store.get_bytes(key, max_bytes=limits.max_image_bytes)
    except ObjectNotFound:
        raise NotFound(f"soft map: no object at {key!r}") from None
    return decode_soft_map(data, limits, f"soft map {key!r}").astype(np.float64)


# --- samples ---------------------------------------------------------------------------

def shown_slots(round_record: RoundRecord, limit: int) -> list[tuple[Slot, bool]]:
    """Up to `limit` scored slots as (slot, retained): the retained ones in their cut's order, then the rejected
    ones by falling score."""
    scored = {slot.final_id: slot for slot in round_record.slots if slot.score is not None}
    kept_ids = [i for i in round_record.retained if i in scored]
    kept = set(kept_ids)
    rejected = sorted((s for i, s in scored.items() if i not in kept), key=lambda s: (-(s.score or 0.0), s.final_id))
    chosen = [(scored[i], True) for i in kept_ids] + [(s, False) for s in rejected]
    return chosen[:max(limit, 0)]


def _reason(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "…"


def _img_cell(pixels: np.ndarray, caption: str, alt: str, smooth: bool = False, after: str = "") -> str:
    """A picture with its caption (and `after`, HTML already escaped, below it)."""
    shown = display_pixels(pixels, smooth)
    return (f"<figure><img src=\"{png_data_uri(shown)}\" width=\"{shown.shape[1]}\" height=\"{shown.shape[0]}\" "
            f"alt=\"{_e(alt)}\"><figcaption>{_e(caption)}</figcaption>{after}</figure>\n")


def _unavailable_cell(caption: str, reason: str) -> str:
    return (f"<figure><div class=\"unavailable\">unavailable: {_e(reason)}</div>"
            f"<figcaption>{_e(caption)}</figcaption></figure>\n")


def _legend(labels: np.ndarray, classes: tuple[str, ...]) -> str:
    present = [int(i) for i in np.unique(labels) if i != 0]
    if not present:
        return "<ul class=\"legend\"><li class=\"empty\">background only</li></ul>\n"
    items = "".join(
        f"<li><span class=\"swatch\" style=\"background:#{PALETTE[i, 0]:02x}{PALETTE[i, 1]:02x}{PALETTE[i, 2]:02x}\">"
        f"</span>{_e(class_name(i, classes))} ({i})</li>" for i in present)
    return f"<ul class=\"legend\">{items}</ul>\n"


def _sample_block(slot: Slot, kept: bool, store: ObjectStore, reader: ImageReader, limits: LimitsConfig,
                  classes: tuple[str, ...]) -> str:
    sample = slot.sample if isinstance(slot.sample, dict) else {}
    keys = sample.get("keys") if isinstance(sample.get("keys"), dict) else {}
    sample_id = sample.get("sample_id") or slot.final_id
    status = "kept" if kept else "rejected"
    title = (f"<p class=\"title\"><span class=\"badge\">{status}</span> <code>{_e(sample_id)}</code> · "
             f"{_e(slot.kind)} · S(x) = {_e(_number(slot.score))}</p>\n")

    image = labels = None
    cells = []
    try:
        image = reader.stored_image(_key(keys, "image_key", "image"), "image")
        cells.append(_img_cell(image, "image", f"image of {sample_id}", smooth=True))
    except _READ_ERRORS as err:
        cells.append(_unavailable_cell("image", _reason(err)))
    try:
        labels = reader.stored_labels(_key(keys, "label_key", "label map"), "label map")
        cells.append(_img_cell(colour_labels(labels), "label map", f"label map of {sample_id}",
                               after=_legend(labels, classes)))
    except _READ_ERRORS as err:
        cells.append(_unavailable_cell("label map", _reason(err)))
    if image is not None and labels is not None:
        if image.shape[:2] == labels.shape:
            cells.append(_img_cell(blend_labels(image, labels), "label over image", f"label over image of {sample_id}",
                                   smooth=True))
        else:
            cells.append(_unavailable_cell("label over image", f"image {image.shape[1]}×{image.shape[0]} and label "
                                           f"map {labels.shape[1]}×{labels.shape[0]} differ in size"))
    else:
        cells.append(_unavailable_cell("label over image", "needs both the image and the label map"))
    softmap_key = keys.get("softmap_key")
    if slot.kind == "single" and softmap_key:
        try:
            cells.append(_img_cell(heat_map(read_softmap(store, limits, str(softmap_key))), "attention map",
                                   f"attention map of {sample_id}", smooth=True))
        except _READ_ERRORS as err:
            cells.append(_unavailable_cell("attention map", _reason(err)))
    return (f"<div class=\"sample {status}\" data-sample-id=\"{_e(sample_id)}\">\n{title}"
            f"<div class=\"cells\">\n{''.join(cells)}</div>\n</div>\n")


def _key(keys: dict, field: str, what: str) -> str:
    key = keys.get(field)
    if not key:
        raise InvalidInput(f"the sample names no {what}")
    return str(key)


def _round_section(run_id: str, round_record: RoundRecord, store: ObjectStore, reader: ImageReader,
                   limits: LimitsConfig, classes: tuple[str, ...], samples_per_round: int) -> str:
    index = round_record.round
    requested, scored, dead, kept = _round_counts(round_record)
    out = [f"<section id=\"round-{_e(index)}\" class=\"round\">\n<h2>Round {_e(index)}</h2>\n",
           f"<p>segmenter <code>{_e(segmenter_version(run_id, index))}</code>; {requested} requested, {scored} scored, "
           f"{dead} dead-lettered, {kept} retained; cut {_e(_cut(round_record, each_group=True))}.</p>\n",
           "<h3>S(x)</h3>\n"]
    scores = [slot.score for slot in round_record.slots if slot.score is not None]
    if scores:
        out.append(histogram_svg(scores, round_record.threshold, f"round {index}: S(x) of {len(scores)} samples"))
        if round_record.threshold is None:
            out.append("<p class=\"empty\">No cut yet: the round's slots have not all ended.</p>\n")
    else:
        out.append("<p class=\"empty\">No sample of this round has been scored.</p>\n")
    dead_slots = [slot for slot in round_record.slots if slot.dead_letter is not None]
    if dead_slots:
        out.append("<details><summary>dead-lettered slots</summary>\n<ul>\n" + "".join(
            f"<li><code>{_e(slot.final_id)}</code> ({_e(slot.kind)}): {_e(slot.dead_letter)}</li>\n"
            for slot in dead_slots) + "</ul>\n</details>\n")
    chosen = shown_slots(round_record, samples_per_round)
    if chosen:
        out.append(f"<h3>Samples ({len(chosen)} of {scored} scored)</h3>\n")
        out.extend(_sample_block(slot, kept_, store, reader, limits, classes) for slot, kept_ in chosen)
    out.append("</section>\n")
    return "".join(out)


# --- writing ---------------------------------------------------------------------------

def _write_atomically(path: Path, data: bytes) -> None:
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o644)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
