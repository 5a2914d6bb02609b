"""Silhouettes of the vehicle classes: aeroplane, boat, bus, car, train.

Each drawer works in object units (x in [0, A], y in [0, 1], y down, facing
right; the renderer mirrors for left) and returns parts whose union touches
all four sides of the unit box, so the placement box is also the object's
tight bounding box. Randomness (proportions, variants) comes only from the rng
it is handed.
"""

from __future__ import annotations

import numpy as np

from freemask.world.looks import DARK_GLASS, GLASS, HUB, LAMP, TYRE, Look, darker, lighter
from freemask.world.raster import Capsule, Ellipse, Part, Polygon, Rect, circle

Rng = np.random.Generator


def _wheel(parts: list[Part], x: float, r: float) -> None:
    """A tyre standing on y = 1 with a hub."""
    parts.append(Part(circle(x, 1.0 - r, r), TYRE))
    parts.append(Part(circle(x, 1.0 - r, r * 0.5), HUB))


def draw_car(rng: Rng, a: float, look: Look) -> list[Part]:
    body = look["body"]
    r = rng.uniform(0.17, 0.21)
    sill, belt = 1.0 - r * 0.9, rng.uniform(0.45, 0.52)
    hatch = rng.random() < 0.35  # hatchback: the cabin runs to the rear
    c0 = a * (0.06 if hatch else rng.uniform(0.2, 0.27))
    c1 = a * rng.uniform(0.68, 0.76)
    roof0, roof1 = c0 + a * (0.02 if hatch else 0.08), c1 - a * rng.uniform(0.12, 0.17)
    parts = [
        Part(Polygon(((c0, belt), (roof0, 0.0), (roof1, 0.0), (c1, belt))), body),
        Part(Polygon(((0.0, belt + 0.04), (0.04 * a, belt - 0.03), (a * 0.8, belt - 0.03), (a, belt + 0.08),
                      (a, sill - 0.02), (a - 0.04, sill), (0.03, sill), (0.0, sill - 0.04))), body),
    ]
    # Two side windows split by a pillar, inset from the cabin outline.
    inset, mid = 0.07, (roof0 + roof1) / 2
    top = 0.09
    parts.append(Part(Polygon(((c0 + (roof0 - c0) * 0.9 + 0.05, top), (mid - 0.03, top), (mid - 0.03, belt - 0.05),
                               (c0 + inset + 0.02, belt - 0.05))), GLASS, clip=True))
    parts.append(Part(Polygon(((mid + 0.03, top), (roof1 - 0.02, top), (c1 - inset, belt - 0.05),
                               (mid + 0.03, belt - 0.05))), GLASS, clip=True))
    parts.append(Part(Rect(a * 0.05, belt + 0.12, a * 0.95, belt + 0.14), darker(body, 0.75), clip=True))
    parts.append(Part(Ellipse(a - 0.03, belt + 0.1, 0.05, 0.035), LAMP, clip=True))
    parts.append(Part(Ellipse(0.02, belt + 0.08, 0.035, 0.035), (0.8, 0.05, 0.05), clip=True))
    for x in (a * rng.uniform(0.17, 0.22), a * rng.uniform(0.78, 0.83)):
        _wheel(parts, x, r)
    return parts


