"""Train the affinity head on the reference world's train split (exact label maps).

    python -m freemask.attention_mask.affinity_train --out DIR --steps 2500 --seed 0

Scenes ``dataset("train", i)`` for ``i < pool`` are rendered once into memory; each step
draws a seeded batch, flips half of it left–right, and minimises AffinityNet's balanced
pair loss (`affinity.affinity_loss`). The run stops after a fixed number of steps, so the
weights depend only on the seed and the arguments, not on the machine's speed. The loss
goes to `train_log.txt` in DIR beside the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from freemask.attention_mask.affinity import (
    DEFAULT_WEIGHTS_DIR,
    AffinityConfig,
    AffinityHead,
    affinity_loss,
    save_affinity_head,
)
from freemask.shared.small_models import training_log
from freemask.world import dataset

log = logging.getLogger("freemask.affinity.train")


def render_training_set(pool: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool, 3, S, S) images in [-1, 1] and (pool, S, S) label maps of the world's train split."""
    scenes = [dataset("train", index, image_size) for index in range(pool)]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    labels = torch.from_numpy(np.stack([s.label for s in scenes]).astype(np.int64))
    return images, labels


def train(out: Path, steps: int, seed: int, config: AffinityConfig = AffinityConfig(), pool: int = 4000,
          image_size: int = 32, batch_size: int = 32, lr: float = 3e-3, threads: int = 2,
          progress: bool = True) -> dict[str, float]:
    """Train, save into `out`, and return a summary (steps, minutes, final loss)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    with training_log(log, out):
        images, labels = render_training_set(pool, image_size)
        head = AffinityHead(config)
        optimiser = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
        log.info("config %s", json.dumps({"head": config.__dict__, "steps": steps, "seed": seed, "pool": pool,
                                          "image_size": image_size, "batch_size": batch_size, "lr": lr}))
        start, window, logged_loss = time.perf_counter(), [], float("nan")
        head.train()
        for step in tqdm(range(1, steps + 1), disable=not progress, desc="affinity", unit="step"):
            index = torch.from_numpy(rng.integers(0, len(images), batch_size))
            flip = torch.from_numpy(rng.random(batch_size) < 0.5)
            x = torch.where(flip[:, None, None, None], images[index].flip(-1), images[index])
            y = torch.where(flip[:, None, None], labels[index].flip(-1), labels[index])
            loss = affinity_loss(head(x), y, config.radius)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            window.append(loss.item())
            if step % 100 == 0 or step == steps:
                logged_loss = float(np.mean(window))
                log.info("step %d loss %.4f elapsed_min %.2f", step, logged_loss, (time.perf_counter() - start) / 60)
                window = []
        head.eval()
        save_affinity_head(head, out)
        summary = {"steps": steps, "train_minutes": round((time.perf_counter() - start) / 60, 2),
                   "final_loss": round(logged_loss, 4)}
        log.info("done %s", json.dumps(summary))
        return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS_DIR)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", type=int, default=4000, help="train-split scenes rendered into memory")
    args = parser.parse_args(argv)
    print(json.dumps(train(args.out, args.steps, args.seed, pool=args.pool)))


if __name__ == "__main__":
    main()
