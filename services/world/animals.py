"""Silhouettes of the animal classes: bird, cat, cow, dog, horse, sheep.

Same conventions as vehicles.py: object units (x in [0, A], y in [0, 1],
facing right), parts whose union fills the unit box. The animals are told
apart the way a child's drawing does it: cats by pointed ears and a long thin
tail, dogs by a snout and floppy ears, horses by long legs and a long neck,
cows by a boxy patched body and horns, sheep by a woolly cloud on thin legs.
"""

from __future__ import annotations

import math

import numpy as np

from freemask.world.looks import EYE, Look, darker, lighter
from freemask.world.raster import Capsule, Ellipse, Part, Polygon, Rect, circle

Rng = np.random.Generator
HOOF = (0.12, 0.1, 0.09)
NOSE_PINK = (0.9, 0.55, 0.6)


def _legs(parts: list[Part], xs: tuple[float, ...], top: float, r: float, colour: tuple[float, float, float],
          rng: Rng, splay: float = 0.0) -> None:
    """Legs standing on y = 1; `splay` tilts alternate legs, a walking or galloping gait."""
    for i, x in enumerate(xs):
        lean = splay * (1 if i % 2 else -1) * rng.uniform(0.5, 1.0)
        parts.append(Part(Capsule(x, top, x + lean, 1.0 - r, r), colour))


def draw_dog(rng: Rng, a: float, look: Look) -> list[Part]:
    fur, ear, snout = look["fur"], look["ear"], look["snout"]
    leg_colour = snout if look.name == "black and tan" else fur
    hx, hy, hr = a - 0.2, 0.17, 0.14
    body_y = rng.uniform(0.44, 0.5)
    parts: list[Part] = []
    _legs(parts, (0.18 * a, 0.27 * a, 0.62 * a, 0.7 * a), body_y, rng.uniform(0.045, 0.06), leg_colour, rng,
          splay=rng.uniform(0.0, 0.06))
    parts.append(Part(Capsule(0.12 * a, body_y - 0.05, 0.035, rng.uniform(0.08, 0.2), 0.035), fur))  # tail up
    parts.append(Part(Ellipse(0.42 * a, body_y, 0.32 * a, rng.uniform(0.15, 0.19)), fur))
    parts.append(Part(Capsule(0.66 * a, body_y - 0.05, hx - 0.02, hy + 0.05, 0.1), fur))  # neck
    pointed_ears = rng.random() < 0.5
    if pointed_ears:  # a shepherd's ears reach the top of the box
        parts.append(Part(Polygon(((hx - 0.12, hy - 0.04), (hx - 0.02, hy - 0.1), (hx - 0.1, 0.0))), ear))
    parts.append(Part(circle(hx, hy, hr), fur))
    parts.append(Part(Ellipse(a - 0.085, hy + 0.07, 0.085, 0.065), snout))
    parts.append(Part(circle(a - 0.02, hy + 0.04, 0.028), EYE))  # nose
    parts.append(Part(circle(hx + 0.03, hy - 0.03, 0.022), EYE))
    if not pointed_ears:  # a floppy ear hanging by the cheek
        parts.append(Part(Ellipse(hx - 0.06, hy + 0.04, 0.05, 0.11, -20.0), ear))
        parts.append(Part(Ellipse(hx - 0.02, 0.035, 0.06, 0.035), fur))  # crown, so the head touches the top
    if rng.random() < 0.35:
        parts.append(Part(Capsule(hx - 0.12, hy + 0.13, hx - 0.02, hy + 0.16, 0.03), (0.85, 0.1, 0.1)))  # collar
    return parts


