"""Generator benchmark: is the shipped small generator drawing the class and background it was asked for?

    .venv/bin/python tests/benchmarks/bench_generator.py [--weights DIR] [--per-class 12] [--sampling-sweep]

A small CNN, the judge, is trained on rendered single-object world scenes to
name the object's class and the background, and on rendered empty backgrounds,
for which its answer is "no object" (shipped as instruments/generator_judge.safetensors,
and trained in the run instead where that file no longer matches this code and
world; see instruments.py; --ship-judge rewrites it). It then labels images
the shipped generator draws from "a photo of a {class} {place}" prompts:
recognisability of class c is the fraction of c's images it labels c;
background accuracy is the fraction whose background it labels as prompted.
Without the "no object" answer an empty sky had to be named a bird or an
aeroplane, the only classes seen there, and a generator that drew nothing
was credited for it; `no_object` reports how often each class came out empty.
Its own accuracy on held-out rendered validation scenes is reported beside
them, because a generated image can be no more recognisable than the judge
is accurate. Writes tests/benchmarks/results/generator.json and the sample
grid generator_samples.png (one row per class).

With --sampling-sweep it instead draws the same prompts and seeds at each
(guidance, eta) of SAMPLING_SWEEP, judged by one judge so the settings compare
fairly (two judges differ by a few points on the same images), and writes
tests/benchmarks/results/generator_sampling.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from freemask.attention_mask.generator import WEIGHTS_DIR, FreeMaskTextToImagePipeline
from freemask.world import (
    DEFAULT_WORLD,
    DRAWABLE_BACKGROUNDS,
    DRAWABLE_CLASSES,
    SceneSpec,
    allowed_backgrounds,
    dataset,
    render_scene,
    sample_lighting,
    sample_scene_spec,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared results_files
from instruments import Recipe, obtain, ship  # noqa: E402
from results_files import git_commit, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0
# The natural way the world's captions place an object on each background.
PLACES = {"sky": "in the sky", "sea": "on the sea", "road": "on the road", "grass": "on the grass",
          "field": "in a field", "room": "in a room", "rail": "on the railway"}


JUDGE_SEED_TAG = 0x1D6E  # the judge's scenes are apart from the generator's training pool
NO_OBJECT = "no object"  # the judge's answer for a picture of a background alone
JUDGE_CLASSES = (*DRAWABLE_CLASSES, NO_OBJECT)
EMPTY_EVERY = len(JUDGE_CLASSES)  # one scene in this many is a background alone: as common as each class
VAL_EMPTY_SCENES = 100
EMPTY_VAL_TAG = 0xE3  # keeps the held-out empty scenes apart from the training ones
# (guidance scale, DDIM eta) pairs for --sampling-sweep; the first is the default
SAMPLING_SWEEP = ((3.0, 1.0), (1.5, 1.0), (6.0, 1.0), (9.0, 1.0), (3.0, 0.0), (6.0, 0.0))


def empty_scene(rng: np.random.Generator, image_size: int) -> SceneSpec:
    """A background alone, with the lighting variation of a real scene."""
    background = DRAWABLE_BACKGROUNDS[int(rng.integers(len(DRAWABLE_BACKGROUNDS)))]
    return SceneSpec(background, (), image_size, int(rng.integers(2**31)), sample_lighting(rng))


def _render_single(args: tuple[int, int, int, int]) -> tuple[np.ndarray, list[str], list[str]]:
    seed, start, stop, image_size = args
    images, classes, backgrounds = [], [], []
    for i in range(start, stop):
        rng = np.random.default_rng([JUDGE_SEED_TAG, seed, i])
        if i % EMPTY_EVERY == 0:
            scene = render_scene(empty_scene(rng, image_size))
            classes.append(NO_OBJECT)
        else:
            scene = render_scene(sample_scene_spec(rng, DEFAULT_WORLD, image_size, n_objects=1))
            if len(scene.objects) != 1:
                continue
            classes.append(scene.objects[0].cls)
        images.append(scene.image)
        backgrounds.append(scene.background)
    return np.stack(images), classes, backgrounds


def render_pool_single(size: int, image_size: int, seed: int, workers: int = 2
                       ) -> tuple[np.ndarray, list[str], list[str]]:
    """Single-object scenes and empty ones, with their class and background, rendered on `workers` processes."""
    bounds = np.linspace(0, size, workers * 4 + 1).astype(int)
    jobs = [(seed, int(a), int(b), image_size) for a, b in zip(bounds[:-1], bounds[1:])]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.map(_render_single, jobs)
    return (np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]],
            [b for p in parts for b in p[2]])


class Judge(nn.Module):
    """A small CNN with two heads: object class (or no object) and background."""

    def __init__(self, n_classes: int, n_backgrounds: int) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.Dropout(0.2))
        self.cls_head = nn.Linear(128, n_classes)
        self.bg_head = nn.Linear(128, n_backgrounds)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.cls_head(h), self.bg_head(h)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def judge_recipe(size: int, image_size: int, steps: int, seed: int) -> Recipe:
    """The judge's training, for telling whether the shipped judge is the one these settings train."""
    return Recipe("generator_judge", {"train_images": size, "image_size": image_size, "steps": steps, "seed": seed,
                                      "classes": list(JUDGE_CLASSES), "backgrounds": list(DRAWABLE_BACKGROUNDS),
                                      "seed_tag": JUDGE_SEED_TAG, "empty_every": EMPTY_EVERY},
                  (Judge, train_judge, render_pool_single, _render_single, empty_scene, to_tensor),
                  sample=lambda: _render_single((seed, 0, 32, image_size))[:1],
                  build=lambda: Judge(len(JUDGE_CLASSES), len(DRAWABLE_BACKGROUNDS)),
                  train=functools.partial(train_judge, size, image_size, steps, seed))


