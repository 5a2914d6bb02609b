"""A learned AffinityNet head: which pixels of an image belong to the same region.

AffinityNet (Ahn & Kwak, CVPR 2018) predicts a feature vector per pixel and turns two
pixels' features into an affinity ``a_ij = exp(-‖f_i - f_j‖₁ / E)`` (E the feature
width), so that affinities are symmetric, in (0, 1], and 1 on the diagonal. It is
trained on pairs of pixels within a small radius: pairs inside one region should reach
1, pairs across a boundary 0. Here the regions come from the reference world's exact
label maps (train split), so the head learns object boundaries, not classes: which
object a region is remains the cross-attention map's decision.

The random walk (`refine.py`) then spreads the class word's attention inside the
regions this head draws. The self-attention of a small generator is too blurry for
that at 32 px (its 16×16 grid is half the image's resolution), which is why the
shipped small generator uses this head by default.

Weights are saved as safetensors with a JSON config beside them; the training script
and seed are `affinity_train.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from freemask.attention_mask.aggregate import Resolution
from freemask.shared.errors import InvalidInput
from freemask.shared.small_models import load_small_model, save_small_model, small_model_version

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "affinity"
WEIGHTS_FILE = "affinity.safetensors"
IGNORE_LABEL = 255  # the world's label for pixels that belong to no class (as in VOC)


@dataclass(frozen=True)
class AffinityConfig:
    channels: int = 32
    embedding: int = 16
    groups: int = 4
    # Pixel pairs at most this far apart (Euclidean, in grid cells) get an affinity;
    # farther pairs get none, as in AffinityNet, so the walk spreads step by step.
    radius: float = 6.0


class AffinityHead(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] → per-pixel embeddings (B, E, H, W).

    Dilated convolutions at full resolution: at 32 px an object is a few pixels across,
    so no stride may blur its boundary away, while dilation lets a pixel see the
    background around it.
    """

    def __init__(self, config: AffinityConfig = AffinityConfig()) -> None:
        super().__init__()
        self.config = config
        width = config.channels

        def conv(inputs: int, dilation: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(inputs, width, 3, padding=dilation, dilation=dilation),
                                 nn.GroupNorm(config.groups, width), nn.ReLU())

        self.body = nn.Sequential(conv(3), conv(width), conv(width, 2), conv(width, 4), conv(width),
                                  nn.Conv2d(width, config.embedding, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


def pair_offsets(radius: float) -> list[tuple[int, int]]:
    """(dy, dx) to every neighbour within `radius`, each unordered pair once (half the disk)."""
    reach = int(radius)
    return [(dy, dx) for dy in range(reach + 1) for dx in range(-reach, reach + 1)
            if (dy > 0 or dx > 0) and dy * dy + dx * dx <= radius * radius]


def _shifted_pair(grid: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two ends of every pair at offset (dy, dx): views of `grid`'s last two axes."""
    height, width = grid.shape[-2:]
    first = grid[..., : height - dy, max(0, -dx): width - max(0, dx)]
    second = grid[..., dy:, max(0, dx): width + min(0, dx)]
    return first, second


def affinity_loss(embeddings: torch.Tensor, labels: torch.Tensor, radius: float) -> torch.Tensor:
    """AffinityNet's balanced loss: ¼ same-object pairs, ¼ same-background pairs, ½ boundary pairs.

    ``embeddings`` (B, E, H, W), ``labels`` (B, H, W) class ids with 0 background and
    `IGNORE_LABEL` ignored. Each of the three sets is averaged on its own, because
    background pairs outnumber object pairs tenfold at 32 px.
    """
    sums = torch.zeros(3, dtype=embeddings.dtype, device=embeddings.device)
    counts = torch.zeros(3, dtype=embeddings.dtype, device=embeddings.device)
    for dy, dx in pair_offsets(radius):
        f_a, f_b = _shifted_pair(embeddings, dy, dx)
        l_a, l_b = _shifted_pair(labels, dy, dx)
        affinity = torch.exp(-(f_a - f_b).abs().mean(dim=1))
        known = (l_a != IGNORE_LABEL) & (l_b != IGNORE_LABEL)
        same = known & (l_a == l_b)
        sets = (same & (l_a > 0), same & (l_a == 0), known & (l_a != l_b))
        together, apart = -torch.log(affinity + 1e-5), -torch.log(1.0 - affinity + 1e-5)
        for k, (members, loss) in enumerate(zip(sets, (together, together, apart))):
            sums[k] = sums[k] + loss[members].sum()
            counts[k] = counts[k] + members.sum()
    means = sums / counts.clamp_min(1.0)
    return 0.25 * means[0] + 0.25 * means[1] + 0.5 * means[2]


def dense_affinity(embedding: torch.Tensor, radius: float) -> torch.Tensor:
    """One image's ``(h·w, h·w)`` affinity from its ``(E, h, w)`` embedding; 0 beyond `radius`."""
    if embedding.ndim != 3:
        raise InvalidInput(f"an embedding must be (E, h, w), got shape {tuple(embedding.shape)}")
    channels, height, width = embedding.shape
    points = embedding.reshape(channels, -1).T.float()
    rows = torch.arange(height, device=embedding.device).repeat_interleave(width)
    cols = torch.arange(width, device=embedding.device).repeat(height)
    coords = torch.stack([rows, cols], dim=1).float()
    near = torch.cdist(coords, coords) <= radius
    return torch.exp(-torch.cdist(points, points, p=1) / channels) * near


@torch.no_grad()
def learned_affinities(head: AffinityHead, images: torch.Tensor, grid: Resolution) -> torch.Tensor:
    """``(B, N, N)`` affinities of `images` (B, 3, H, W) in [0, 1], on a ``grid`` of N cells.

    Images larger than the grid are area-averaged down to it first: a dense affinity
    costs N² per image, so the grid, not the image, sets the cost.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise InvalidInput(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    parameter = next(head.parameters())
    pixels = images.to(parameter.device, parameter.dtype) * 2.0 - 1.0
    if tuple(pixels.shape[-2:]) != tuple(grid):
        pixels = F.interpolate(pixels, size=tuple(grid), mode="area")
    embeddings = head(pixels)
    return torch.stack([dense_affinity(e, head.config.radius) for e in embeddings])


def save_affinity_head(head: AffinityHead, directory: Path) -> None:
    save_small_model(head, head.config, directory, WEIGHTS_FILE)


def load_affinity_head(directory: Path = DEFAULT_WEIGHTS_DIR) -> AffinityHead:
    return load_small_model(AffinityHead, AffinityConfig, directory, WEIGHTS_FILE, "affinity head")


def affinity_head_version(directory: Path = DEFAULT_WEIGHTS_DIR) -> str:
    """A digest of the head's weights and config, recorded beside the generator's version."""
    return small_model_version(directory, WEIGHTS_FILE)
