"""Train the RAIN harmonization network on reference-world lighting pairs, on CPU,
for a bounded time.

    python -m freemask.harmonization.train --out services/harmonization/weights/rain --minutes 10 --seed 0

A pair is one rendered scene twice (`freemask.world.render_lighting_pair`): its last
object lit like the scene (the target) and lit by another lighting (the input, as if
pasted from another picture), with the mask of every pixel the object touches. The
other lighting is one of two kinds (`OBJECT_LIGHTINGS`):

- **mismatched**: clearly unlike the scene's (`sample_mismatched_lighting`), the
  classic harmonization case of an object shot under other light;
- **independent**: another scene's plausible lighting (`sample_lighting`). This is
  what the pipeline pastes: a generated object into another generated scene, both lit
  as the world lights scenes, so the two are often close and the right correction is
  often small. A network that only ever saw the first kind corrected every object as
  if its lighting were far off: on pairs of this kind it left as much error on the
  object as copy-paste, and more over the image (bench_harmonization measures both).

The pool holds both kinds at both `TRAINING_SIDES`, and each step draws a batch of one
side. The loss is the mean squared error over the masked pixels (the network changes
nothing else). Pairs are rendered once into a pool; held-out pairs of every side and
kind, from another seed, measure foreground MSE and PSNR every 200 steps, and the
weights of the step with the lowest mean foreground MSE are kept. Seeded; the log goes
to `train_log.txt` beside the weights.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from freemask.harmonization.rain import RainConfig, RainNet, save_rain
from freemask.shared.errors import InvalidInput
from freemask.shared.training import BestWeights, set_cosine_learning_rate, training_main
from freemask.world import DEFAULT_WORLD, render_lighting_pair, sample_lighting, sample_scene_spec

IMAGE_SIDE = 64  # rendered reference scenes
TRAINING_SIDES = (32, IMAGE_SIDE)  # generated single objects, which the pipeline pastes, are 32 px
OBJECT_LIGHTINGS = ("mismatched", "independent")
POOL_PAIRS = 6000  # split evenly over sides and kinds
HELD_OUT_PAIRS = 128  # per side and kind
BATCH = 16
LEARNING_RATE = 1e-3

Pairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def lighting_pairs(seed: int, count: int, side: int = IMAGE_SIDE, object_lighting: str = "mismatched",
                   progress: bool = False) -> Pairs:
    """(composites, masks, targets): (N, 3, S, S) in [-1, 1], (N, 1, S, S) in {0, 1}, (N, 3, S, S);
    the pasted object lit by an `object_lighting` lighting (one of `OBJECT_LIGHTINGS`)."""
    if object_lighting not in OBJECT_LIGHTINGS:
        raise InvalidInput(f"object_lighting must be one of {OBJECT_LIGHTINGS}, got {object_lighting!r}")
    rng = np.random.default_rng([seed, 31, side, OBJECT_LIGHTINGS.index(object_lighting)])
    composites, masks, targets = [], [], []
    with tqdm(total=count, desc=f"lighting pairs ({side} px, {object_lighting})", unit="pair",
              disable=not progress) as bar:
        while len(composites) < count:
            spec = sample_scene_spec(rng, DEFAULT_WORLD, side, n_objects=int(rng.integers(1, 4)))
            if not spec.objects:
                continue
            # None lets render_lighting_pair draw a clearly mismatched lighting from the spec's seed
            lighting = sample_lighting(rng) if object_lighting == "independent" else None
            pair = render_lighting_pair(spec, lighting)
            if not pair.mask.any():
                continue
            composites.append(pair.composite)
            targets.append(pair.real)
            masks.append(pair.mask)
            bar.update()

    def images(stack: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(stack)).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    return images(composites), torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)), images(targets)


def pair_sets(seed: int, count: int, progress: bool = False) -> dict[str, Pairs]:
    """`count` pairs of each side and kind, by name ("32px_independent", ...)."""
    return {f"{side}px_{kind}": lighting_pairs(seed, count, side, kind, progress)
            for side, kind in itertools.product(TRAINING_SIDES, OBJECT_LIGHTINGS)}


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
def evaluate(net: RainNet, held_out: dict[str, Pairs]) -> dict[str, object]:
    """Each held-out set's fMSE and PSNR, and `fmse`: their mean fMSE, which picks the kept step."""
    net.eval()
    by_set = {name: {key: round(value, 3) for key, value in scores(net(composites, masks), masks, targets).items()}
              for name, (composites, masks, targets) in held_out.items()}
    return {"fmse": round(statistics.mean(measured["fmse"] for measured in by_set.values()), 3), "by_set": by_set}


def train(out: Path, minutes: float, seed: int, progress: bool = True) -> dict[str, object]:
    torch.manual_seed(seed)
    per_set = POOL_PAIRS // (len(TRAINING_SIDES) * len(OBJECT_LIGHTINGS))
    # one pool per side (a batch holds one size), both lighting kinds mixed in it
    pools = {side: tuple(torch.cat(parts) for parts in zip(*(lighting_pairs(seed, per_set, side, kind, progress)
                                                               for kind in OBJECT_LIGHTINGS)))
             for side in TRAINING_SIDES}
    held_out = pair_sets(seed + 1000, HELD_OUT_PAIRS)
    net = RainNet(RainConfig())
    optimiser = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    budget = minutes * 60
    log = [json.dumps({"seed": seed, "minutes": minutes, "batch": BATCH, "lr": LEARNING_RATE,
                       "pairs": sum(len(pool[0]) for pool in pools.values()), "sides": TRAINING_SIDES,
                       "object_lightings": OBJECT_LIGHTINGS, "config": vars(net.config),
                       "held_out_copy_paste": {name: scores(*pairs) for name, pairs in held_out.items()}})]
    best = BestWeights(higher_is_better=False)
    step = 0
    started = time.perf_counter()
    bar = tqdm(total=int(budget), unit="s", disable=not progress, desc="train rain")
    while (elapsed := time.perf_counter() - started) < budget:
        set_cosine_learning_rate(optimiser, LEARNING_RATE, elapsed, budget)
        net.train()
        composites, masks, targets = pools[TRAINING_SIDES[step % len(TRAINING_SIDES)]]
        index = torch.randint(len(composites), (BATCH,), generator=generator)
        loss = masked_mse(net(composites[index], masks[index]), targets[index], masks[index])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step += 1
        if step % 200 == 0:
            measured = evaluate(net, held_out)
            log.append(json.dumps({"step": step, "seconds": round(elapsed, 1), "loss": round(float(loss), 6),
                                   **measured}))
            best.offer(net, step, measured["fmse"])
            bar.set_postfix(fmse=measured["fmse"])
        bar.update(int(time.perf_counter() - started) - bar.n)
    bar.close()
    kept, final = step, evaluate(net, held_out)
    if best.restore_if_better(net, final["fmse"]):
        kept, final = best.step, evaluate(net, held_out)
    summary = {"steps": step, "seconds": round(time.perf_counter() - started, 1), "kept_step": kept, **final}
    log.append(json.dumps({"final": summary}))
    save_rain(net, out)
    (out / "train_log.txt").write_text("\n".join(log) + "\n", encoding="utf-8")
    return summary


def main() -> None:
    training_main(__doc__.split("\n\n")[0], train, default_minutes=10.0)


if __name__ == "__main__":
    main()