def train_judge(size: int, image_size: int, steps: int, seed: int) -> Judge:
    images, classes, backgrounds = render_pool_single(size, image_size, seed)
    x = to_tensor(images)
    yc = torch.tensor([JUDGE_CLASSES.index(c) for c in classes])
    yb = torch.tensor([DRAWABLE_BACKGROUNDS.index(b) for b in backgrounds])
    torch.manual_seed(seed)
    judge = Judge(len(JUDGE_CLASSES), len(DRAWABLE_BACKGROUNDS))
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-3)
    rng = np.random.default_rng(seed)
    judge.train()
    # A step count, not a time budget: the same judge on every machine, however fast
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(x), 64))
        xb = x[idx]
        xb = torch.where(torch.from_numpy(rng.random(64) < 0.5)[:, None, None, None], xb.flip(-1), xb)
        lc, lb = judge(xb)
        loss = F.cross_entropy(lc, yc[idx]) + F.cross_entropy(lb, yb[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return judge.eval()


def judge_accuracy(judge: Judge, image_size: int, seed: int) -> dict[str, float]:
    """Held-out check on the fixed validation split (single-object scenes only), and on
    empty backgrounds drawn apart from the training ones."""
    val = [dataset("val", i, image_size) for i in range(500)]
    val = [s for s in val if len(s.objects) == 1]
    pc, pb = predict(judge, np.stack([s.image for s in val]))
    acc_c = float(np.mean([JUDGE_CLASSES[p] == s.objects[0].cls for p, s in zip(pc, val)]))
    acc_b = float(np.mean([DRAWABLE_BACKGROUNDS[p] == s.background for p, s in zip(pb, val)]))
    empty_rngs = (np.random.default_rng([JUDGE_SEED_TAG, seed, EMPTY_VAL_TAG, i]) for i in range(VAL_EMPTY_SCENES))
    empty = np.stack([render_scene(empty_scene(rng, image_size)).image for rng in empty_rngs])
    acc_empty = float(np.mean(predict(judge, empty)[0] == JUDGE_CLASSES.index(NO_OBJECT)))
    return {"judge_val_class_accuracy": round(acc_c, 4), "judge_val_background_accuracy": round(acc_b, 4),
            "judge_val_scenes": len(val), "judge_empty_accuracy": round(acc_empty, 4),
            "judge_empty_scenes": VAL_EMPTY_SCENES}


@torch.no_grad()
def predict(judge: Judge, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    outs = [judge(to_tensor(images[i:i + 256])) for i in range(0, len(images), 256)]
    return (torch.cat([o[0] for o in outs]).argmax(1).numpy(), torch.cat([o[1] for o in outs]).argmax(1).numpy())


def train_minutes(weights: Path) -> float | None:
    log = (weights / "train_log.txt").read_text(encoding="utf-8") if (weights / "train_log.txt").exists() else ""
    m = re.findall(r"done (\{.*\})", log)
    return json.loads(m[-1])["train_minutes"] if m else None


def prompts_for(per_class: int) -> list[tuple[str, str, str]]:
    """(class, background, prompt), cycling each class over its plausible backgrounds."""
    out = []
    for cls in DRAWABLE_CLASSES:
        bgs = allowed_backgrounds(cls)
        for k in range(per_class):
            bg = bgs[k % len(bgs)]
            out.append((cls, bg, f"a photo of a {cls} {PLACES[bg]}"))
    return out


@dataclass(frozen=True)
class Verdict:
    """What the judge made of one setting's images."""

    images: np.ndarray
    recognisability: dict[str, float]  # class -> share of its images named as it
    no_object: dict[str, float]  # class -> share of its images in which the judge saw nothing
    background_accuracy: float
    generation_seconds: float

    def summary(self) -> dict[str, Any]:
        return {"recognisability_mean": mean_of(self.recognisability), "per_class": self.recognisability,
                "no_object_mean": mean_of(self.no_object), "no_object": self.no_object,
                "background_accuracy": round(self.background_accuracy, 4)}


def mean_of(per_class: dict[str, float]) -> float:
    return round(float(np.mean(list(per_class.values()))), 4)


def draw_and_judge(pipe: FreeMaskTextToImagePipeline, judge: Judge, jobs: list[tuple[str, str, str]], steps: int,
                   guidance: float, eta: float | None = None) -> Verdict:
    """Draw every job's prompt (seed = its index) and judge the images."""
    t0 = time.perf_counter()
    images = np.concatenate([
        pipe([p for _, _, p in jobs[i:i + 64]], num_inference_steps=steps, guidance_scale=guidance, eta=eta,
             seed=[SEED * 100_000 + j for j in range(i, min(i + 64, len(jobs)))]).images
        for i in range(0, len(jobs), 64)])
    seconds = time.perf_counter() - t0
    pc, pb = predict(judge, images)

    def share(cls: str, answer: str) -> float:
        return round(float(np.mean([JUDGE_CLASSES[p] == answer for p, (c, _, _) in zip(pc, jobs) if c == cls])), 4)

    return Verdict(images, {cls: share(cls, cls) for cls in DRAWABLE_CLASSES},
                   {cls: share(cls, NO_OBJECT) for cls in DRAWABLE_CLASSES},
                   float(np.mean([DRAWABLE_BACKGROUNDS[p] == b for p, (_, b, _) in zip(pb, jobs)])), seconds)


def save_grid(images: np.ndarray, jobs: list[tuple[str, str, str]], per_class: int, path: Path, cols: int = 8,
              scale: int = 2) -> None:
    size = images.shape[1] * scale
    label_w = 70
    grid = Image.new("RGB", (label_w + cols * size, len(DRAWABLE_CLASSES) * size), "white")
    draw = ImageDraw.Draw(grid)
    for r, cls in enumerate(DRAWABLE_CLASSES):
        draw.text((4, r * size + size // 2 - 5), cls, fill="black")
        for c in range(min(cols, per_class)):
            im = Image.fromarray(images[r * per_class + c]).resize((size, size), Image.NEAREST)
            grid.paste(im, (label_w + c * size, r * size))
    grid.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per image")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--judge-images", type=int, default=8000)
    parser.add_argument("--judge-steps", type=int, default=1000, help="the judge's optimiser steps of 64 images")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--ship-judge", action="store_true",
                        help="train the judge and write it under instruments/ for later runs, then stop")
    parser.add_argument("--sampling-sweep", action="store_true",
                        help="judge every (guidance, eta) of SAMPLING_SWEEP instead; writes generator_sampling.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    pipe = FreeMaskTextToImagePipeline.from_pretrained(args.weights)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.default_size
    recipe = judge_recipe(args.judge_images, size, args.judge_steps, SEED)
    if args.ship_judge:
        print(f"wrote {ship(recipe)}")
        return
    judge, judge_source = obtain(recipe)
    judge_stats = {**judge_accuracy(judge, size, SEED), "judge_steps": args.judge_steps,
                   "judge_train_images": args.judge_images, "judge": judge_source}
    print(f"judge: {judge_stats}", file=sys.stderr)

    jobs = prompts_for(args.per_class)
    weights = args.weights.relative_to(Path.cwd()) if args.weights.is_relative_to(Path.cwd()) else args.weights
    if args.sampling_sweep:
        settings = []
        for guidance, eta in SAMPLING_SWEEP:
            verdict = draw_and_judge(pipe, judge, jobs, args.steps, guidance, eta)
            settings.append({"guidance_scale": guidance, "eta": eta, **verdict.summary()})
            print(f"guidance {guidance} eta {eta}: recognisability {settings[-1]['recognisability_mean']}, "
                  f"no object {settings[-1]['no_object_mean']}", file=sys.stderr)
        write_json(args.out, "generator_sampling.json", {
            "settings": settings, **judge_stats, "images_per_class": args.per_class,
            "bench_seconds": round(time.perf_counter() - started, 1), "commit": git_commit(), "seed": SEED,
            "config": {"weights": str(weights), "num_inference_steps": args.steps}})
        return
    verdict = draw_and_judge(pipe, judge, jobs, args.steps, args.guidance)
    args.out.mkdir(parents=True, exist_ok=True)
    save_grid(verdict.images, jobs, args.per_class, args.out / "generator_samples.png")
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    enc_params = sum(p.numel() for p in pipe.text_encoder.parameters())
    result = {
        **verdict.summary(),
        "train_minutes": train_minutes(args.weights),
        **judge_stats,
        "images_per_class": args.per_class,
        "generation_seconds": round(verdict.generation_seconds, 1),
        "bench_seconds": round(time.perf_counter() - started, 1),
        "commit": git_commit(),
        "seed": SEED,
        "config": {"weights": str(weights),
                   "image_size": size, "num_inference_steps": args.steps, "guidance_scale": args.guidance,
                   "eta": pipe.default_eta,
                   "scheduler": type(pipe.scheduler).__name__, "prompt_template": "a photo of a {class} {place}",
                   "places": PLACES, "unet_params": unet_params, "text_encoder_params": enc_params,
                   "unet_config": {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")
                                   and k in ("sample_size", "block_out_channels", "down_block_types",
                                             "up_block_types", "layers_per_block", "cross_attention_dim",
                                             "attention_head_dim")}},
    }
    write_json(args.out, "generator.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
