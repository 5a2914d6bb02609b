"""GPU benchmark (#11): the attention-mask path at Stable Diffusion 1.5's size, FOPA and RAIN, on one card.

    .venv/bin/python tests/benchmarks/bench_gpu.py [--dtype float16] [--batches 1 2 4 8 16] [--steps 20]
    .venv/bin/python tests/benchmarks/bench_gpu.py --smoke      # the tiny layout on CPU: checks the script only

No SD weights are reachable here, so the pipeline has SD 1.5's exact shapes (UNet, VAE,
CLIP text encoder; sd_layout.SD15) with random weights: speed does not depend on the
weights. Measured, at 512 x 512, with classifier-free guidance:

- `images_per_s[b]`: MaskGenerator.generate at batch b (diffusion with the capture
  processors, soft maps and the affinity refinement), and the same pipeline call without
  capture (`plain_images_per_s`), both with the denoising steps replayed from CUDA graphs
  (`attention_mask.cuda_graphs`, the service's default); `capture_overhead` = captured
  time / plain time at the largest batch (target <= 1.10);
- `eager`: the same figures with every step launched eagerly, and `graphs_vs_eager[b]`:
  how far the replayed pass's images, soft maps and masks are from the eager pass's;
- `affinity_noise_vs_none[b]`: the same for the graphs pass with its affinity changed by a
  relative `affinity_noise` (1e-5): how far masks move on differences that are not errors;
- `latency_50_steps_s`: one image, 50 steps, batch 1, with capture (ONNX Runtime's optimised
  SD 1.5 pipeline is reported at 0.572 s on an H100-80GB);
- `flops_fraction[b]`: FLOPs of the plain pipeline call (torch.utils.flop_counter) per second
  of it, over the card's dense peak for the dtype (target >= 0.40 at b >= 8);
- FOPA pairs/s and RAIN images/s: the shipped torch models on the same card, batch 64;
- with `--channels-last`, the UNet and VAE in channels-last memory format;
- with `--compile`, `compiled`: the same figures at `--compile-batches` (default: 1 and the
  largest), and the 50-step image, for `attention_mask.compile_unet`, whose graphs record the
  torch.compile'd UNet; with the first call's seconds (the compile), how far its outputs are
  from the uncompiled graphs', and torch._dynamo's graph and graph-break counts. An error
  there is recorded, not fatal.

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

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration"))

from freemask.attention_mask.capture import capture_attention  # noqa: E402
from freemask.attention_mask.generation import (  # noqa: E402
    GeneratedObject,
    MaskGenerator,
    ObjectPrompt,
    class_token_positions,
)
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
# The relative change PerturbedAffinity makes to the affinity: about float32's rounding after a few operations.
AFFINITY_NOISE = 1e-5
# How the denoising steps are launched: replayed from CUDA graphs (the service's default) or one kernel at a time.
MODES = ("cuda_graphs", "eager")
# Dense tensor-core peaks (no sparsity) from NVIDIA's data sheets, FLOP/s, by a substring of
# torch.cuda.get_device_name(); fp16 and bf16 are the same on these cards.
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, first_call: bool = False) -> tuple[Any, ...]:
    """Median seconds of `repeats` calls, after one warm-up call, and the last call's result;
    with `first_call`, also the warm-up's seconds."""
    seconds = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    warm_up, timed_seconds = seconds[0], sorted(seconds[1:])
    median = timed_seconds[len(timed_seconds) // 2]
    return (median, result, warm_up) if first_call else (median, result)


def plain_pass(generator: MaskGenerator, prompts: list[ObjectPrompt], steps: int) -> object:
    """The same pipeline call as `generator.generate(prompts)` makes, with diffusers' own processors
    (no capture), its steps launched as the generator's config says."""
    pipe, side = generator.pipe, prompts[0].height
    seeds = [torch.Generator(pipe.unet.device).manual_seed(p.seed) for p in prompts]
    with generator.step_graphs():
        return pipe([PROMPT] * len(prompts), height=side, width=side, num_inference_steps=steps,
                    guidance_scale=GUIDANCE, generator=seeds, output_type="pt").images


def latency_50_steps(generator: MaskGenerator, device: torch.device, repeats: int) -> float:
    """Seconds for one image of 50 steps at batch 1, with capture."""
    single = [generator.prompt_for(PROMPT, "dog", seed=SEED, num_inference_steps=50)]
    return round(timed(lambda: generator.generate(single), device, repeats)[0], 4)


class PerturbedAffinity(MaskGenerator):
    """The service's generator with its affinity changed by a relative AFFINITY_NOISE (rows renormalised).

    How far its masks move says how far a mask can move for reasons that are not errors:
    the compiled step's rounding, say. On random weights the affinity is nearly flat and the
    walk and the threshold search amplify such changes.
    """

    def affinities(self, images: torch.Tensor, store: Any, grid: Any) -> torch.Tensor:
        affinity = super().affinities(images, store, grid)
        noise = torch.randn(affinity.shape, generator=torch.Generator(affinity.device).manual_seed(SEED),
                            device=affinity.device)
        affinity = affinity * (1 + AFFINITY_NOISE * noise)
        return affinity / affinity.sum(dim=-1, keepdim=True)


def output_difference(eager: list[GeneratedObject], graphed: list[GeneratedObject]) -> dict[str, float]:
    """How far a pass with replayed steps is from the eager pass: pixels, soft maps, masks."""
    return {
        "image_max_abs_diff": max(int(np.abs(a.image.astype(int) - b.image.astype(int)).max())
                                  for a, b in zip(eager, graphed)),
        "soft_map_max_abs_diff": round(max(float(np.abs(a.soft_map - b.soft_map).max())
                                           for a, b in zip(eager, graphed)), 6),
        "mask_agreement": round(min(float((a.mask == b.mask).mean()) for a, b in zip(eager, graphed)), 6),
    }


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
        fopa_s, _ = timed(lambda: fopa(backgrounds, foregrounds), device, repeats)
        rain_s, _ = timed(lambda: rain(composites, masks), device, repeats)
    return {"fopa_pairs_per_s": round(batch / fopa_s, 1), "rain_images_per_s": round(batch / rain_s, 1)}


def compiled_rates(generator: MaskGenerator, device: torch.device, steps: int, batches: list[int], repeats: int,
                   uncompiled: dict[int, list[GeneratedObject]], flops_per_image: dict[int, float],
                   peak: float | None, on_batch: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The service's `compile_unet` path: its graphs record the torch.compile'd UNet.

    At each of `batches`: images/s with capture and without, the first call's seconds (it
    compiles the step for those shapes), how far its outputs are from the uncompiled graphs'
    (`uncompiled`), and the FLOP fraction without capture; at batch 1, the 50-step image.
    `on_batch` gets the figures so far after each batch, so a run cut short keeps them.
    """
    from torch._dynamo.utils import counters

    figures: dict[str, Any] = {"images_per_s": {}, "plain_images_per_s": {}, "capture_overhead_by_batch": {},
                               "first_call_s": {}, "plain_first_call_s": {}, "vs_uncompiled": {},
                               "flops_fraction": {}}
    try:
        for batch in batches:
            prompts = [generator.prompt_for(PROMPT, "dog", seed=SEED + i) for i in range(batch)]
            captured_s, outputs, first_s = timed(lambda: generator.generate(prompts), device, repeats,
                                                 first_call=True)
            plain_s, _, plain_first_s = timed(lambda: plain_pass(generator, prompts, steps), device, repeats,
                                              first_call=True)
            figures["images_per_s"][batch] = round(batch / captured_s, 3)
            figures["plain_images_per_s"][batch] = round(batch / plain_s, 3)
            figures["capture_overhead_by_batch"][batch] = round(captured_s / plain_s, 3)
            figures["first_call_s"][batch], figures["plain_first_call_s"][batch] = round(first_s, 1), round(
                plain_first_s, 1)
            if batch in uncompiled:
                figures["vs_uncompiled"][batch] = output_difference(uncompiled[batch], outputs)
            # FLOPs grow linearly with the batch: a batch not counted uncompiled takes the per-image
            # count of the largest one that was.
            per_image = flops_per_image.get(batch, flops_per_image[max(flops_per_image)])
            if peak:
                figures["flops_fraction"][batch] = round(per_image * batch / plain_s / peak, 3)
            figures["dynamo"] = {name: dict(counters[name]) for name in ("stats", "graph_break") if counters[name]}
            print(f"compiled, batch {batch}: {figures['images_per_s'][batch]} images/s with capture, "
                  f"{figures['plain_images_per_s'][batch]} without; first calls {first_s:.0f} s and "
                  f"{plain_first_s:.0f} s; vs uncompiled {figures['vs_uncompiled'].get(batch)}", flush=True)
            if batch == 1:  # the shapes just compiled
                figures["latency_50_steps_s"] = latency_50_steps(generator, device, repeats)
            on_batch(figures)
    except Exception as error:  # a benchmark of an optional mode: record why it failed, keep the other figures
        figures["error"] = f"{type(error).__name__}: {error}"[:2000]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of the throughput runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="the tiny layout on CPU in float32: checks the script")
    parser.add_argument("--compile", action="store_true",
                        help="also time attention_mask.compile_unet (graphs of the torch.compile'd UNet)")
    parser.add_argument("--compile-batches", type=int, nargs="+",
                        help="batches of the --compile figures (default: 1 and the largest; each compiles twice)")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's busiest operators of one captured pass at the largest batch")
    parser.add_argument("--channels-last", action="store_true",
                        help="UNet and VAE in channels-last memory format (NHWC convolutions, no layout conversions)")
    parser.add_argument("--commit", help="the commit measured, where the tree has no git metadata")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    compile_batches = (args.compile_batches or sorted({1, max(args.batches)})) if args.compile else []
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
                                 max_batch=max(args.batches + compile_batches), device=device.type,
                                 affinity="self_attention", refine_iterations=8, refine_cut="attention",
                                 refine_reference_threshold=0.8)
    generators = {mode: MaskGenerator(pipe, config.model_copy(update={"cuda_graphs": mode == "cuda_graphs"}),
                                      "random-" + ("tiny" if args.smoke else "sd15"))
                  for mode in MODES}
    generator = generators["cuda_graphs"]
    side = shape.image_side
    peak = peak_flops(device)
    rates: dict[str, dict[str, dict[int, float]]] = {mode: {"plain": {}, "captured": {}} for mode in MODES}
    flops_fraction, flops_per_image, capture_only_overhead, graphs_vs_eager = {}, {}, {}, {}
    uncompiled_outputs: dict[int, list[GeneratedObject]] = {}
    perturbed = PerturbedAffinity(pipe, generator.config, generator.version)
    affinity_noise_effect = {}
    dog = list(class_token_positions(pipe.tokenizer, PROMPT, "dog"))
    for batch in args.batches:
        prompts = [generator.prompt_for(PROMPT, "dog", seed=SEED + i) for i in range(batch)]

        def plain(mode: str) -> object:
            return plain_pass(generators[mode], prompts, args.steps)

        def capture_only() -> object:
            with capture_attention(pipe.unet, [dog] * batch, classifier_free_guidance=True,
                                   self_attention_resolutions=[generator.affinity_resolution(side, side)]):
                return plain("cuda_graphs")

        outputs = {}
        for mode in MODES:
            plain_s, _ = timed(lambda: plain(mode), device, args.repeats)
            captured_s, outputs[mode] = timed(lambda: generators[mode].generate(prompts), device, args.repeats)
            rates[mode]["plain"][batch], rates[mode]["captured"][batch] = batch / plain_s, batch / captured_s
        capture_only_s, _ = timed(capture_only, device, args.repeats)
        capture_only_overhead[batch] = round(rates["cuda_graphs"]["plain"][batch] * capture_only_s / batch, 3)
        graphs_vs_eager[batch] = output_difference(outputs["eager"], outputs["cuda_graphs"])
        uncompiled_outputs[batch] = outputs["cuda_graphs"]
        affinity_noise_effect[batch] = output_difference(outputs["cuda_graphs"], perturbed.generate(prompts))
        with FlopCounterMode(display=False) as counter:  # counted eagerly: a replayed graph dispatches no ops
            plain("eager")
        flops = counter.get_total_flops()
        fastest = max(rates[mode]["plain"][batch] for mode in MODES)
        flops_per_image[batch] = flops / batch
        flops_fraction[batch] = round(flops * fastest / batch / peak, 3) if peak else None
        print(f"batch {batch}: " + "; ".join(
            f"{mode} {rates[mode]['captured'][batch]:.3f} images/s with capture, {rates[mode]['plain'][batch]:.3f} "
            f"without" for mode in MODES) + f"; capture alone x{capture_only_overhead[batch]}, "
            f"{flops * fastest / batch / 1e12:.1f} TFLOP/s; graphs vs eager {graphs_vs_eager[batch]}", flush=True)
    overhead = {mode: {b: round(rates[mode]["plain"][b] / rates[mode]["captured"][b], 3) for b in args.batches}
                for mode in MODES}
    rounded = {mode: {kind: {b: round(rate, 3) for b, rate in by_batch.items()} for kind, by_batch in kinds.items()}
               for mode, kinds in rates.items()}
    latency = {mode: latency_50_steps(generators[mode], device, args.repeats) for mode in MODES}
    small = small_model_rates(device, dtype, 64, args.repeats)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke run)",
        "capture_overhead": overhead["cuda_graphs"][max(args.batches)],
        "images_per_s": rounded["cuda_graphs"]["captured"],
        "plain_images_per_s": rounded["cuda_graphs"]["plain"],
        "capture_overhead_by_batch": overhead["cuda_graphs"],
        "capture_only_overhead": capture_only_overhead,
        "latency_50_steps_s": latency["cuda_graphs"],
        "eager": {"images_per_s": rounded["eager"]["captured"], "plain_images_per_s": rounded["eager"]["plain"],
                  "capture_overhead_by_batch": overhead["eager"], "latency_50_steps_s": latency["eager"]},
        "graphs_vs_eager": graphs_vs_eager,
        "affinity_noise": AFFINITY_NOISE,
        "affinity_noise_vs_none": affinity_noise_effect,
        "flops_fraction": flops_fraction,
        "gflops_per_image": {b: round(f / 1e9, 3) for b, f in flops_per_image.items()},
        "peak_flops": peak,
        **small,
        "bench_seconds": round(time.perf_counter() - started, 1),
        "commit": args.commit or git_commit(),
        "seed": SEED,
        "config": {"layout": "tiny" if args.smoke else "sd15", "image_side": side, "dtype": str(dtype),
                   "steps": args.steps, "guidance_scale": GUIDANCE, "batches": args.batches,
                   "compile_batches": compile_batches,
                   "repeats": args.repeats, "torch": torch.__version__, "channels_last": args.channels_last,
                   "unet_parameters": sum(p.numel() for p in pipe.unet.parameters())},
    }
    out = args.out or (None if args.smoke else RESULTS)
    write_result(result, out)
    if args.compile:  # written after each batch: a compile that runs out of time leaves the figures before it
        compiled = MaskGenerator(pipe, config.model_copy(update={"compile_unet": True}), generator.version)

        def keep(figures: dict[str, Any]) -> None:
            result["compiled"] = figures
            result["bench_seconds"] = round(time.perf_counter() - started, 1)
            write_result(result, out)

        keep(compiled_rates(compiled, device, args.steps, compile_batches, args.repeats, uncompiled_outputs,
                            flops_per_image, peak, keep))
    print(json.dumps(result, indent=2))
    if args.profile:  # eagerly: the operator table needs each op dispatched, which a replayed graph is not
        batch = max(args.batches)
        prompts = [generator.prompt_for(PROMPT, "dog", seed=SEED + i) for i in range(batch)]
        with torch.profiler.profile() as profiler:
            generators["eager"].generate(prompts)
        sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=60))


def write_result(result: dict[str, Any], out: Path | None) -> None:
    if out is not None:
        write_json(out, "gpu.json", result)


if __name__ == "__main__":
    main()