def draw_bus(rng: Rng, a: float, look: Look) -> list[Part]:
    body, trim = look["body"], look["trim"]
    r = rng.uniform(0.12, 0.15)
    floor = 1.0 - r * 0.8
    double = rng.random() < 0.3
    corner = 0.06
    parts = [Part(Polygon(((0.0, corner), (corner, 0.0), (a - corner * 2.5, 0.0), (a, corner * 2),
                           (a, floor), (0.0, floor))), body)]
    rows = ((0.08, 0.3), (0.42, 0.62)) if double else ((0.12, 0.45),)
    n = max(3, int(round(a * 2.4)))
    door_x0 = a - 0.42
    for y0, y1 in rows:
        span0, span1 = 0.08, a - 0.3
        step = (span1 - span0) / n
        for i in range(n):
            x = span0 + i * step
            if y0 > 0.3 or not (door_x0 - 0.05 < x + step and x < door_x0 + 0.16):
                parts.append(Part(Rect(x + 0.02, y0, x + step - 0.02, y1), GLASS, clip=True))
    parts.append(Part(Polygon(((a - 0.25, 0.08), (a - 0.06, 0.08), (a - 0.01, 0.5), (a - 0.25, 0.5))), DARK_GLASS,
                      clip=True))
    parts.append(Part(Rect(door_x0, 0.12, door_x0 + 0.14, floor - 0.04), darker(body, 0.55), clip=True))
    parts.append(Part(Rect(0.0, floor - 0.18, a, floor - 0.13), trim, clip=True))
    parts.append(Part(Ellipse(a - 0.02, floor - 0.08, 0.03, 0.03), LAMP, clip=True))
    for x in (a * rng.uniform(0.14, 0.2), a * rng.uniform(0.76, 0.82)):
        _wheel(parts, x, r)
    return parts


def draw_train(rng: Rng, a: float, look: Look) -> list[Part]:
    body, stripe = look["body"], look["stripe"]
    r = rng.uniform(0.08, 0.1)
    floor = 1.0 - r * 1.2
    roof = rng.uniform(0.06, 0.12)
    nose = rng.uniform(0.3, 0.45)
    parts = [
        Part(Polygon(((0.0, roof), (a - nose, roof), (a, floor - 0.25), (a, floor), (0.0, floor))), body),
        # roof equipment (pantograph base) reaches the top of the box
        Part(Rect(a * 0.3, 0.0, a * 0.3 + 0.25, roof + 0.01), darker(body, 0.5)),
        Part(Rect(0.0, floor - 0.24, a, floor - 0.17), stripe, clip=True),
        Part(Polygon(((a - nose + 0.02, roof + 0.06), (a - nose * 0.55, roof + 0.06), (a - 0.02, floor - 0.33),
                      (a - nose + 0.02, floor - 0.33))), DARK_GLASS, clip=True),
    ]
    cars = max(1, int(round(a / 1.6)))
    car_len = (a - nose) / cars
    for c in range(cars):
        x0 = c * car_len
        if c:
            parts.append(Part(Rect(x0 - 0.012, roof, x0 + 0.012, floor), darker(body, 0.35), clip=True))
        n = max(2, int(round(car_len * 2.8)))
        step = (car_len - 0.12) / n
        for i in range(n):
            wx = x0 + 0.08 + i * step
            parts.append(Part(Rect(wx + 0.015, roof + 0.1, wx + step - 0.015, roof + 0.33), GLASS, clip=True))
    parts.append(Part(Ellipse(a - 0.03, floor - 0.1, 0.03, 0.03), LAMP, clip=True))
    # Bogies: pairs of small wheels under each end of each car.
    for c in range(cars):
        x0 = c * car_len
        for x in (x0 + 0.12, x0 + 0.12 + 2.3 * r, x0 + car_len - 0.12 - 2.3 * r, x0 + car_len - 0.12):
            _wheel(parts, min(max(x, r), a - r), r)
    return parts


