"""Train the small generator on rendered reference-world scenes, for a number of steps within a wall-clock budget.

    python -m freemask.attention_mask.generator.train --out DIR --max-steps 8000 --minutes 120 --seed 0

Data: a pool of train-split-style scenes rendered once into memory (the world
renders ~200 scenes/s per core, far cheaper than re-rendering every batch),
mostly single-object scenes because the attention masks later want one object
per image (each the largest of a few legal draws of its class, so objects are
big enough to learn at 32 px), with some multi-object scenes for caption
variety. The loss is min-SNR-weighted. Each scene is
paired with its own caption; 10 % of captions are replaced by the empty prompt
so classifier-free guidance has an unconditional model to contrast with.

The run is seeded (pool, init, batches, noise). It stops after `--max-steps` steps, or
earlier when `--minutes` run out: only a run that stops on its step count gives weights
that do not depend on the machine's speed, so the log says which it was.
The loss and steps/s go to `train_log.txt` in DIR; the EMA weights are saved
there in diffusers layout every few minutes and at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import multiprocessing
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from freemask.attention_mask.generator.model import (
    WEIGHTS_DIR,
    GeneratorConfig,
    build_pipeline,
    build_training_scheduler,
    count_parameters,
)
from freemask.attention_mask.generator.pipeline import FreeMaskTextToImagePipeline
from freemask.attention_mask.generator.tokenizer import world_vocabulary
from freemask.shared.small_models import training_log
from freemask.world import DEFAULT_WORLD, SceneSpec, render_scene, sample_scene_spec

log = logging.getLogger("freemask.generator.train")
CAPTION_DROPOUT = 0.10
SINGLE_OBJECT_FRACTION = 0.85
SIZE_DRAWS = 3
# Min-SNR-gamma loss weighting (Hang et al., ICCV 2023): low-noise steps, which only polish
# detail, are down-weighted so the few thousand steps a CPU affords go to layout and class.
MIN_SNR_GAMMA = 5.0
POOL_SEED_TAG = 0x6E4E  # keeps the pool's scene seeds apart from the world's own split seeds


def _larger_single_object(rng: np.random.Generator, image_size: int) -> SceneSpec:
    """A one-object scene whose object is the largest of a few legal draws of the same class and background.

    At 32 px the world's median object covers 6 % of the image (a bird 1.5 %), and a
    generator trained on them drew many objects too small to recognise; taking the
    largest of `SIZE_DRAWS` boxes shifts each class toward the top of its own legal
    size range without changing which classes appear where.
    """
    first = sample_scene_spec(rng, DEFAULT_WORLD, image_size, n_objects=1)
    if not first.objects:
        return first
    draws = [first] + [sample_scene_spec(rng, DEFAULT_WORLD, image_size, background=first.background, n_objects=1,
                                         main_class=first.objects[0].cls) for _ in range(SIZE_DRAWS - 1)]
    return max(draws, key=lambda spec: sum((o.box[2] - o.box[0]) * (o.box[3] - o.box[1]) for o in spec.objects))


def _render_chunk(args: tuple[int, int, int, int]) -> tuple[np.ndarray, list[str]]:
    seed, start, stop, image_size = args
    images, captions = [], []
    for i in range(start, stop):
        rng = np.random.default_rng([POOL_SEED_TAG, seed, i])
        if rng.random() < SINGLE_OBJECT_FRACTION:
            spec = _larger_single_object(rng, image_size)
        else:
            spec = sample_scene_spec(rng, DEFAULT_WORLD, image_size)
        scene = render_scene(spec)
        images.append(scene.image)
        captions.append(scene.caption)
    return np.stack(images), captions


def render_pool(size: int, image_size: int, seed: int, workers: int = 2) -> tuple[np.ndarray, list[str]]:
    """`size` scenes and captions; scene i depends only on (seed, i), so any worker count gives the same pool."""
    bounds = np.linspace(0, size, max(1, workers) * 8 + 1).astype(int)
    jobs = [(seed, int(a), int(b), image_size) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_render_chunk, jobs)
    else:
        parts = [_render_chunk(j) for j in jobs]
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]


class Ema:
    """Exponential moving average of the UNet and encoder weights, with the usual warm-up of the decay."""

    def __init__(self, modules: Sequence[torch.nn.Module], decay: float = 0.999) -> None:
        self.decay = decay
        self.shadow = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
        self.steps = 0

    @torch.no_grad()
    def update(self, modules: Sequence[torch.nn.Module]) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for shadow, live in zip(self.shadow, modules):
            for s, p in zip(shadow.parameters(), live.parameters()):
                s.lerp_(p.detach(), 1.0 - d)


def _save(pipe: FreeMaskTextToImagePipeline, ema: Ema, out: Path) -> None:
    saved = FreeMaskTextToImagePipeline(unet=ema.shadow[0], text_encoder=ema.shadow[1], tokenizer=pipe.tokenizer,
                                        scheduler=pipe.scheduler)
    saved.save_pretrained(out)


def train(out: Path, minutes: float, seed: int, config: GeneratorConfig = GeneratorConfig(), batch_size: int = 32,
          lr: float = 5e-4, pool_size: int = 16_000, workers: int = 2, threads: int = 2,
          save_every_minutes: float = 5.0, max_steps: int | None = None,
          progress: bool = True) -> dict[str, float | str]:
    """Train and save into `out`; returns a summary (steps, minutes, final loss, steps/s and what stopped it)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    with training_log(log, out):
        t0 = time.perf_counter()
        images, captions = render_pool(pool_size, config.image_size, seed, workers)
        log.info("rendered %d scenes at %d px in %.1f s", len(images), config.image_size, time.perf_counter() - t0)
        pipe = build_pipeline(config, world_vocabulary(extra_texts=captions))
        unet, encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
        ids = pipe.tokenize(captions)
        empty_ids = pipe.tokenize([""])[0]
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8, scaled per batch
        noise_sched = build_training_scheduler()
        alphas = noise_sched.alphas_cumprod
        params = list(unet.parameters()) + list(encoder.parameters())
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
        warmup = 200
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        ema = Ema([unet, encoder])
        n_params = count_parameters(pipe)
        log.info("config %s", json.dumps({**config.as_dict(), "batch_size": batch_size, "lr": lr, "seed": seed,
                                          "minutes": minutes, "max_steps": max_steps, "pool_size": pool_size,
                                          "params": n_params,
                                          "caption_dropout": CAPTION_DROPOUT, "vocab_size": len(tokenizer),
                                          "size_draws": SIZE_DRAWS, "min_snr_gamma": MIN_SNR_GAMMA}))
        unet.train()
        encoder.train()
        budget = minutes * 60.0
        start = time.perf_counter()
        last_save = start
        step, window, window_start, window_steps = 0, [], start, 0
        loss_value = math.nan
        bar = tqdm(total=int(budget), unit="s", disable=not progress, desc="train")
        while time.perf_counter() - start < budget and (max_steps is None or step < max_steps):
            idx = torch.from_numpy(rng.integers(0, len(pixels), batch_size))
            x0 = pixels[idx].float() / 127.5 - 1.0
            flip = torch.from_numpy(rng.random(batch_size) < 0.5)
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            tok = ids[idx].clone()
            tok[torch.from_numpy(rng.random(batch_size) < CAPTION_DROPOUT)] = empty_ids
            t = torch.from_numpy(rng.integers(0, noise_sched.config.num_train_timesteps, batch_size))
            noise = torch.randn_like(x0)
            a = alphas[t].float().sqrt()[:, None, None, None]
            s = (1.0 - alphas[t].float()).sqrt()[:, None, None, None]
            pred = unet(a * x0 + s * noise, t, encoder_hidden_states=encoder(tok)[0]).sample
            snr = alphas[t].float() / (1.0 - alphas[t].float())
            per_image = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
            loss = (per_image * snr.clamp(max=MIN_SNR_GAMMA) / snr).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            ema.update([unet, encoder])
            step += 1
            window.append(loss.item())
            window_steps += 1
            now = time.perf_counter()
            if step % 50 == 0:
                loss_value = float(np.mean(window))
                rate = window_steps / (now - window_start)
                log.info("step %d loss %.4f steps/s %.2f elapsed_min %.2f", step, loss_value, rate, (now - start) / 60)
                bar.set_postfix(step=step, loss=f"{loss_value:.4f}", sps=f"{rate:.2f}")
                window, window_start, window_steps = [], now, 0
            bar.n = min(int(now - start), int(budget))
            bar.refresh() if step % 10 == 0 else None
            if now - last_save > save_every_minutes * 60:
                _save(pipe, ema, out)
                last_save = time.perf_counter()
        bar.close()
        if window:
            loss_value = float(np.mean(window))
        elapsed = (time.perf_counter() - start) / 60
        _save(pipe, ema, out)
        summary = {"steps": step, "train_minutes": round(elapsed, 2), "final_loss": round(loss_value, 4),
                   "steps_per_s": round(step / max(elapsed * 60, 1e-9), 3),
                   "stopped_on": "max_steps" if max_steps is not None and step >= max_steps else "minutes"}
        log.info("done %s", json.dumps(summary))
        return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="output folder (diffusers layout)")
    parser.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget of the training loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--pool-size", type=int, default=16_000, help="scenes rendered into memory")
    parser.add_argument("--max-steps", type=int, default=None)
    args = parser.parse_args(argv)
    summary = train(args.out, args.minutes, args.seed, GeneratorConfig(image_size=args.image_size),
                    batch_size=args.batch_size, lr=args.lr, pool_size=args.pool_size, max_steps=args.max_steps)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
