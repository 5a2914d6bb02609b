"""Textured backgrounds, each laid out in fixed horizontal bands.

The bands (sky, water, road, floor, track, ...) are fixed fractions of the
image height per background, not drawn at random: the placement rules refer to
them by name, and `is_plausible(cls, background, box, size)` must be decidable
without the scene's seed. What varies per seed is everything else: colours,
clouds, waves, lane markings, floor boards, windows.

Textures are value noise: random values on a coarse grid, interpolated with
two small matrices (rows @ grid @ cols.T), so any resolution costs two matrix
products.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np

from freemask.world.names import DRAWABLE_BACKGROUNDS, check_background, check_image_size

Rng = np.random.Generator
Band = tuple[float, float]  # (top, bottom) as fractions of the image height

BANDS: Mapping[str, Mapping[str, Band]] = MappingProxyType({
    "sky": MappingProxyType({"sky": (0.0, 1.0)}),
    "sea": MappingProxyType({"sky": (0.0, 0.4), "water": (0.4, 1.0)}),
    "road": MappingProxyType({"sky": (0.0, 0.35), "verge": (0.35, 0.45), "road": (0.45, 1.0)}),
    "grass": MappingProxyType({"sky": (0.0, 0.3), "grass": (0.3, 1.0)}),
    "field": MappingProxyType({"sky": (0.0, 0.3), "field": (0.3, 1.0)}),
    "room": MappingProxyType({"wall": (0.0, 0.55), "floor": (0.55, 1.0)}),
    # "track" is where train wheels stand: the rail's top edge is at 0.75.
    "rail": MappingProxyType({"sky": (0.0, 0.35), "ground": (0.35, 1.0), "track": (0.72, 0.78)}),
})
RAIL_TOP = 0.75


def _interp_matrix(n: int, cells: int) -> np.ndarray:
    """(n, cells + 1) weights that smoothly interpolate a 1-D grid of cells + 1 values at n pixels."""
    t = (np.arange(n, dtype=np.float32) + 0.5) / n * cells
    i0 = np.minimum(t.astype(np.int64), cells - 1)
    f = t - i0
    f = f * f * (3.0 - 2.0 * f)
    m = np.zeros((n, cells + 1), dtype=np.float32)
    m[np.arange(n), i0] = 1.0 - f
    m[np.arange(n), i0 + 1] = f
    return m


def value_noise(rng: Rng, height: int, width: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Smooth noise in [0, 1]; more cells along an axis means finer detail along it."""
    grid = rng.random((cells_y + 1, cells_x + 1), dtype=np.float32)
    return _interp_matrix(height, cells_y) @ grid @ _interp_matrix(width, cells_x).T


def fractal_noise(rng: Rng, height: int, width: int, cells: int, octaves: int = 3) -> np.ndarray:
    """Sum of octaves of value noise, normalised to about [0, 1]."""
    total = np.zeros((height, width), dtype=np.float32)
    weight, norm = 1.0, 0.0
    for octave in range(octaves):
        c = max(1, cells * 2**octave)
        total += weight * value_noise(rng, height, width, c, c)
        norm += weight
        weight *= 0.5
    return total / norm


def _rows(size: int, band: Band) -> slice:
    return slice(int(round(band[0] * size)), int(round(band[1] * size)))


