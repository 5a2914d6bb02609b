"""Train FOPA on the reference world (eq. 7), on CPU, for a bounded time.

    python -m freemask.placement.train --out services/placement/weights/fopa --minutes 15 --seed 0

Each step draws a batch of (background, foreground) pairs with the world's legal
heatmaps as truth (`dataset.PairSampler`), and optimises eq. 7:
- eq. 6 on the sigmoid heatmap;
- eq. 4 between the box the heatmap points at (its heatmap-weighted mean box) and
  the legal cell nearest to it, for pairs that have a legal cell at all; the target
  is the nearest legal box rather than a random one, so several legal places do not
  pull the prediction to their average;
- eq. 5 between the model's predicted composite features and the background
  encoder's features of the true composite: the foreground pasted, by its mask, at
  that target box.
The aspect term of eq. 4 is computed, but both boxes carry the foreground's aspect
by construction (the heatmap ranges over position and scale only), so it is 0.

The weights kept are those of the step with the best rule rate on held-out pairs
(rendered from another seed), checked every 200 steps: the pools are finite, and
late steps can fit them at the expense of new pairs. Seeded; the log (steps,
losses, held-out rule rate, the step kept) goes to `train_log.txt` beside the weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from freemask.placement.dataset import Batch, PairSampler
from freemask.placement.geometry import SCALES, candidate_boxes, inside_image
from freemask.placement.losses import (
    LossWeights,
    box_iou,
    expected_box,
    heatmap_loss,
    semantic_loss,
    spatial_loss,
    total_loss,
)
from freemask.placement.model import FopaConfig, FopaNet, save_fopa
from freemask.shared.training import BestWeights, set_cosine_learning_rate, training_main

BATCH = 32
LEARNING_RATE = 2e-3
VALIDATION_PAIRS = 1024


def batch_boxes(batch: Batch) -> torch.Tensor:
    """(B, S, 32, 32, 4) normalised candidate boxes of each pair (they depend on its aspect)."""
    side = batch.backgrounds.shape[-1]
    return torch.from_numpy(np.stack([candidate_boxes(a, side, side) for a in batch.aspects])).float()


def nearest_legal_box(predicted: torch.Tensor, boxes: torch.Tensor, legal: torch.Tensor) -> torch.Tensor:
    """For each pair, the legal cell's box with the highest IoU with the predicted box."""
    b = boxes.shape[0]
    flat = boxes.reshape(b, -1, 4)
    ious = torch.stack([box_iou(predicted[i].expand(flat.shape[1], 4), flat[i]) for i in range(b)])
    ious = ious.masked_fill(~legal.reshape(b, -1), -1.0)
    return flat[torch.arange(b), ious.argmax(dim=1)]


