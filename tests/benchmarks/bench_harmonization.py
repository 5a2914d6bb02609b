"""Harmonization benchmark: does RAIN make a pasted object match its scene, and how fast?

    .venv/bin/python tests/benchmarks/bench_harmonization.py [--pairs 500] [--weights DIR]

1. **Quality on held-out reference pairs.** The reference world renders each scene
   twice: its last object lit like the scene (the truth) and lit by another lighting
   (the composite, as if pasted from another picture). Each method gets the
   composite and the object's mask; reported are PSNR over the whole image and the
   foreground MSE (fMSE, 0–255 scale, over the object's pixels), for RAIN (the
   shipped weights), statistics transfer, and plain copy-paste (the composite
   itself). Pairs come from a seed training never used, in four cases (`by_case`):
   64 px and 32 px scenes, each with the object lit by a clearly *mismatched*
   lighting or by an *independent* draw of the world's scene lighting. The last is
   what the pipeline pastes (a generated 32 px object into another generated scene);
   the top-level figures are the 64 px mismatched case, the classic one.
2. **Throughput.** Images per second through `RainHarmonizer` (one image at a
   time, as the service calls it) at 256² and 512², with an object covering a
   quarter of the image, on 2 CPU threads.

RainNet reports PSNR 38.14 on iHarmony4 at 256²: real photographs with real masks.
These pairs are the reference world's; the numbers are not comparable.

Writes tests/benchmarks/results/harmonization.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from freemask.harmonization.rain import DEFAULT_WEIGHTS_DIR, RainHarmonizer
from freemask.harmonization.train import pair_sets, scores
from freemask.harmonization.transfer import transfer_statistics

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the benchmarks' shared results_files
from results_files import git_commit, write_json  # noqa: E402

RESULTS = HERE / "results"
SEED = 2026  # training uses seeds 0 (pool) and 1000 (its held-out pairs)
CLASSIC_CASE = "64px_mismatched"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)


def to_unit(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def quality(rain: RainHarmonizer, pairs: int) -> dict[str, dict[str, dict[str, float]]]:
    """case -> method -> {psnr, fmse}."""
    measured = {}
    for case, (composites, masks, targets) in pair_sets(SEED, pairs).items():
        images, regions = to_uint8(composites), masks[:, 0].numpy() > 0.5
        methods = {
            "rain": [rain(image, mask) for image, mask in zip(images, regions)],
            "stats_transfer": [transfer_statistics(image, mask) for image, mask in zip(images, regions)],
            "copy_paste": list(images),
        }
        measured[case] = {name: {key: round(value, 3) for key, value in scores(to_unit(out), masks, targets).items()}
                          for name, out in methods.items()}
    return measured


def images_per_s(rain: RainHarmonizer, side: int, seconds: float = 10.0) -> float:
    rng = np.random.default_rng(SEED)
    image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    mask = np.zeros((side, side), dtype=bool)
    mask[side // 4: 3 * side // 4, side // 4: 3 * side // 4] = True
    rain(image, mask)  # warm up
    times = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(times) < 3:
        t0 = time.perf_counter()
        rain(image, mask)
        times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=500)
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS_DIR, help="RAIN weights folder")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    rain = RainHarmonizer.from_directory(args.weights)
    by_case = quality(rain, args.pairs)
    measured = by_case[CLASSIC_CASE]
    throughput = {side: images_per_s(rain, side) for side in (256, 512)}
    commit = git_commit()
    result = {
        "psnr_rain": round(measured["rain"]["psnr"], 3),
        "psnr_copy_paste": round(measured["copy_paste"]["psnr"], 3),
        "psnr_stats_transfer": round(measured["stats_transfer"]["psnr"], 3),
        "fmse_rain": round(measured["rain"]["fmse"], 2),
        "fmse_copy_paste": round(measured["copy_paste"]["fmse"], 2),
        "fmse_stats_transfer": round(measured["stats_transfer"]["fmse"], 2),
        "by_case": by_case,
        "images_per_s_256": round(throughput[256], 2),
        "images_per_s_512": round(throughput[512], 2),
        "pairs": args.pairs,  # per case
        "bench_seconds": round(time.perf_counter() - started, 1),
        "commit": commit or None,
        "seed": SEED,
        "config": {"weights_version": rain.version,
                   "threads": 2, "device": "cpu", "cpus": os.cpu_count()},
    }
    write_json(args.out, "harmonization.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