def _vertical_gradient(size: int, rows: int, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    t = np.linspace(0.0, 1.0, rows, dtype=np.float32)[:, None, None]
    return np.broadcast_to(top * (1 - t) + bottom * t, (rows, size, 3)).copy()


def _colour(rng: Rng, base: tuple[float, float, float], spread: float = 0.05) -> np.ndarray:
    """A shade of `base`: brightness varies freely, hue only a little (asphalt stays grey)."""
    shift = rng.normal(0, spread * 0.4, 3) + rng.normal(0, spread)
    return np.clip(np.asarray(base, np.float32) + shift.astype(np.float32), 0, 1)


def _paint_sky(rng: Rng, img: np.ndarray, rows: slice) -> None:
    """Blue (or overcast, or evening) gradient with soft clouds."""
    size = img.shape[1]
    n = rows.stop - rows.start
    mood = rng.random()
    if mood < 0.65:
        top, bottom = _colour(rng, (0.25, 0.48, 0.85)), _colour(rng, (0.68, 0.82, 0.96))
    elif mood < 0.85:
        top, bottom = _colour(rng, (0.6, 0.64, 0.7)), _colour(rng, (0.82, 0.84, 0.86))
    else:
        top, bottom = _colour(rng, (0.3, 0.35, 0.65)), _colour(rng, (0.98, 0.7, 0.45))
    sky = _vertical_gradient(size, n, top, bottom)
    cloudiness = rng.uniform(0.0, 0.9)
    clouds = fractal_noise(rng, n, size, max(2, size // 24))
    cover = np.clip((clouds - (0.72 - 0.3 * cloudiness)) * 5.0, 0.0, 0.95)[..., None]
    shade = (0.88 + 0.12 * value_noise(rng, n, size, 3, 3))[..., None]
    img[rows] = sky * (1 - cover) + np.float32(0.97) * shade * cover


def _paint_sea(rng: Rng, img: np.ndarray, rows: slice) -> None:
    size = img.shape[1]
    n = rows.stop - rows.start
    far, near = _colour(rng, (0.35, 0.55, 0.72)), _colour(rng, (0.05, 0.22, 0.42), 0.04)
    water = _vertical_gradient(size, n, far, near)
    # Waves: noise stretched along x, finer towards the horizon.
    streaks = value_noise(rng, n, size, max(4, n // 2), max(2, size // 16))
    depth = np.linspace(0.5, 1.0, n, dtype=np.float32)[:, None]
    crest = np.clip((streaks - 0.62) * 5.0, 0, 1) * depth
    trough = np.clip((0.35 - streaks) * 3.0, 0, 1) * depth
    img[rows] = water * (1 - 0.25 * trough[..., None]) + 0.5 * crest[..., None] * (0.95 - water)


def _paint_grass(rng: Rng, img: np.ndarray, rows: slice, base: tuple[float, float, float] = (0.3, 0.55, 0.2)) -> None:
    size = img.shape[1]
    n = rows.stop - rows.start
    far = _colour(rng, tuple(c * 1.15 for c in base), 0.04)  # type: ignore[arg-type]
    near = _colour(rng, tuple(c * 0.75 for c in base), 0.04)  # type: ignore[arg-type]
    grass = _vertical_gradient(size, n, far, near)
    blades = value_noise(rng, n, size, max(2, n // 6), max(4, size // 2))  # vertical streaks
    patches = value_noise(rng, n, size, 3, 4)
    tone = (0.78 + 0.3 * blades + 0.18 * (patches - 0.5))[..., None]
    img[rows] = np.clip(grass * tone, 0, 1)
    if rng.random() < 0.4:  # a few flowers
        count = int(rng.integers(3, 3 + size // 8))
        ys = rng.integers(rows.start, rows.stop, count)
        xs = rng.integers(0, size, count)
        img[ys, xs] = _colour(rng, (0.95, 0.9, 0.3), 0.05) if rng.random() < 0.5 else (0.95, 0.95, 0.95)


def _paint_treeline(rng: Rng, img: np.ndarray, horizon: int) -> None:
    """A dark irregular strip of trees or hills standing on the horizon."""
    size = img.shape[1]
    height = value_noise(rng, 1, size, 1, max(2, size // 10))[0] * 0.08 * size + 0.01 * size
    ys = np.arange(horizon, dtype=np.float32)[:, None]
    inside = ys >= horizon - height[None, :]
    colour = _colour(rng, (0.2, 0.33, 0.2) if rng.random() < 0.7 else (0.4, 0.45, 0.55), 0.04)
    img[:horizon][inside] = colour


def _sky(rng: Rng, img: np.ndarray) -> None:
    _paint_sky(rng, img, slice(0, img.shape[0]))
    if rng.random() < 0.25:  # the sun
        size = img.shape[0]
        cy, cx, r = rng.uniform(0.1, 0.5) * size, rng.uniform(0.1, 0.9) * size, size * 0.05
        yy, xx = np.ogrid[:size, :size]
        glow = np.clip(1.5 - np.hypot(yy - cy, xx - cx) / r, 0, 1)[..., None]
        img[:] = img * (1 - glow) + glow * np.float32([1.0, 0.97, 0.82])


def _sea(rng: Rng, img: np.ndarray) -> None:
    size = img.shape[0]
    _paint_sky(rng, img, _rows(size, BANDS["sea"]["sky"]))
    _paint_sea(rng, img, _rows(size, BANDS["sea"]["water"]))


def _road(rng: Rng, img: np.ndarray) -> None:
    size = img.shape[0]
    bands = BANDS["road"]
    _paint_sky(rng, img, _rows(size, bands["sky"]))
    horizon = _rows(size, bands["sky"]).stop
    if rng.random() < 0.6:  # city buildings, else trees
        x = 0
        while x < size:
            w = int(rng.integers(max(2, size // 10), max(3, size // 4)))
            h = int(rng.uniform(0.1, 0.3) * size)
            tone = _colour(rng, (0.55, 0.52, 0.5), 0.1)
            img[max(0, horizon - h):horizon, x:x + w] = tone
            for wy in range(max(0, horizon - h) + 2, horizon - 1, max(2, size // 16)):  # rows of windows
                img[wy, x + 1:x + w - 1:2] = tone * 0.6
            x += w
    else:
        _paint_treeline(rng, img, horizon)
    verge = _rows(size, bands["verge"])
    pavement = _colour(rng, (0.62, 0.6, 0.56), 0.04)
    img[verge] = pavement * (0.9 + 0.15 * value_noise(rng, verge.stop - verge.start, size, 2, size // 4))[..., None]
    road = _rows(size, bands["road"])
    n = road.stop - road.start
    asphalt = _colour(rng, (0.32, 0.32, 0.34), 0.04)
    grain = fractal_noise(rng, n, size, max(2, size // 8), 2)
    img[road] = asphalt * (0.85 + 0.3 * grain)[..., None]
    img[road.start:road.start + max(1, size // 64)] = 0.8  # kerb
    line = np.float32([0.95, 0.95, 0.92]) if rng.random() < 0.7 else np.float32([0.95, 0.8, 0.2])
    lane_y = road.start + int(n * rng.uniform(0.45, 0.6))
    thickness = max(1, size // 48)
    dash, phase = max(3, size // 8), int(rng.integers(0, size))
    xs = np.arange(size)
    dashes = ((xs + phase) % (2 * dash)) < dash
    img[lane_y:lane_y + thickness, dashes] = line
    img[size - 2 * thickness:size - thickness] = line  # edge line near the viewer


def _grass(rng: Rng, img: np.ndarray) -> None:
    size = img.shape[0]
    sky = _rows(size, BANDS["grass"]["sky"])
    _paint_sky(rng, img, sky)
    _paint_treeline(rng, img, sky.stop)
    _paint_grass(rng, img, _rows(size, BANDS["grass"]["grass"]))


def _field(rng: Rng, img: np.ndarray) -> None:
    size = img.shape[0]
    sky = _rows(size, BANDS["field"]["sky"])
    _paint_sky(rng, img, sky)
    if rng.random() < 0.5:
        _paint_treeline(rng, img, sky.stop)
    land = _rows(size, BANDS["field"]["field"])
    n = land.stop - land.start
    crop = (0.85, 0.72, 0.35) if rng.random() < 0.55 else (0.55, 0.65, 0.25) if rng.random() < 0.6 else (0.5, 0.36, 0.22)
    a, b = _colour(rng, crop, 0.04), _colour(rng, tuple(c * 0.78 for c in crop), 0.04)  # type: ignore[arg-type]
    # Furrows in perspective: stripes that widen towards the viewer.
    depth = np.linspace(0.06, 1.0, n, dtype=np.float32)[:, None]
    rows_count = rng.uniform(2.5, 5.0)
    wobble = value_noise(rng, n, size, 2, 3) * 0.6
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (rows_count * np.log(depth) + wobble))
    grain = value_noise(rng, n, size, max(2, n // 4), max(4, size // 3))
    img[land] = (a * stripes[..., None] + b * (1 - stripes[..., None])) * (0.88 + 0.22 * grain)[..., None]


def _room(rng: Rng, img: np.ndarray) -> None:
    size = img.shape[0]
    wall, floor = _rows(size, BANDS["room"]["wall"]), _rows(size, BANDS["room"]["floor"])
    paint = _colour(rng, ((0.9, 0.86, 0.75), (0.75, 0.85, 0.9), (0.8, 0.88, 0.75), (0.92, 0.8, 0.8),
                          (0.93, 0.93, 0.9))[int(rng.integers(5))], 0.03)
    n = wall.stop
    img[wall] = paint * (0.9 + 0.1 * value_noise(rng, n, size, 2, 2))[..., None]
    if rng.random() < 0.4:  # striped wallpaper
        period = max(3, size // int(rng.integers(6, 12)))
        img[wall, (np.arange(size) % period) < period // 2] *= 0.9
    feature = rng.random()
    if feature < 0.75:  # a window onto the sky, or a framed picture
        w, h = int(rng.uniform(0.2, 0.35) * size), int(rng.uniform(0.18, 0.28) * size)
        x, y = int(rng.uniform(0.05, 0.9) * size - w / 2), int(rng.uniform(0.08, 0.2) * size)
        x = min(max(x, 1), size - w - 1)
        frame = _colour(rng, (0.95, 0.95, 0.95) if feature < 0.5 else (0.45, 0.3, 0.15), 0.03)
        img[y:y + h, x:x + w] = frame
        pad = max(1, size // 40)
        inner = _colour(rng, (0.55, 0.75, 0.95) if feature < 0.5 else (0.3, 0.55, 0.4), 0.1)
        img[y + pad:y + h - pad, x + pad:x + w - pad] = inner
    img[floor.start - max(1, size // 40):floor.start] = _colour(rng, (0.35, 0.25, 0.18), 0.03)  # skirting board
    m = floor.stop - floor.start
    kind = rng.random()
    if kind < 0.55:  # wooden boards
        wood = _colour(rng, (0.6, 0.42, 0.25), 0.05)
        board = max(2, size // 16)
        tones = 0.85 + 0.25 * rng.random((m // board + 2,), dtype=np.float32)
        grain = value_noise(rng, m, size, max(2, m // 2), max(2, size // 10))
        rows_tone = tones[np.arange(m) // board][:, None]
        img[floor] = wood * (rows_tone * (0.85 + 0.25 * grain))[..., None]
        img[floor.start + board - 1:floor.stop:board] *= 0.7
    elif kind < 0.8:  # chequered tiles
        light, dark = _colour(rng, (0.9, 0.9, 0.88), 0.03), _colour(rng, (0.35, 0.35, 0.38), 0.05)
        tile = max(2, size // 10)
        yy, xx = np.ogrid[:m, :size]
        check = ((yy // tile + xx // tile) % 2 == 0)[..., None]
        img[floor] = np.where(check, light, dark)
    else:  # carpet
        carpet = _colour(rng, ((0.55, 0.15, 0.15), (0.25, 0.3, 0.5), (0.6, 0.55, 0.45))[int(rng.integers(3))], 0.05)
        img[floor] = carpet * (0.85 + 0.25 * fractal_noise(rng, m, size, max(2, size // 8), 2))[..., None]


def _rail(rng: Rng, img: np.ndarray) -> None:
    size = img.shape[0]
    sky = _rows(size, BANDS["rail"]["sky"])
    _paint_sky(rng, img, sky)
    _paint_treeline(rng, img, sky.stop)
    _paint_grass(rng, img, slice(sky.stop, size), base=(0.4, 0.5, 0.25))
    # Ballast bed under the rail, sleepers, then the rail itself.
    top = int(round(RAIL_TOP * size))
    bed = slice(top, min(size, top + max(3, int(0.1 * size))))
    gravel = value_noise(rng, bed.stop - bed.start, size, max(2, size // 6), max(4, size // 3))
    img[bed] = _colour(rng, (0.5, 0.47, 0.44), 0.04) * (0.75 + 0.4 * gravel)[..., None]
    sleeper = _colour(rng, (0.3, 0.2, 0.12), 0.03)
    spacing = max(3, size // 12)
    phase = int(rng.integers(0, spacing))
    sleeper_rows = slice(top, min(size, top + max(2, size // 24)))
    img[sleeper_rows, (np.arange(size) + phase) % spacing < max(2, spacing // 2)] = sleeper
    rail_rows = slice(max(0, top - max(1, size // 48)), top + max(1, size // 64))
    img[rail_rows] = _colour(rng, (0.55, 0.56, 0.6), 0.03)


PAINTERS: Mapping[str, Callable[[Rng, np.ndarray], None]] = MappingProxyType({
    "sky": _sky, "sea": _sea, "road": _road, "grass": _grass, "field": _field, "room": _room, "rail": _rail,
})
assert tuple(PAINTERS) == DRAWABLE_BACKGROUNDS and tuple(BANDS) == DRAWABLE_BACKGROUNDS


def render_background(name: str, image_size: int, rng: Rng) -> np.ndarray:
    """Albedo of the background, float32 (size, size, 3) in [0, 1], before scene lighting."""
    check_background(name)
    check_image_size(image_size)
    img = np.zeros((image_size, image_size, 3), dtype=np.float32)
    PAINTERS[name](rng, img)
    return np.clip(img, 0.0, 1.0)
