"""The learned AffinityNet head: pair geometry, the balanced loss, dense affinities, storage,
and what the shipped weights know about the reference world's boundaries."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from freemask.attention_mask.affinity import (
    AffinityConfig,
    AffinityHead,
    affinity_head_version,
    affinity_loss,
    dense_affinity,
    learned_affinities,
    load_affinity_head,
    pair_offsets,
    save_affinity_head,
)
from freemask.attention_mask.affinity_train import train
from freemask.shared.errors import InvalidInput
from freemask.world import dataset


def test_pair_offsets_cover_each_unordered_neighbour_once() -> None:
    assert pair_offsets(1) == [(0, 1), (1, 0)]
    assert sorted(pair_offsets(1.5)) == [(0, 1), (1, -1), (1, 0), (1, 1)]
    for radius in (2.0, 4.0, 6.0):
        offsets = pair_offsets(radius)
        full_disk = sum(1 for dy in range(-6, 7) for dx in range(-6, 7) if 0 < dy * dy + dx * dx <= radius**2)
        assert len(offsets) * 2 == full_disk and len(set(offsets)) == len(offsets)
        assert all((-dy, -dx) not in offsets for dy, dx in offsets)


def test_dense_affinity_is_symmetric_one_on_the_diagonal_and_zero_beyond_the_radius() -> None:
    embedding = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(0))
    affinity = dense_affinity(embedding, radius=2.0)
    assert affinity.shape == (30, 30)
    assert torch.allclose(affinity, affinity.T) and torch.allclose(affinity.diagonal(), torch.ones(30))
    assert float(affinity.min()) >= 0.0 and float(affinity.max()) <= 1.0
    # (0, 0) and (0, 2) are 2 apart: an affinity; (0, 0) and (2, 1) are √5 apart: none.
    assert float(affinity[0, 2]) == pytest.approx(math.exp(-(embedding[:, 0, 0] - embedding[:, 0, 2]).abs().mean()))
    assert float(affinity[0, 2 * 6 + 1]) == 0.0


def test_the_loss_rewards_embeddings_that_split_object_from_background() -> None:
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 2:6, 2:6] = 3
    labels[0, 0, 0] = 255  # ignored
    separating = (labels == 3).float()[:, None].repeat(1, 4, 1, 1) * 30.0
    constant = torch.zeros(1, 4, 8, 8)
    good, bad = affinity_loss(separating, labels, 2.0), affinity_loss(constant, labels, 2.0)
    assert float(good) < 1e-3
    assert float(bad) == pytest.approx(-0.5 * math.log(1e-5), rel=1e-3)  # every boundary pair scored 1


def test_learned_affinities_average_a_larger_image_down_to_the_grid() -> None:
    head = AffinityHead(AffinityConfig(channels=8, embedding=4, radius=2.0)).eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    affinity = learned_affinities(head, images, (8, 8))
    assert affinity.shape == (2, 64, 64)
    with torch.no_grad():
        small = torch.nn.functional.interpolate(images * 2 - 1, size=(8, 8), mode="area")
        assert torch.allclose(affinity[1], dense_affinity(head(small)[1], 2.0))
    with pytest.raises(InvalidInput, match=r"\(B, 3, H, W\)"):
        learned_affinities(head, images[:, :2], (8, 8))


def test_training_saves_weights_that_load_and_carry_their_own_version(tmp_path: Path) -> None:
    config = AffinityConfig(channels=8, embedding=4, groups=2, radius=2.0)
    summary = train(tmp_path / "head", steps=3, seed=0, config=config, pool=8, batch_size=4, progress=False)
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    head = load_affinity_head(tmp_path / "head")
    assert head.config == config and not head.training
    assert "step 3 loss" in (tmp_path / "head" / "train_log.txt").read_text(encoding="utf-8")
    version = affinity_head_version(tmp_path / "head")
    with torch.no_grad():
        next(head.parameters()).add_(1.0)
    save_affinity_head(head, tmp_path / "head")
    assert affinity_head_version(tmp_path / "head") != version
    with pytest.raises(InvalidInput, match="no affinity head weights in .*missing config.json, affinity.safetensors"):
        load_affinity_head(tmp_path / "empty")


def test_the_shipped_head_separates_objects_from_their_background_on_unseen_scenes() -> None:
    """Validation-split scenes (the head trained on the train split): neighbour pairs inside one
    region must score high, pairs across an object's boundary low."""
    head = load_affinity_head()
    scenes = [dataset("val", index, 32) for index in range(48)]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255.0
    labels = torch.from_numpy(np.stack([s.label for s in scenes]).astype(np.int64)).flatten(1)
    affinity = learned_affinities(head, images, (32, 32))
    near = affinity > 0  # pairs within the radius
    same = labels[:, :, None] == labels[:, None, :]
    known = (labels != 255)[:, :, None] & (labels != 255)[:, None, :] & near
    inside, across = affinity[known & same].mean(), affinity[known & ~same].mean()
    assert float(inside) > 0.7 and float(across) < 0.2, (float(inside), float(across))
