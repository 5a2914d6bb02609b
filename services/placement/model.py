"""FOPA, the placement model: a U-Net-like encoder-decoder from (background,
foreground + mask) to one placement heatmap per scale (DESIGN §1.2).

The background goes through a convolutional encoder (64 → 32 → 16 → 8 px; the
first step is strided, since the heatmap grid is 32 px); the
foreground through its own small encoder to one vector (what the object is, and
its shape). At the 8 px level the vector modulates the background features
(FiLM), and a decoder climbs back to the 32 px heatmap grid with skip
connections from the background encoder; the vector also modulates each decoder
level and adds a per-scale bias to the logits. `semantic` projects the fused 8 px
features to the background encoder's width, for eq. 5.

Weights are saved as safetensors with a JSON config beside them; the ONNX export
(Triton) wraps `forward` in a sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from freemask.placement.geometry import BACKGROUND_SIDE, FOREGROUND_SIDE, HEATMAP_SIDE, NUM_SCALES
from freemask.shared.small_models import load_small_model, save_small_model, small_model_version

WEIGHTS_FILE = "fopa.safetensors"
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "fopa"


@dataclass(frozen=True)
class FopaConfig:
    width: int = 24  # channels of the first level; deeper levels use 2x, 3x, 4x
    scales: int = NUM_SCALES
    background_side: int = BACKGROUND_SIDE
    foreground_side: int = FOREGROUND_SIDE
    heatmap_side: int = HEATMAP_SIDE


def _conv(inputs: int, outputs: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1), nn.GroupNorm(8, outputs), nn.SiLU())


@dataclass
class FopaOutput:
    logits: torch.Tensor  # (B, scales, heatmap_side, heatmap_side)
    semantic: torch.Tensor  # (B, C, 8, 8): predicted features of the composite (eq. 5)
    background_features: torch.Tensor  # (B, C, 8, 8): the encoder's features of the input background


class FopaNet(nn.Module):
    def __init__(self, config: FopaConfig = FopaConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.bg_stem = _conv(3, w, 2)                                       # 64 -> 32
        self.bg_down1 = _conv(w, 2 * w)                                     # 32
        self.bg_down2 = nn.Sequential(_conv(2 * w, 3 * w, 2), _conv(3 * w, 3 * w))  # 16
        self.bg_down3 = nn.Sequential(_conv(3 * w, 4 * w, 2), _conv(4 * w, 4 * w))  # 8
        self.fg_encoder = nn.Sequential(_conv(4, w, 2), _conv(w, 2 * w, 2), _conv(2 * w, 4 * w, 2),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
        # The foreground steers every decoder level (FiLM: a scale and a shift per channel)
        # and each scale's logits directly: what the object is decides how large it may be.
        self.film8 = nn.Linear(4 * w, 2 * 4 * w)
        self.film16 = nn.Linear(4 * w, 2 * 3 * w)
        self.film32 = nn.Linear(4 * w, 2 * 2 * w)
        self.scale_bias = nn.Linear(4 * w, config.scales)
        self.middle = nn.Sequential(_conv(4 * w, 4 * w), _conv(4 * w, 4 * w))
        self.semantic_head = nn.Conv2d(4 * w, 4 * w, 1)
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec1 = nn.Sequential(_conv(4 * w + 3 * w, 3 * w), _conv(3 * w, 3 * w))   # 16
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec2 = nn.Sequential(_conv(3 * w + 2 * w, 2 * w), _conv(2 * w, 2 * w))   # 32
        self.head = nn.Conv2d(2 * w, config.scales, 3, padding=1)

    def encode_background(self, background: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x32 = self.bg_down1(self.bg_stem(background))
        x16 = self.bg_down2(x32)
        return x32, x16, self.bg_down3(x16)

    def forward(self, background: torch.Tensor, foreground: torch.Tensor) -> FopaOutput:
        x32, x16, x8 = self.encode_background(background)
        object_code = self.fg_encoder(foreground)
        fused = self.middle(_film(x8, self.film8(object_code)))
        y16 = _film(self.dec1(torch.cat([self.up1(fused), x16], dim=1)), self.film16(object_code))
        y32 = _film(self.dec2(torch.cat([self.up2(y16), x32], dim=1)), self.film32(object_code))
        logits = self.head(y32) + self.scale_bias(object_code)[:, :, None, None]
        return FopaOutput(logits, self.semantic_head(fused), x8)


def _film(features: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
    gamma, beta = modulation.chunk(2, dim=1)
    return features * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]


class FopaHeatmap(nn.Module):
    """What is exported and served: (BACKGROUND, FOREGROUND) -> HEATMAP in [0, 1]."""

    def __init__(self, net: FopaNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, background: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(background, foreground).logits)


def save_fopa(net: FopaNet, directory: Path) -> None:
    save_small_model(net, net.config, directory, WEIGHTS_FILE)


def load_fopa(directory: Path = DEFAULT_WEIGHTS_DIR) -> FopaNet:
    """The FOPA net saved in `directory`; InvalidInput naming what is missing if it holds none."""
    return load_small_model(FopaNet, FopaConfig, directory, WEIGHTS_FILE, "FOPA")


def weights_version(directory: Path = DEFAULT_WEIGHTS_DIR) -> str:
    """`ModelVersion.version` of the weights: a digest of the safetensors file and its config."""
    return small_model_version(directory, WEIGHTS_FILE)
