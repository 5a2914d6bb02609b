"""The segmenter f_t of Algorithm 1: Mask2Former from `transformers`, built from config.

Nothing is downloaded: the backbone is built from a `transformers` config and starts
from random weights (or from an earlier round's segmenter). Presets:

- ``tiny``: the embedded default, for 32–64 px images on CPU. A 4-stage Swin with
  32–256 channels and stride-2 patches (so the mask head sees a quarter-resolution
  grid of a 64 px input), 16 queries, 64-wide decoder: about 1.7 M parameters.
- ``r50`` and ``swin-b``: the paper's standard Mask2Former shapes (ResNet-50 or Swin-B
  backbone, 100 queries, 256-wide, 6 encoder and 9 decoder layers), for GPUs.

Images are resized to a square `input_size` for the network and its prediction is
resized back to each image's own size, so maps keep their pixels one to one.
Semantic maps come from the queries as in Mask2Former's semantic inference:
per pixel, argmax over classes of Σ_q softmax(class_q) · sigmoid(mask_q).

Label maps hold class ids 0 (background) … C, 255 = ignore; the loss gives ignored pixels no
weight (mask_loss.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig, SwinConfig

from freemask.scoring.mask_loss import Mask2FormerWeights, mask2former_loss
from freemask.shared.errors import InvalidInput

PRESETS = ("tiny", "r50", "swin-b")
_STAGES = ["stage1", "stage2", "stage3", "stage4"]
# ImageNet statistics: the convention of every pretrained backbone a production
# init_from may come from; for random init any fixed values do.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def model_config(preset: str, num_labels: int, input_size: int) -> Mask2FormerConfig:
    """The Mask2Former config of a preset for `num_labels` classes (background included)."""
    if preset == "tiny":
        backbone = SwinConfig(image_size=input_size, patch_size=2, embed_dim=32, depths=[1, 1, 2, 1],
                              num_heads=[1, 2, 4, 8], window_size=4, out_features=_STAGES)
        return Mask2FormerConfig(
            backbone_config=backbone, num_labels=num_labels, num_queries=16, hidden_dim=64, mask_feature_size=64,
            feature_size=64, encoder_layers=2, decoder_layers=3, num_attention_heads=4, dim_feedforward=128,
            encoder_feedforward_dim=128, use_pretrained_backbone=False)
    if preset == "r50":
        backbone = ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                                layer_type="bottleneck", out_features=_STAGES)
    elif preset == "swin-b":
        backbone = SwinConfig(image_size=input_size, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                              window_size=12, out_features=_STAGES)
    else:
        raise InvalidInput(f"unknown segmenter preset {preset!r}; choose one of {', '.join(PRESETS)}")
    # transformers' Mask2Former defaults are the paper's: 100 queries, 256 wide, 6 + 10 layers.
    return Mask2FormerConfig(backbone_config=backbone, num_labels=num_labels, use_pretrained_backbone=False)


@dataclass(frozen=True)
class Batch:
    """Images and label maps resized to the network's input, ready for the loss."""

    pixels: torch.Tensor  # (B, 3, S, S) float, normalised
    labels: torch.Tensor  # (B, S, S) int64, 255 = ignore


class Segmenter:
    """A Mask2Former with the conventions around it: input size, normalisation, classes."""

    def __init__(self, model: Mask2FormerForUniversalSegmentation, class_names: Sequence[str], input_size: int,
                 device: torch.device | str = "cpu") -> None:
        if model.config.num_labels != len(class_names):
            raise InvalidInput(f"the model predicts {model.config.num_labels} classes but {len(class_names)} class "
                               "names were given")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.class_names = tuple(class_names)
        self.input_size = input_size
        self._mean = torch.tensor(_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(_STD, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def create(cls, preset: str, class_names: Sequence[str], input_size: int, seed: int,
               device: torch.device | str = "cpu") -> Segmenter:
        """Random initialisation, reproducible from `seed`."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Mask2FormerForUniversalSegmentation(model_config(preset, len(class_names), input_size))
        return cls(model, class_names, input_size, device)

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor], class_names: Sequence[str],
                   input_size: int, device: torch.device | str = "cpu") -> Segmenter:
        model = Mask2FormerForUniversalSegmentation(Mask2FormerConfig.from_dict(config))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise InvalidInput(f"segmenter weights do not fit their config: {len(missing)} missing "
                               f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        return cls(model.eval(), class_names, input_size, device)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def config_dict(self) -> dict[str, Any]:
        return self.model.config.to_dict()

    def state(self) -> dict[str, torch.Tensor]:
        """Weights as contiguous CPU tensors (what safetensors stores)."""
        return {name: tensor.detach().cpu().contiguous() for name, tensor in self.model.state_dict().items()}

    def to_input(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 (H, W, 3) images of any sizes -> (B, 3, S, S) normalised float (copies: decoded
        images are often read-only arrays)."""
        resized = [F.interpolate(torch.tensor(image).permute(2, 0, 1)[None].float(),
                                 size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
                   for image in images]
        pixels = torch.cat(resized).to(self.device) / 255.0
        return (pixels - self._mean) / self._std

    def label_input(self, labels: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 (H, W) label maps -> (B, S, S) int64, nearest neighbour (ids are not blended)."""
        resized = [F.interpolate(torch.tensor(label)[None, None].float(),
                                 size=(self.input_size, self.input_size), mode="nearest")[0, 0]
                   for label in labels]
        return torch.stack(resized).long().to(self.device)

    def loss(self, batch: Batch) -> torch.Tensor:
        """Mask2Former's total loss over every decoder layer: Hungarian-matched class, mask and dice
        terms, dense on the mask grid (mask_loss.py), ignored pixels left out."""
        output = self.model(pixel_values=batch.pixels, output_auxiliary_logits=True)
        layers = [*output.auxiliary_logits, {"masks_queries_logits": output.masks_queries_logits,
                                             "class_queries_logits": output.class_queries_logits}]
        return mask2former_loss([layer["masks_queries_logits"] for layer in layers],
                                [layer["class_queries_logits"] for layer in layers], batch.labels,
                                Mask2FormerWeights.of(self.model.config))

    @torch.no_grad()
    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One uint8 (H, W) class-id map per image, at the image's own size."""
        if not images:
            return []
        # A loaded segmenter stays in eval mode, so threads scoring with it at once never
        # flip its mode under one another; only a model in training is switched and back.
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            output = self.model(pixel_values=self.to_input(images))
        finally:
            if was_training:
                self.model.train()
        classes = output.class_queries_logits.softmax(-1)[..., :-1]  # the last logit is "no object"
        masks = output.masks_queries_logits.sigmoid()
        semantic = torch.einsum("bqc,bqhw->bchw", classes, masks)
        maps = []
        for scores, image in zip(semantic, images):
            full = F.interpolate(scores[None], size=image.shape[:2], mode="bilinear", align_corners=False)[0]
            maps.append(full.argmax(0).to(torch.uint8).cpu().numpy())
        return maps