def draw_cat(rng: Rng, a: float, look: Look) -> list[Part]:
    fur, mark, eye = look["fur"], look["mark"], look["eye"]
    parts: list[Part] = []
    if a < 1.15:  # sitting in profile: a pear-shaped body, the tail curled round the paws
        hx, hy, hr = a - 0.2, 0.3, 0.17
        parts.append(Part(Ellipse(0.4 * a, 0.72, 0.4 * a, 0.26), fur))  # haunch
        parts.append(Part(Ellipse(hx - 0.1, 0.55, 0.14, 0.25, 15.0), fur))  # chest
        _legs(parts, (hx - 0.06, hx), 0.55, 0.04, fur, rng)
        parts.append(Part(Capsule(0.04, 0.955, 0.55 * a, 0.955, 0.04), darker(fur, 0.85)))
        parts.append(Part(Capsule(0.04, 0.955, 0.045, 0.8, 0.04), darker(fur, 0.85)))
    else:  # standing or walking, the tail raised in a hook
        hx, hy, hr = a - 0.16, 0.32, 0.14
        body_y = rng.uniform(0.5, 0.56)
        _legs(parts, (0.2 * a, 0.28 * a, 0.6 * a, 0.68 * a), body_y, 0.035, fur, rng, splay=rng.uniform(0.0, 0.05))
        tail_mid = (0.035, rng.uniform(0.3, 0.4))
        parts.append(Part(Capsule(0.16 * a, body_y - 0.04, *tail_mid, 0.03), fur))
        parts.append(Part(Capsule(*tail_mid, 0.09, 0.07, 0.03), fur))
        parts.append(Part(Ellipse(0.44 * a, body_y, 0.3 * a, 0.14), fur))
        parts.append(Part(Capsule(0.68 * a, body_y - 0.04, hx - 0.03, hy + 0.04, 0.09), fur))
    # Pointed ears rising to the top of the box.
    parts.append(Part(Polygon(((hx - hr * 0.95, hy - hr * 0.3), (hx - hr * 0.15, hy - hr * 0.85),
                               (hx - hr * 0.8, hy - hr - 0.13))), fur))
    parts.append(Part(Polygon(((hx - hr * 0.05, hy - hr * 0.9), (hx + hr * 0.85, hy - hr * 0.4),
                               (hx + hr * 0.55, hy - hr - 0.13))), fur))
    parts.append(Part(Ellipse(hx, hy, hr * 1.05, hr * 0.92), fur))
    for ex in (hx - hr * 0.35, hx + hr * 0.45):
        parts.append(Part(Ellipse(ex, hy - hr * 0.1, hr * 0.2, hr * 0.24), eye))
        parts.append(Part(Ellipse(ex, hy - hr * 0.1, hr * 0.06, hr * 0.2), EYE))
    parts.append(Part(circle(hx + hr * 0.05, hy + hr * 0.35, hr * 0.13), NOSE_PINK))
    if mark != fur:  # tabby stripes, painted only on the fur already drawn
        for i in range(5):
            x = (0.2 + 0.12 * i) * a
            parts.append(Part(Rect(x, 0.3, x + 0.03, 0.75), mark, clip=True))
    return parts


def draw_horse(rng: Rng, a: float, look: Look) -> list[Part]:
    coat, mane = look["coat"], look["mane"]
    body_y = rng.uniform(0.4, 0.45)
    parts: list[Part] = []
    legs = (0.2 * a, 0.29 * a, 0.6 * a, 0.69 * a)
    _legs(parts, legs, body_y + 0.05, 0.035, coat, rng, splay=rng.uniform(0.0, 0.1))
    for x in legs:
        parts.append(Part(Ellipse(x, 0.975, 0.04, 0.025), HOOF, clip=False))
    # tail hangs from the rump to the left edge
    parts.append(Part(Polygon(((0.16 * a, body_y - 0.1), (0.1 * a, body_y - 0.08), (0.0, body_y + 0.32),
                               (0.07, body_y + 0.34))), mane))
    parts.append(Part(Ellipse(0.44 * a, body_y, 0.3 * a, 0.14), coat))
    head_x, head_y = a - 0.12, 0.17
    parts.append(Part(Polygon(((0.6 * a, body_y - 0.1), (0.7 * a, body_y + 0.06), (head_x - 0.04, head_y + 0.05),
                               (head_x - 0.14, 0.07))), coat))  # neck
    parts.append(Part(Polygon(((head_x - 0.14, 0.1), (head_x - 0.08, 0.0), (head_x - 0.06, 0.08))), coat))  # ear
    parts.append(Part(Ellipse(head_x, head_y, 0.13, 0.06, 38.0), coat))
    parts.append(Part(Polygon(((head_x - 0.16, 0.06), (0.58 * a, body_y - 0.12), (0.63 * a, body_y - 0.08),
                               (head_x - 0.1, 0.08))), mane))  # mane along the neck
    parts.append(Part(circle(head_x - 0.04, head_y - 0.04, 0.018), EYE))
    parts.append(Part(Ellipse(a - 0.04, 0.255, 0.035, 0.03, 38.0), darker(coat, 0.6)))  # muzzle
    return parts


def draw_cow(rng: Rng, a: float, look: Look) -> list[Part]:
    body, patch, muzzle = look["body"], look["patch"], look["muzzle"]
    top, bottom = rng.uniform(0.18, 0.24), rng.uniform(0.6, 0.66)
    mid = (top + bottom) / 2
    half = (bottom - top) / 2
    parts: list[Part] = []
    legs = (0.2 * a, 0.3 * a, 0.64 * a, 0.73 * a)
    _legs(parts, legs, bottom - 0.05, 0.05, body, rng, splay=rng.uniform(0.0, 0.03))
    for x in legs:
        parts.append(Part(Ellipse(x, 0.975, 0.05, 0.025), HOOF))
    parts.append(Part(Capsule(0.06 * a, top + 0.05, 0.025, bottom + 0.02, 0.018), body))  # tail
    parts.append(Part(Ellipse(0.025, bottom + 0.04, 0.025, 0.05), darker(patch, 0.8)))
    parts.append(Part(Rect(0.12 * a, top, 0.8 * a, bottom), body))
    parts.append(Part(Ellipse(0.12 * a, mid, 0.1, half), body))
    parts.append(Part(Ellipse(0.8 * a, mid, 0.1, half), body))
    parts.append(Part(Ellipse(0.38 * a, bottom + 0.02, 0.07, 0.05), muzzle))  # udder
    for _ in range(int(rng.integers(3, 7))):
        px, py = rng.uniform(0.1, 0.85) * a, rng.uniform(top, bottom)
        parts.append(Part(Ellipse(px, py, rng.uniform(0.06, 0.14), rng.uniform(0.05, 0.1), rng.uniform(0, 180)),
                          patch, clip=True))
    hx = a - 0.11
    for x0, x1 in ((hx - 0.06, hx - 0.12), (hx + 0.04, hx + 0.08)):  # horns
        parts.append(Part(Capsule(x0, 0.2, x1, 0.025, 0.02), (0.9, 0.86, 0.75)))
    parts.append(Part(Ellipse(hx - 0.14, 0.25, 0.07, 0.03, -15.0), body))  # ear
    parts.append(Part(Ellipse(hx, 0.33, 0.1, 0.14), patch if look.name != "brown and white" else body))
    parts.append(Part(Ellipse(hx + 0.01, 0.44, 0.1, 0.065), muzzle))
    parts.append(Part(circle(hx + 0.02, 0.28, 0.018), EYE))
    return parts


