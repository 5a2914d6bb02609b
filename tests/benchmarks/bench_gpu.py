"""GPU benchmark (#11): the attention-mask path at Stable Diffusion 1.5's size, FOPA and RAIN, on one card.

    .venv/bin/python tests/benchmarks/bench_gpu.py [--dtype float16] [--batches 1 2 4 8 16] [--steps 20]
    .venv/bin/python tests/benchmarks/bench_gpu.py --smoke      # the tiny layout on CPU: checks the script only

No SD weights are reachable here, so the pipeline has SD 1.5's exact shapes (UNet, VAE,
CLIP text encoder; sd_layout.SD15) with random weights: speed does not depend on the
weights. Measured, at 512 x 512, with classifier-free guidance:

- `images_per_s[b]`: MaskGenerator.generate at batch b (diffusion with the capture
  processors, soft maps and the affinity refinement), and the same pipeline call without
  capture (`plain_images_per_s`); `capture_overhead` = captured time / plain time at the
  largest batch (target <= 1.10);
- `latency_50_steps_s`: one image, 50 steps, batch 1, with capture (ONNX Runtime's optimised
  SD 1.5 pipeline is reported at 0.572 s on an H100-80GB);
- `flops_fraction[b]`: FLOPs of the plain pipeline call (torch.utils.flop_counter) per second
  of it, over the card's dense peak for the dtype (target >= 0.40 at b >= 8);
- FOPA pairs/s and RAIN images/s: the shipped torch models on the same card, batch 64;
- with `--channels-last`, the UNet and VAE in channels-last memory format;
- with `--compile`, the 50-step latency and the largest batch again with the UNet under
  `torch.compile` (`compiled`; an error there is recorded, not fatal).

Writes tests/benchmarks/results/gpu.json (not with --smoke, unless --out is given).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration"))

from freemask.attention_mask.capture import capture_attention  # noqa: E402
from freemask.attention_mask.generation import MaskGenerator, class_token_positions  # noqa: E402
from freemask.harmonization.rain import load_rain  # noqa: E402
from freemask.placement.model import FopaHeatmap, load_fopa  # noqa: E402
from freemask.shared.config import AttentionMaskConfig  # noqa: E402
from results_files import git_commit, write_json  # noqa: E402
from sd_layout import SD15, TINY, build_sd_layout, write_bpe_files  # noqa: E402

RESULTS = HERE / "results"
SEED = 0
PROMPT = "a photo of a dog on the grass"
WORDS = ("a", "photo", "of", "dog", "on", "the", "grass")
GUIDANCE = 7.5
# Dense tensor-core peaks (no sparsity) from NVIDIA's data sheets, FLOP/s, by a substring of
# torch.cuda.get_device_name(); fp16 and bf16 are the same on these cards.
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls, after one warm-up call."""
    fn()
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return sorted(seconds)[len(seconds) // 2]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def small_model_rates(device: torch.device, dtype: torch.dtype, batch: int, repeats: int) -> dict[str, float]:
    fopa = FopaHeatmap(load_fopa()).eval().to(device, dtype)
    rain = load_rain().eval().to(device, dtype)
    backgrounds = torch.rand(batch, 3, 64, 64, device=device, dtype=dtype)
    foregrounds = torch.rand(batch, 4, 32, 32, device=device, dtype=dtype)
    composites = torch.rand(batch, 3, 64, 64, device=device, dtype=dtype) * 2 - 1
    masks = (torch.rand(batch, 1, 64, 64, device=device) > 0.7).to(dtype)
    with torch.inference_mode():
        fopa_s = timed(lambda: fopa(backgrounds, foregrounds), device, repeats)
        rain_s = timed(lambda: rain(composites, masks), device, repeats)
    return {"fopa_pairs_per_s": round(batch / fopa_s, 1), "rain_images_per_s": round(batch / rain_s, 1)}


def compiled_rates(pipe: Any, generator: MaskGenerator, device: torch.device, side: int, steps: int, batch: int,
                   repeats: int) -> dict[str, Any]:
    """The same pipeline with its UNet under torch.compile: 50-step latency at batch 1 and rates at `batch`."""
    eager_unet = pipe.unet
    pipe.unet = torch.compile(eager_unet)
    try:
        single = [generator.prompt_for(PROMPT, "dog", seed=SEED, num_inference_steps=50)]
        prompts = [generator.prompt_for(PROMPT, "dog", seed=SEED + i) for i in range(batch)]

        def plain(count: int, step_count: int) -> object:
            seeds = [torch.Generator(device).manual_seed(SEED + i) for i in range(count)]
            return pipe([PROMPT] * count, height=side, width=side, num_inference_steps=step_count,
                        guidance_scale=GUIDANCE, generator=seeds, output_type="pt").images

        return {
            "latency_50_steps_s": round(timed(lambda: generator.generate(single), device, repeats), 4),
            "plain_latency_50_steps_s": round(timed(lambda: plain(1, 50), device, repeats), 4),
            "batch": batch,
            "images_per_s": round(batch / timed(lambda: generator.generate(prompts), device, repeats), 3),
            "plain_images_per_s": round(batch / timed(lambda: plain(batch, steps), device, repeats), 3),
        }
    except Exception as error:  # a benchmark of an optional mode: record why it failed, keep the eager figures
        return {"error": f"{type(error).__name__}: {error}"[:2000]}
    finally:
        pipe.unet = eager_unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of the throughput runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="the tiny layout on CPU in float32: checks the script")
    parser.add_argument("--compile", action="store_true", help="also time the UNet under torch.compile")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's busiest operators of one captured pass at the largest batch")
    parser.add_argument("--channels-last", action="store_true",
                        help="UNet and VAE in channels-last memory format (NHWC convolutions, no layout conversions)")
    parser.add_argument("--commit", help="the commit measured, where the tree has no git metadata")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.smoke:
        device, dtype, shape = torch.device("cpu"), torch.float32, TINY
    elif torch.cuda.is_available():
        device, dtype, shape = torch.device("cuda"), getattr(torch, args.dtype), SD15
    else:
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --smoke to check the script on CPU")
    torch.manual_seed(SEED)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_bpe_files(Path(tmp) / "bpe", WORDS)
        pipe = build_sd_layout(Path(tmp) / "bpe", shape, seed=SEED)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device, dtype)
    if args.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    # The SD settings of charts/freemask/ci/gpu-production.yaml: self-attention affinity, a short walk,
    # the attention map cut where it matches the walked map at 0.8.
    config = AttentionMaskConfig(num_inference_steps=args.steps, guidance_scale=GUIDANCE,
                                 max_batch=max(args.batches), device=device.type, affinity="self_attention",
                                 refine_iterations=8, refine_cut="attention", refine_reference_threshold=0.8)
    generator = MaskGenerator(pipe, config, "random-" + ("tiny" if args.smoke else "sd15"))
    side = shape.image_side
    peak = peak_flops(device)
    plain_rate, captured_rate, overhead, flops_fraction, flops_per_image = {}, {}, {}, {}, {}
    capture_only_overhead = {}
    dog = list(class_token_positions(pipe.tokenizer, PROMPT, "dog"))
    for batch in args.batches:
        prompts = [generator.prompt_for(PROMPT, "dog", seed=SEED + i) for i in range(batch)]

        def plain() -> object:
            seeds = [torch.Generator(device).manual_seed(p.seed) for p in prompts]
            return pipe([PROMPT] * batch, height=side, width=side, num_inference_steps=args.steps,
                        guidance_scale=GUIDANCE, generator=seeds, output_type="pt").images

        def capture_only() -> object:
            with capture_attention(pipe.unet, [dog] * batch, classifier_free_guidance=True,
                                   self_attention_resolutions=[generator.affinity_resolution(side, side)]):
                return plain()

        plain_s = timed(plain, device, args.repeats)
        capture_only_overhead[batch] = round(timed(capture_only, device, args.repeats) / plain_s, 3)
        captured_s = timed(lambda: generator.generate(prompts), device, args.repeats)
        with FlopCounterMode(display=False) as counter:
            plain()
        flops = counter.get_total_flops()
        plain_rate[batch] = round(batch / plain_s, 3)
        captured_rate[batch] = round(batch / captured_s, 3)
        overhead[batch] = round(captured_s / plain_s, 3)
        flops_per_image[batch] = flops / batch
        flops_fraction[batch] = round(flops / plain_s / peak, 3) if peak else None
        print(f"batch {batch}: {captured_rate[batch]} images/s with capture, {plain_rate[batch]} without "
              f"(x{overhead[batch]}; capture alone x{capture_only_overhead[batch]}), {flops / plain_s / 1e12:.1f} TFLOP/s", flush=True)
    single = [generator.prompt_for(PROMPT, "dog", seed=SEED, num_inference_steps=50)]
    latency = timed(lambda: generator.generate(single), device, args.repeats)
    small = small_model_rates(device, dtype, 64, args.repeats)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke run)",
        "capture_overhead": overhead[max(args.batches)],
        "images_per_s": captured_rate,
        "plain_images_per_s": plain_rate,
        "capture_overhead_by_batch": overhead,
        "capture_only_overhead": capture_only_overhead,
        "latency_50_steps_s": round(latency, 4),
        "flops_fraction": flops_fraction,
        "gflops_per_image": {b: round(f / 1e9, 3) for b, f in flops_per_image.items()},
        "peak_flops": peak,
        **small,
        "bench_seconds": round(time.perf_counter() - started, 1),
        "commit": args.commit or git_commit(),
        "seed": SEED,
        "config": {"layout": "tiny" if args.smoke else "sd15", "image_side": side, "dtype": str(dtype),
                   "steps": args.steps, "guidance_scale": GUIDANCE, "batches": args.batches,
                   "repeats": args.repeats, "torch": torch.__version__, "channels_last": args.channels_last,
                   "unet_parameters": sum(p.numel() for p in pipe.unet.parameters())},
    }
    out = args.out or (None if args.smoke else RESULTS)
    write_result(result, out)
    if args.compile:  # written again with it: a compile that runs out of time leaves the eager figures on disk
        result["compiled"] = compiled_rates(pipe, generator, device, side, args.steps, max(args.batches), args.repeats)
        result["bench_seconds"] = round(time.perf_counter() - started, 1)
        write_result(result, out)
    print(json.dumps(result, indent=2))
    if args.profile:
        batch = max(args.batches)
        prompts = [generator.prompt_for(PROMPT, "dog", seed=SEED + i) for i in range(batch)]
        with torch.profiler.profile() as profiler:
            generator.generate(prompts)
        sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=60))


def write_result(result: dict[str, Any], out: Path | None) -> None:
    if out is not None:
        write_json(out, "gpu.json", result)


if __name__ == "__main__":
    main()
