"""The evaluation and GPU benchmarks, the placement benchmark's GPU mode and the generator
benchmark (both modes) run end to end at a toy size, so they cannot rot between the rare
machines that run them in full. Only their wiring and output are checked here: the figures
themselves belong to `make bench`, never to a pass/fail test."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_benchmark(script: str, *args: str, timeout: float) -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


@pytest.mark.stack
def test_the_evaluation_benchmark_writes_every_key_the_issue_names(tmp_path: Path) -> None:
    run_benchmark("bench_evaluation.py", "--initial", "6", "--per-round", "6", "--rounds", "2", "--round-epochs", "1",
                  "--steps", "1", "--seeds", "2", "--headline-seeds", "3", "--val", "8", "--occlusion-scenes", "2",
                  "--variants", "without_fopa", "random_selection", "--singles", "--out", str(tmp_path), timeout=600)
    result = json.loads((tmp_path / "evaluation.json").read_text())
    for key in ("miou_real", "miou_freemask", "ratio", "miou_diffumask_style", "miou_dataset_diffusion_style",
                "miou_freemask_singles", "ablation", "rounds", "occlusion_label_accuracy", "commit", "config", "seed"):
        assert key in result, key
    # the refined-singles entry trains on the baselines' very images, as many as Free-Mask kept
    assert result["table"]["freemask_singles"]["images"] == result["table"]["diffumask_style"]["images"] \
        == result["table"]["freemask"]["images"]
    assert set(result["ablation"]) == {"full", "without_fopa", "random_selection", "alpha_0.7"}
    # the control keeps ⌈α·n⌉ of each round's n scored samples, as the S(x) cut does where no two scores
    # tie (at this toy size f_t often scores samples alike, and tied samples are kept together)
    per_round = {name: {count: [sum(per_kind) for per_kind in zip(*(kinds[kind][count] for kind in kinds))]
                        for count in ("scored", "kept")} for name, kinds in result["selection_by_kind"].items()}
    control = per_round["random_selection"]
    assert control["scored"] == per_round["freemask"]["scored"]
    assert control["kept"] == [math.ceil(0.7 * scored) for scored in control["scored"]]
    # every entry, the ablation's too, trains once per seed, the headline pair once per headline seed;
    # its figure is their mean
    assert len(result["ratio_per_seed"]) == 3 and result["config"]["headline_training_seeds"] == 3
    assert result["config"]["singles"] is True and result["config"]["selection_controls"] is False
    for name, seeds in (("real", 3), ("freemask", 3), ("without_fopa", 2), ("diffumask_style", 2)):
        runs = result["table"][name]["miou_per_seed"]
        assert len(runs) == seeds and result["table"][name]["miou"] == pytest.approx(sum(runs) / seeds, abs=1e-4)
    assert "ratio_standard_error" in result
    assert result["ablation"]["full"] == result["table"]["freemask"]["miou"]
    assert result["ablation"]["without_fopa"] == result["table"]["without_fopa"]["miou"]
    # the paired difference is taken over the seeds both entries have: Free-Mask's first two here
    difference = result["ablation_difference"]["without_fopa"]
    assert difference["seeds"] == 2 and difference["standard_error"] is not None
    assert difference["difference"] == pytest.approx(
        sum(result["table"]["freemask"]["miou_per_seed"][:2]) / 2 - result["table"]["without_fopa"]["miou"], abs=2e-4)
    for name in ("freemask", "without_fopa"):  # every accepted sample is a kept single or composed scene
        kinds = result["selection_by_kind"][name]
        assert sum(sum(kinds[kind]["kept"]) for kind in ("single", "composed")) == result["table"][name]["images"]
        assert all(kept <= scored for kind in kinds.values() for kept, scored in zip(kind["kept"], kind["scored"]))
    assert len(result["rounds"]) == 2 and all(0.0 <= value <= 1.0 for value in result["rounds"])
    # Pasting each object's exact mask in draw order must rebuild the rendered truth exactly.
    assert result["occlusion_label_accuracy"]["freemask_compositing"] == 1.0


def test_the_gpu_benchmark_runs_its_tiny_layout_on_cpu(tmp_path: Path) -> None:
    run_benchmark("bench_gpu.py", "--smoke", "--batches", "1", "2", "--steps", "2", "--repeats", "1", "--compile",
                  "--out", str(tmp_path), timeout=600)
    result = json.loads((tmp_path / "gpu.json").read_text())
    for key in ("device", "capture_overhead", "images_per_s", "flops_fraction", "commit", "config", "seed"):
        assert key in result, key
    assert set(result["images_per_s"]) == {"1", "2"} and result["gflops_per_image"]["2"] > 0
    # On a CPU compile_unet changes nothing (no graphs to record): the section's wiring only.
    compiled = result["compiled"]
    assert "error" not in compiled and set(compiled["images_per_s"]) == {"1", "2"}
    assert compiled["vs_uncompiled"]["2"]["mask_agreement"] == 1.0 and compiled["latency_50_steps_s"] > 0


@pytest.mark.stack
def test_the_placement_gpu_mode_runs_on_cpu(tmp_path: Path) -> None:
    """`--target embedded-gpu` with `--out` measures the torch runtime on the CPU: wiring only."""
    run_benchmark("bench_placement.py", "--target", "embedded-gpu", "--pairs", "8", "--requests", "16", "--trials",
                  "1", "--out", str(tmp_path), timeout=600)
    result = json.loads((tmp_path / "placement_gpu.json").read_text())
    for key in ("device", "triton_batching_gain", "pairs_per_s_concurrency_8", "latency_ms_per_pair", "commit",
                "config", "seed"):
        assert key in result, key
    assert result["clients"] == "processes" and set(result["other_clients"]) == {"threads"}


@pytest.mark.parametrize("sweep", [False, True], ids=["default", "sampling-sweep"])
def test_the_generator_benchmark_judges_with_a_no_object_answer(tmp_path: Path, sweep: bool) -> None:
    run_benchmark("bench_generator.py", "--per-class", "1", "--steps", "2", "--judge-images", "300",
                  "--judge-steps", "20", "--out", str(tmp_path), *(["--sampling-sweep"] if sweep else []),
                  timeout=600)
    result = json.loads((tmp_path / ("generator_sampling.json" if sweep else "generator.json")).read_text())
    for key in ("judge_empty_accuracy", "commit", "config", "seed"):
        assert key in result, key
    # the shipped judge is the default recipe's (8,000 images, 1,000 steps), so this one trains in the run
    assert result["judge"]["source"] == "trained in this run" and "another recipe" in result["judge"]["why"]
    verdicts = result["settings"] if sweep else [result]
    assert len(verdicts) == (6 if sweep else 1)
    for verdict in verdicts:
        assert set(verdict["no_object"]) == set(verdict["per_class"]) and len(verdict["per_class"]) == 12
        # a class's image is named as the class, as nothing, or as something else: never more than all of them
        assert all(verdict["per_class"][c] + verdict["no_object"][c] <= 1.0 for c in verdict["per_class"])