def draw_aeroplane(rng: Rng, a: float, look: Look) -> list[Part]:
    body, tail, wing = look["body"], look["tail"], look["wing"]
    fy = rng.uniform(0.42, 0.5)  # fuselage centre line
    fr = rng.uniform(0.1, 0.13)
    nose = rng.uniform(0.05, 0.1)
    parts = [
        # tail fin: from the top of the box down to the fuselage
        Part(Polygon(((0.0, 0.0), (a * 0.12, 0.0), (a * 0.3, fy), (0.02, fy))), tail),
        # tailplane, seen slightly from below
        Part(Polygon(((a * 0.02, fy), (a * 0.18, fy), (a * 0.08, fy + 0.17), (0.0, fy + 0.17))), wing),
    ]
    # Wings swept back: the near wing reaches the bottom of the box, the far one
    # peeks out above the fuselage.
    root = a * rng.uniform(0.5, 0.58)
    sweep = a * rng.uniform(0.1, 0.16)
    chord = a * rng.uniform(0.1, 0.14)
    parts.append(Part(Polygon(((root + chord * 0.4, fy), (root - chord * 0.3, fy - 0.28),
                               (root - chord * 0.65, fy - 0.28), (root - chord * 0.6, fy))), darker(wing, 0.8)))
    parts.append(Part(Ellipse(a / 2 + nose / 2, fy, a / 2 - nose / 2, fr), body))
    parts.append(Part(Ellipse(a - nose - 0.02, fy + 0.02, nose + 0.04, fr * 0.9), body))
    parts.append(Part(Polygon(((root + chord, fy), (root - sweep + chord * 0.35, 1.0), (root - sweep - chord * 0.1, 1.0),
                               (root - chord * 0.4, fy))), wing))
    engine_x = root - sweep * 0.45 + chord * 0.15
    parts.append(Part(Ellipse(engine_x, fy + 0.35, chord * 0.45, 0.06), darker(wing, 0.6)))
    for i in range(int(a * 7)):
        wx = a * 0.22 + i * 0.1
        if wx < a - nose - 0.12:
            parts.append(Part(circle(wx, fy - fr * 0.25, fr * 0.22), DARK_GLASS, clip=True))
    parts.append(Part(Polygon(((a - nose - 0.02, fy - fr * 0.6), (a - 0.03, fy - fr * 0.1), (a - nose - 0.02, fy))),
                      DARK_GLASS, clip=True))
    parts.append(Part(Rect(a * 0.2, fy + fr * 0.35, a, fy + fr * 0.55), lighter(tail, 0.1), clip=True))
    return parts


def draw_boat(rng: Rng, a: float, look: Look) -> list[Part]:
    hull, trim, deck = look["hull"], look["trim"], look["deck"]
    deck_y = rng.uniform(0.58, 0.68)
    parts: list[Part] = []
    if rng.random() < 0.55:
        # Sailing boat: mast and two sails above a shallow hull.
        mast_x = a * rng.uniform(0.42, 0.52)
        sail = (0.96, 0.95, 0.9) if rng.random() < 0.8 else lighter(trim, 0.3)
        parts.append(Part(Capsule(mast_x, 0.0, mast_x, deck_y, 0.018), (0.35, 0.25, 0.15)))
        parts.append(Part(Polygon(((mast_x + 0.02, 0.03), (mast_x + 0.02, deck_y - 0.05),
                                   (a * rng.uniform(0.84, 0.92), deck_y - 0.05))), sail))
        parts.append(Part(Polygon(((mast_x - 0.02, 0.1), (mast_x - 0.02, deck_y - 0.05),
                                   (a * rng.uniform(0.1, 0.2), deck_y - 0.05))), darker(sail, 0.9)))
    else:
        # Motor boat: a cabin with windows, and sometimes a funnel on top.
        cx0, cx1 = a * rng.uniform(0.22, 0.32), a * rng.uniform(0.6, 0.7)
        cabin_top = rng.uniform(0.2, 0.35)
        parts.append(Part(Polygon(((cx0, deck_y), (cx0 + 0.05, cabin_top), (cx1 - 0.08, cabin_top),
                                   (cx1, deck_y))), deck))
        n = max(2, int((cx1 - cx0) * 6))
        step = (cx1 - cx0 - 0.12) / n
        for i in range(n):
            wx = cx0 + 0.07 + i * step
            parts.append(Part(Rect(wx, cabin_top + 0.07, wx + step * 0.65, cabin_top + 0.16), DARK_GLASS, clip=True))
        fx = (cx0 + cx1) / 2 - 0.04
        parts.append(Part(Rect(fx, 0.0, fx + 0.1, cabin_top + 0.02), trim))
    parts.append(Part(Polygon(((0.0, deck_y - 0.03), (a, deck_y - 0.1), (a * 0.84, 1.0), (a * 0.1, 1.0))), hull))
    parts.append(Part(Rect(0.0, deck_y + 0.04, a, deck_y + 0.09), trim, clip=True))
    return parts
