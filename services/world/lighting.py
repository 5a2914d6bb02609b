"""Scene-wide lighting and colour cast, and lighting that deliberately does not match.

Every layer of a scene (background, each object) is lit by the same global
transform, out = clip(gain * tint * albedo ** gamma), before it is
composited. An object lit differently from the rest is then exactly what a
careless copy-paste looks like, which is what RAIN learns to undo
(scene.render_lighting_pair).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from freemask.shared.errors import InvalidInput


@dataclass(frozen=True)
class Lighting:
    gain: float = 1.0  # overall brightness
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel colour cast (warm evening, cool shade)
    gamma: float = 1.0  # contrast: > 1 darkens mid-tones, < 1 lifts them

    def __post_init__(self) -> None:
        values = (self.gain, self.gamma, *self.tint)
        if len(self.tint) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
            raise InvalidInput(f"lighting needs a positive gain, gamma and three tint channels, got {self}")

    def apply(self, albedo: np.ndarray) -> np.ndarray:
        """Light an (..., 3) float albedo in [0, 1]; returns float32 in [0, 1]."""
        lit = np.power(np.clip(albedo, 0.0, 1.0), np.float32(self.gamma), dtype=np.float32)
        return np.clip(lit * np.asarray(self.tint, np.float32) * np.float32(self.gain), 0.0, 1.0)


NEUTRAL = Lighting()


def sample_lighting(rng: np.random.Generator) -> Lighting:
    """A plausible daylight-to-dusk variation: mostly mild, sometimes strong."""
    gain = float(np.exp(rng.normal(0.0, 0.16)))
    gamma = float(np.exp(rng.normal(0.0, 0.12)))
    warmth = float(rng.normal(0.0, 0.08))  # + is warm (evening, lamps), - is cool (shade, overcast)
    cast = rng.normal(0.0, 0.025, 3)
    tint = np.array([1.0 + warmth, 1.0 + 0.25 * warmth, 1.0 - warmth]) + cast
    tint = np.clip(tint / tint.mean(), 0.5, 1.5)
    return Lighting(float(np.clip(gain, 0.55, 1.6)), (float(tint[0]), float(tint[1]), float(tint[2])),
                    float(np.clip(gamma, 0.7, 1.45)))


def lighting_distance(a: Lighting, b: Lighting) -> float:
    """How visibly two lightings differ: log-ratios of gain and gamma, and the tint difference."""
    return float(
        abs(math.log(a.gain / b.gain))
        + abs(math.log(a.gamma / b.gamma))
        + float(np.abs(np.log(np.asarray(a.tint) / np.asarray(b.tint))).sum())
    )


def sample_mismatched_lighting(rng: np.random.Generator, scene: Lighting, min_distance: float = 0.35) -> Lighting:
    """A lighting clearly different from `scene`, as if the object were shot elsewhere.

    Drawn from a wider distribution than scene lighting and rejected until it
    is at least `min_distance` away, so no training pair is a no-op.
    """
    for _ in range(1000):
        gain = float(np.exp(rng.uniform(-0.6, 0.5)))
        gamma = float(np.exp(rng.uniform(-0.35, 0.35)))
        tint = np.exp(rng.normal(0.0, 0.15, 3))
        tint = np.clip(tint / tint.mean(), 0.4, 1.6)
        candidate = Lighting(gain, (float(tint[0]), float(tint[1]), float(tint[2])), gamma)
        if lighting_distance(candidate, scene) >= min_distance:
            return candidate
    raise InvalidInput(f"could not find a lighting at distance >= {min_distance} from {scene}")
