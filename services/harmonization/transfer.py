"""The non-learned harmonizers, and the protocol every harmonizer follows.

- **Statistics transfer** is RAIN's idea without the network: the pasted region's
  per-channel mean and standard deviation are set to those of the background. The
  background is every pixel of the image outside the object, the same region RAIN
  takes its statistics from (`rain.rain` uses 1 − mask), so the two methods differ
  only in learning, and an object near the border still has a large, stable
  reference (a thin ring around its box would not).
- **Copy-paste** changes nothing: the ablation baseline.

Both leave every pixel outside the mask bit-identical.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from freemask.shared.errors import InvalidInput

STATISTICS_TRANSFER = "statistics_transfer"
COPY_PASTE = "copy_paste"
_FLAT_STD = 1e-6  # a single-colour region has no spread to rescale: it is only shifted


class Harmonizer(Protocol):
    """Makes the masked pixels of a composite match the rest of it."""

    @property
    def method(self) -> str:
        """The `harmonization.method` name: "rain", "statistics_transfer" or "copy_paste"."""
        ...

    @property
    def version(self) -> str | None:
        """The weights' `ModelVersion.version`; None for a non-learned method."""
        ...

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 and (H, W) bool -> (H, W, 3) uint8; pixels outside `mask` unchanged."""
        ...


def check_inputs(image: np.ndarray, mask: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InvalidInput(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if mask.dtype != np.bool_ or mask.shape != image.shape[:2]:
        raise InvalidInput(f"mask must be a boolean array of the image's size {image.shape[:2]}, got {mask.shape} "
                           f"{mask.dtype}")


def transfer_statistics(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Set the per-channel mean and std of `image[mask]` to those of `image[~mask]`.

    Values are rounded and clipped to 0..255, so the result matches the target to
    within rounding wherever no pixel had to be clipped. With no object or no
    background pixels there is nothing to match, and the image comes back as is.
    """
    check_inputs(image, mask)
    out = image.copy()
    if not mask.any() or mask.all():
        return out
    region = image[mask].astype(np.float64)  # (n, 3)
    background = image[~mask].astype(np.float64)
    region_mean, region_std = region.mean(axis=0), region.std(axis=0)
    target_mean, target_std = background.mean(axis=0), background.std(axis=0)
    scale = np.where(region_std > _FLAT_STD, target_std / np.maximum(region_std, _FLAT_STD), 1.0)
    restyled = (region - region_mean) * scale + target_mean
    out[mask] = np.clip(np.rint(restyled), 0, 255).astype(np.uint8)
    return out


class StatisticsTransfer:
    method = STATISTICS_TRANSFER
    version: str | None = None

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return transfer_statistics(image, mask)


class CopyPaste:
    method = COPY_PASTE
    version: str | None = None

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        check_inputs(image, mask)
        return image.copy()