def draw_sheep(rng: Rng, a: float, look: Look) -> list[Part]:
    wool, face = look["wool"], look["face"]
    cx, cy, rx, ry = 0.43 * a, 0.38, 0.32 * a, 0.22
    parts: list[Part] = []
    _legs(parts, (0.22 * a, 0.31 * a, 0.55 * a, 0.64 * a), 0.6, 0.028, (0.12, 0.1, 0.1), rng,
          splay=rng.uniform(0.0, 0.03))
    parts.append(Part(Ellipse(cx, cy, rx, ry), wool))
    # The fleece: a ring of overlapping puffs round the body, a little irregular.
    count = 11
    for i in range(count):
        t = 2 * math.pi * (i + rng.uniform(-0.2, 0.2)) / count
        r = rng.uniform(0.1, 0.13)
        px, py = cx + 0.85 * rx * math.cos(t), cy + 0.85 * ry * math.sin(t)
        px = min(max(px, r), a - 0.2)
        py = max(py, r)
        parts.append(Part(circle(px, py, r), wool if i % 2 else darker(wool, 0.94)))
    hx = a - 0.11
    parts.append(Part(Ellipse(hx - 0.1, 0.29, 0.07, 0.03, -25.0), face))  # ear
    parts.append(Part(Ellipse(hx, 0.36, 0.1, 0.14, 25.0), face))
    parts.append(Part(circle(hx - 0.04, 0.25, 0.07), lighter(wool, 0.1)))  # woolly cap
    parts.append(Part(circle(hx + 0.02, 0.32, 0.018), EYE if face[0] > 0.5 else (0.85, 0.8, 0.6)))
    return parts


def draw_bird(rng: Rng, a: float, look: Look) -> list[Part]:
    body, wing, belly = look["body"], look["wing"], look["belly"]
    beak = (0.95, 0.6, 0.1)
    parts: list[Part] = []
    if a >= 1.15:  # flying, both wings raised
        by = rng.uniform(0.66, 0.72)
        lift = rng.uniform(0.0, 0.04)
        parts.append(Part(Polygon(((0.38 * a, by - 0.05), (0.58 * a, by - 0.05), (0.22 * a, lift))), darker(wing, 0.8)))
        parts.append(Part(Polygon(((0.22 * a, by), (0.0, by + 0.12), (0.02, 1.0), (0.25 * a, by + 0.1))), wing))  # tail
        parts.append(Part(Ellipse(0.48 * a, by, 0.3 * a, 0.13), body))
        parts.append(Part(Ellipse(0.5 * a, by + 0.06, 0.22 * a, 0.06), belly, clip=True))
        parts.append(Part(circle(0.8 * a, by - 0.08, 0.1), body))
        parts.append(Part(Polygon(((0.8 * a + 0.06, by - 0.12), (a, by - 0.06), (0.8 * a + 0.06, by - 0.02))), beak))
        parts.append(Part(circle(0.8 * a + 0.02, by - 0.1, 0.022), EYE))
        parts.append(Part(Polygon(((0.42 * a, by - 0.02), (0.62 * a, by - 0.02), (0.42 * a, 0.0))), wing))
    else:  # perched, head up, legs down to the bottom of the box
        hx, hr = 0.66 * a, 0.13
        _legs(parts, (0.42 * a, 0.5 * a), 0.65, 0.015, beak, rng)
        parts.append(Part(Polygon(((0.3 * a, 0.55), (0.0, 0.88), (0.06, 0.95), (0.4 * a, 0.66))), wing))  # tail
        parts.append(Part(Ellipse(0.45 * a, 0.48, 0.3, 0.19, -30.0), body))
        parts.append(Part(Ellipse(0.5 * a, 0.56, 0.18, 0.1, -30.0), belly, clip=True))
        parts.append(Part(Ellipse(0.38 * a, 0.48, 0.22, 0.1, -30.0), wing, clip=True))
        parts.append(Part(circle(hx, hr + 0.005, hr), body))
        parts.append(Part(Polygon(((hx + hr * 0.7, 0.08), (a, 0.16), (hx + hr * 0.7, 0.21))), beak))
        parts.append(Part(circle(hx + 0.03, 0.11, 0.022), EYE))
    return parts
