"""RAIN: region-aware adaptive instance normalization, and a small harmonization
network built around it (RainNet-style), in plain torch.

RAIN normalises the *foreground region's* features by their own per-channel mean
and standard deviation and re-styles them with the *background region's*
statistics; background features pass through unchanged:

    out = x · (1 − m) + ((x − μ_fg) / σ_fg · σ_bg + μ_bg) · m

with μ, σ taken over the pixels of each region (m is the foreground mask resized to
the feature map). The network is an encoder–decoder over (composite RGB, mask) with
RAIN in the decoder; it predicts the harmonised image, and only the masked pixels
are replaced, so the background never changes.

Weights are saved as safetensors with a JSON config beside them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from freemask.shared.errors import InvalidInput
from freemask.shared.small_models import load_small_model, save_small_model, small_model_version

WEIGHTS_FILE = "rain.safetensors"
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "rain"
_DOWNSAMPLING = 4  # the encoder halves the size twice: inputs are padded to a multiple of 4


def region_statistics(features: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of `features` (B, C, H, W) over the pixels
    where `mask` (B, 1, H, W, values in [0, 1]) is on, weighted by it."""
    weight = mask.sum(dim=(2, 3), keepdim=True)
    mean = (features * mask).sum(dim=(2, 3), keepdim=True) / (weight + eps)
    variance = (((features - mean) ** 2) * mask).sum(dim=(2, 3), keepdim=True) / (weight + eps)
    return mean, torch.sqrt(variance + eps)


def rain(features: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Region-aware adaptive instance normalization; `mask` is (B, 1, h, w) at any size."""
    if mask.shape[-2:] != features.shape[-2:]:
        mask = F.interpolate(mask, size=features.shape[-2:], mode="bilinear", align_corners=False)
    fg_mean, fg_std = region_statistics(features, mask, eps)
    bg_mean, bg_std = region_statistics(features, 1 - mask, eps)
    restyled = (features - fg_mean) / fg_std * bg_std + bg_mean
    return features * (1 - mask) + restyled * mask


@dataclass(frozen=True)
class RainConfig:
    width: int = 32


def _conv(inputs: int, outputs: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))


class RainNet(nn.Module):
    """(composite in [-1, 1], mask) -> harmonised image in [-1, 1], same size."""

    def __init__(self, config: RainConfig = RainConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.enc1 = _conv(4, w)
        self.enc2 = _conv(w, 2 * w, 2)
        self.enc3 = _conv(2 * w, 4 * w, 2)
        self.mid = _conv(4 * w, 4 * w)
        self.dec2 = _conv(4 * w + 2 * w, 2 * w)
        self.dec1 = _conv(2 * w + w, w)
        self.out = nn.Conv2d(w, 3, 3, padding=1)

    def forward(self, composite: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(torch.cat([composite, mask], dim=1))
        e2 = self.enc2(e1)
        e3 = rain(self.mid(self.enc3(e2)), mask)
        up2 = F.interpolate(e3, size=e2.shape[-2:], mode="bilinear", align_corners=False)
        d2 = rain(self.dec2(torch.cat([up2, e2], dim=1)), mask)
        up1 = F.interpolate(d2, size=e1.shape[-2:], mode="bilinear", align_corners=False)
        d1 = rain(self.dec1(torch.cat([up1, e1], dim=1)), mask)
        # A residual on the composite: the network learns the colour change, not the image.
        harmonised = (composite + self.out(d1)).clamp(-1, 1)
        return composite * (1 - mask) + harmonised * mask


def save_rain(net: RainNet, directory: Path) -> None:
    save_small_model(net, net.config, directory, WEIGHTS_FILE)


def load_rain(directory: Path = DEFAULT_WEIGHTS_DIR) -> RainNet:
    return load_small_model(RainNet, RainConfig, directory, WEIGHTS_FILE, "RAIN")


def rain_weights_version(directory: Path = DEFAULT_WEIGHTS_DIR) -> str:
    return small_model_version(directory, WEIGHTS_FILE)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float().unsqueeze(0) / 127.5 - 1.0


class RainHarmonizer:
    """Harmonise one composite: (H, W, 3) uint8 image and (H, W) bool mask -> (H, W, 3) uint8.

    Pixels outside the mask come back unchanged, bit for bit.
    """

    method = "rain"  # what the service records (harmonization.method)

    def __init__(self, net: RainNet, version: str) -> None:
        self.net = net.eval()
        self.version = version

    @classmethod
    def from_directory(cls, directory: Path = DEFAULT_WEIGHTS_DIR) -> RainHarmonizer:
        return cls(load_rain(directory), rain_weights_version(directory))

    @torch.no_grad()
    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InvalidInput(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        if mask.shape != image.shape[:2]:
            raise InvalidInput(f"mask {mask.shape} does not match the image {image.shape[:2]}")
        if not mask.any():
            return image.copy()
        height, width = mask.shape
        pad_h, pad_w = -height % _DOWNSAMPLING, -width % _DOWNSAMPLING
        composite = F.pad(to_tensor(image), (0, pad_w, 0, pad_h), mode="replicate")
        region = F.pad(torch.from_numpy(mask.astype(np.float32))[None, None], (0, pad_w, 0, pad_h))
        out = self.net(composite, region)[0, :, :height, :width]
        pixels = ((out.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
        return np.where(mask[..., None], pixels, image)
