"""The person silhouette: head, hair, shirt or dress, arms, trousers, shoes.

A standing figure seen from the front, centred in a tall box (aspect about
0.3-0.5). The arms spread to fill the box's width, so a wider box means arms
held out rather than a fatter person; one variant waves.
"""

from __future__ import annotations

import numpy as np

from freemask.world.looks import HAIR, SKIN, TROUSERS, Look, darker, pick
from freemask.world.raster import Capsule, Ellipse, Part, Polygon, Rect, circle

Rng = np.random.Generator
SHOE = (0.1, 0.08, 0.07)


def draw_person(rng: Rng, a: float, look: Look) -> list[Part]:
    shirt = look["shirt"]
    skin, hair, trousers = pick(rng, SKIN), pick(rng, HAIR), pick(rng, TROUSERS)
    cx = a / 2
    head_r = 0.065
    dress = rng.random() < 0.25
    long_hair = rng.random() < 0.35
    waving = rng.random() < 0.25
    stride = rng.uniform(0.02, min(0.1, a / 2 - 0.05))
    parts: list[Part] = []
    if long_hair:
        parts.append(Part(Ellipse(cx, 0.11, head_r * 1.15, 0.1), hair))
    # Legs and shoes first: the shirt or dress covers the hips.
    for side in (-1, 1):
        foot_x = cx + side * stride
        parts.append(Part(Capsule(cx + side * 0.04, 0.5, foot_x, 0.94, 0.035 if dress else 0.042),
                          skin if dress else trousers))
        parts.append(Part(Ellipse(foot_x + 0.015, 0.975, 0.045, 0.025), SHOE))
    parts.append(Part(Rect(cx - 0.025, 0.1, cx + 0.025, 0.17), skin))  # neck
    if dress:
        parts.append(Part(Polygon(((cx - 0.085, 0.15), (cx + 0.085, 0.15), (cx + 0.15, 0.7), (cx - 0.15, 0.7))),
                          shirt))
    else:
        parts.append(Part(Polygon(((cx - 0.1, 0.15), (cx + 0.1, 0.15), (cx + 0.085, 0.54), (cx - 0.085, 0.54))),
                          shirt))
        parts.append(Part(Rect(cx - 0.085, 0.5, cx + 0.085, 0.54), darker(trousers, 0.7)))  # belt
    reach = a / 2 - 0.03
    for side in (-1, 1):
        shoulder = (cx + side * 0.085, 0.18)
        if waving and side == 1:
            hand = (cx + side * reach, 0.03)
        else:
            hand = (cx + side * reach, rng.uniform(0.42, 0.5))
        elbow = ((shoulder[0] + hand[0]) / 2, (shoulder[1] + hand[1]) / 2)
        parts.append(Part(Capsule(*shoulder, *elbow, 0.032), shirt))
        parts.append(Part(Capsule(*elbow, *hand, 0.027), skin))
        parts.append(Part(circle(*hand, 0.028), skin))
    parts.append(Part(circle(cx, head_r + 0.005, head_r), skin))
    parts.append(Part(Ellipse(cx, 0.035, head_r * 1.05, 0.04), hair, clip=True))
    return parts