def paste(backgrounds: torch.Tensor, foregrounds: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Composites: each letterboxed foreground scaled so the object fills its box, pasted by its mask."""
    centre = (boxes[:, :2] + boxes[:, 2:]) - 1.0  # in [-1, 1] grid units: 2·mid − 1
    longer = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])  # the letterbox's side
    theta = torch.zeros(len(boxes), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / longer
    theta[:, :, 2] = -centre / longer[:, None]
    grid = F.affine_grid(theta, list(backgrounds.shape), align_corners=False)
    placed = F.grid_sample(foregrounds, grid, align_corners=False)  # zeros outside the letterbox
    mask = placed[:, 3:4].clamp(0, 1)
    return backgrounds * (1 - mask) + placed[:, :3] * mask


def losses(net: FopaNet, batch: Batch) -> dict[str, torch.Tensor]:
    backgrounds = torch.from_numpy(batch.backgrounds)
    foregrounds = torch.from_numpy(batch.foregrounds)
    truth = torch.from_numpy(batch.heatmaps)
    out = net(backgrounds, foregrounds)
    heat = torch.sigmoid(out.logits)
    result = {"heatmap": heatmap_loss(heat, truth)}
    boxes = batch_boxes(batch)
    legal = truth > 0.5
    positive = legal.flatten(1).any(dim=1)
    if positive.any():
        valid = torch.from_numpy(inside_image(boxes.numpy()))
        predicted = expected_box(heat[positive] * valid[positive], boxes[positive])
        target = nearest_legal_box(predicted.detach(), boxes[positive], legal[positive])
        result["spatial"] = spatial_loss(predicted, target)
        with torch.no_grad():
            composite = paste(backgrounds[positive], foregrounds[positive], target)
            composite_features = net.encode_background(composite)[2]
        result["semantic"] = semantic_loss(out.semantic[positive], composite_features)
    else:
        result["spatial"] = result["semantic"] = torch.zeros(())
    result["total"] = total_loss(result["spatial"], result["semantic"], result["heatmap"], LossWeights())
    return result


@torch.no_grad()
def rule_rate(net: FopaNet, batch: Batch) -> float:
    """Share of pairs with a legal cell whose best in-image cell is legal (a cheap held-out check)."""
    heat = torch.sigmoid(net(torch.from_numpy(batch.backgrounds), torch.from_numpy(batch.foregrounds)).logits)
    valid = torch.from_numpy(inside_image(batch_boxes(batch).numpy()))
    legal = torch.from_numpy(batch.heatmaps > 0.5)
    positive = legal.flatten(1).any(dim=1)
    best = heat.masked_fill(~valid, -1.0).flatten(1).argmax(dim=1)
    hits = legal.flatten(1)[torch.arange(len(best)), best]
    return float(hits[positive].float().mean())


def train(out: Path, minutes: float, seed: int, progress: bool = True) -> dict[str, float]:
    torch.manual_seed(seed)
    sampler = PairSampler(seed, backgrounds_per_name=800, foregrounds_per_class=1000, progress=progress)
    validation = PairSampler(seed + 1000, backgrounds_per_name=60, foregrounds_per_class=60).batch(VALIDATION_PAIRS)
    net = FopaNet(FopaConfig())
    optimiser = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    budget = minutes * 60
    started = time.perf_counter()
    log: list[str] = [json.dumps({"seed": seed, "minutes": minutes, "batch": BATCH, "lr": LEARNING_RATE,
                                  "scales": [round(s, 4) for s in SCALES], "config": vars(net.config)})]
    step = 0
    best = BestWeights(higher_is_better=True)
    bar = tqdm(total=int(budget), unit="s", disable=not progress, desc="train fopa")
    while (elapsed := time.perf_counter() - started) < budget:
        set_cosine_learning_rate(optimiser, LEARNING_RATE, elapsed, budget)
        net.train()
        parts = losses(net, sampler.batch(BATCH))
        optimiser.zero_grad(set_to_none=True)
        parts["total"].backward()
        optimiser.step()
        step += 1
        if step % 200 == 0:
            net.eval()
            entry = {"step": step, "seconds": round(elapsed, 1),
                     **{k: round(float(v), 5) for k, v in parts.items()},
                     "val_rule_rate": round(rule_rate(net, validation), 4)}
            log.append(json.dumps(entry))
            best.offer(net, step, entry["val_rule_rate"])
            bar.set_postfix(loss=entry["total"], rule=entry["val_rule_rate"])
        bar.update(int(time.perf_counter() - started) - bar.n)
    bar.close()
    net.eval()
    kept, final_rate = step, rule_rate(net, validation)
    if best.restore_if_better(net, final_rate):
        kept, final_rate = best.step, best.score
    final = {"steps": step, "seconds": round(time.perf_counter() - started, 1), "kept_step": kept,
             "val_rule_rate": round(final_rate, 4)}
    log.append(json.dumps({"final": final}))
    save_fopa(net, out)
    (out / "train_log.txt").write_text("\n".join(log) + "\n", encoding="utf-8")
    return final


def main() -> None:
    training_main(__doc__.split("\n\n")[0], train, default_minutes=15.0)


if __name__ == "__main__":
    main()
