"""Train the RAIN harmonization network on reference-world lighting pairs, on CPU,
for a bounded time.

    python -m freemask.harmonization.train --out services/harmonization/weights/rain --minutes 10 --seed 0

A pair is one rendered scene twice (`freemask.world.render_lighting_pair`): its last
object lit like the scene (the target) and lit by a mismatched lighting (the input,
as if pasted from another photo), with the mask of every pixel the object touches.
The loss is the mean squared error over the masked pixels (the network changes
nothing else). Pairs are rendered once into a pool; held-out pairs from another
seed measure foreground MSE and PSNR every 200 steps, and the weights of the best
step are kept. Seeded; the log goes to `train_log.txt` beside the weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from freemask.harmonization.rain import RainConfig, RainNet, save_rain
from freemask.shared.training import BestWeights, set_cosine_learning_rate, training_main
from freemask.world import DEFAULT_WORLD, render_lighting_pair, sample_scene_spec

IMAGE_SIDE = 64
BATCH = 16
LEARNING_RATE = 1e-3


def lighting_pairs(seed: int, count: int, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(composites, masks, targets): (N, 3, S, S) in [-1, 1], (N, 1, S, S) in {0, 1}, (N, 3, S, S)."""
    rng = np.random.default_rng([seed, 31])
    composites, masks, targets = [], [], []
    with tqdm(total=count, desc="lighting pairs", unit="pair", disable=not progress) as bar:
        while len(composites) < count:
            spec = sample_scene_spec(rng, DEFAULT_WORLD, IMAGE_SIDE, n_objects=int(rng.integers(1, 4)))
            if not spec.objects:
                continue
            pair = render_lighting_pair(spec)
            if not pair.mask.any():
                continue
            composites.append(pair.composite)
            targets.append(pair.real)
            masks.append(pair.mask)
            bar.update()

    def images(stack: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(stack)).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    return images(composites), torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)), images(targets)


def masked_mse(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked pixels, per channel value, in [-1, 1] units."""
    return (((predicted - target) ** 2) * mask).sum() / (mask.sum() * predicted.shape[1])


def scores(predicted: torch.Tensor, masks: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Foreground MSE (0-255 scale, over masked pixels) and whole-image PSNR, averaged over images."""
    to_255 = 127.5
    errors = ((predicted - targets) * to_255) ** 2
    fmse = (errors * masks).sum(dim=(1, 2, 3)) / (masks.sum(dim=(1, 2, 3)) * 3)
    mse = errors.mean(dim=(1, 2, 3))
    psnr = 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))
    return {"fmse": float(fmse.mean()), "psnr": float(psnr.mean())}


@torch.no_grad()
def evaluate(net: RainNet, composites: torch.Tensor, masks: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    return scores(net(composites, masks), masks, targets)


def train(out: Path, minutes: float, seed: int, progress: bool = True) -> dict[str, float]:
    torch.manual_seed(seed)
    composites, masks, targets = lighting_pairs(seed, 6000, progress)
    held_out = lighting_pairs(seed + 1000, 256)
    net = RainNet(RainConfig())
    optimiser = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    budget = minutes * 60
    log = [json.dumps({"seed": seed, "minutes": minutes, "batch": BATCH, "lr": LEARNING_RATE, "pairs": len(composites),
                       "image_side": IMAGE_SIDE, "config": vars(net.config),
                       "held_out_copy_paste": scores(held_out[0], held_out[1], held_out[2])})]
    best = BestWeights(higher_is_better=False)
    step = 0
    started = time.perf_counter()
    bar = tqdm(total=int(budget), unit="s", disable=not progress, desc="train rain")
    while (elapsed := time.perf_counter() - started) < budget:
        set_cosine_learning_rate(optimiser, LEARNING_RATE, elapsed, budget)
        net.train()
        index = torch.randint(len(composites), (BATCH,), generator=generator)
        loss = masked_mse(net(composites[index], masks[index]), targets[index], masks[index])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step += 1
        if step % 200 == 0:
            net.eval()
            measured = evaluate(net, *held_out)
            log.append(json.dumps({"step": step, "seconds": round(elapsed, 1), "loss": round(float(loss), 6),
                                   **{k: round(v, 3) for k, v in measured.items()}}))
            best.offer(net, step, measured["fmse"])
            bar.set_postfix(fmse=round(measured["fmse"], 1), psnr=round(measured["psnr"], 2))
        bar.update(int(time.perf_counter() - started) - bar.n)
    bar.close()
    net.eval()
    kept, final = step, evaluate(net, *held_out)
    if best.restore_if_better(net, final["fmse"]):
        kept, final = best.step, evaluate(net, *held_out)
    summary = {"steps": step, "seconds": round(time.perf_counter() - started, 1), "kept_step": kept,
               **{k: round(v, 3) for k, v in final.items()}}
    log.append(json.dumps({"final": summary}))
    save_rain(net, out)
    (out / "train_log.txt").write_text("\n".join(log) + "\n", encoding="utf-8")
    return summary


def main() -> None:
    training_main(__doc__.split("\n\n")[0], train, default_minutes=10.0)


if __name__ == "__main__":
    main()
