"""Scoring benchmark: the segmenter trained on rendered ground truth, and how fast it scores.

    .venv/bin/python tests/benchmarks/bench_scoring.py [--train 1000] [--val 500] [--epochs 12]

1. **The "real data" reference.** Reference-world training scenes and their exact
   label maps are written to a private SeaweedFS store with a JSONL manifest, and the
   configured segmenter (Mask2Former, preset `tiny` by default) is trained on them by
   the service's own trainer. Its mIoU on the validation split is the denominator of
   every later "generated ÷ real" ratio. Seconds per epoch are timed around training.
2. **Scoring throughput.** Validation scenes, stored as samples of a run, are scored
   with S(x) by the service's Scorer in batches of `scoring.score_batch`: store reads,
   decoding, the forward pass and the IoU, as the stage does it. On CPU always, and on
   CUDA when this machine has it.

Writes tests/benchmarks/results/scoring.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration"))

from ports import reserve_ports  # noqa: E402
from results_files import git_commit, write_json  # noqa: E402

from freemask.scoring.data import write_reference_split  # noqa: E402
from freemask.scoring.models import SegmenterStore  # noqa: E402
from freemask.scoring.scorer import Scorer, SegmenterCache, label_names  # noqa: E402
from freemask.scoring.train import SegmenterTrainer, TrainProgress, TrainSpec  # noqa: E402
from freemask.shared.config import FreemaskConfig, StackConfig, load_config  # noqa: E402
from freemask.shared.image_refs import ImageReader  # noqa: E402
from freemask.shared.images import encode_png  # noqa: E402
from freemask.shared.keys import sample_key  # noqa: E402
from freemask.shared.stack import EmbeddedStack  # noqa: E402
from freemask.shared.store import ObjectStore  # noqa: E402
from freemask.v1 import common_pb2, samples_pb2  # noqa: E402
from freemask.world import dataset  # noqa: E402

RESULTS = HERE / "results"
SEED = 0
IMAGE_SIZE = 32  # the size the embedded pipeline generates
RUN_ID = "bench-scoring"


def write_samples(store: ObjectStore, count: int) -> list[samples_pb2.Sample]:
    """Validation scenes as composed samples of round 0, their exact label as y_pseudo."""
    samples = []
    for index in range(count):
        scene = dataset("val", index, IMAGE_SIZE)
        sample_id = f"v-{index}"
        keys = common_pb2.SampleKeys(image_key=sample_key(RUN_ID, 0, sample_id, "image.png"),
                                     label_key=sample_key(RUN_ID, 0, sample_id, "label.png"))
        store.put_bytes(keys.image_key, encode_png(scene.image), "image/png")
        store.put_bytes(keys.label_key, encode_png(scene.label), "image/png")
        samples.append(samples_pb2.Sample(sample_id=sample_id, run_id=RUN_ID, round=0,
                                          kind=samples_pb2.SAMPLE_KIND_COMPOSED, keys=keys))
    return samples


def score_images_per_s(config: FreemaskConfig, store: ObjectStore, samples: list[samples_pb2.Sample],
                       device: torch.device, trials: int = 3) -> float:
    names = label_names(config)
    scorer = Scorer(SegmenterCache(SegmenterStore(store), names, 1, device), ImageReader(store, config.limits),
                    config)
    batch = config.scoring.score_batch
    scorer.score(samples[:batch])  # loads the model; not timed
    rates = []
    for _ in range(trials):
        started = time.perf_counter()
        for start in range(0, len(samples), batch):
            scorer.score(samples[start:start + batch])
        rates.append(len(samples) / (time.perf_counter() - started))
    return sorted(rates)[len(rates) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=1000, help="training scenes (rendered ground truth)")
    parser.add_argument("--val", type=int, default=500, help="validation scenes")
    parser.add_argument("--epochs", type=int, default=12,
                        help="passes over the training scenes (about 13 minutes on 2 CPU cores)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(environ={})
    epochs = args.epochs
    names = label_names(config)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = reserve_ports(17)[0]
        stack = EmbeddedStack(StackConfig(data_dir=Path(tmp) / "stack", s3_port=base, seaweed_port_base=base + 5))
        stack.up(("seaweedfs",), progress=print)
        try:
            store = ObjectStore(stack.store_config())
            store.ensure_bucket()
            train_pairs, _ = write_reference_split(store, "train", IMAGE_SIZE, args.train)
            val_pairs, _ = write_reference_split(store, "val", IMAGE_SIZE, args.val)
            device = torch.device("cpu")
            trainer = SegmenterTrainer(config.scoring, names, SegmenterStore(store),
                                       ImageReader(store, config.limits), device)
            spec = TrainSpec(run_id=RUN_ID, round=0, pairs=tuple(train_pairs), epochs=epochs, seed=SEED)
            progress = TrainProgress()
            with tqdm(desc="training", unit="step", file=sys.stderr) as bar:
                def report(step: int, total: int, loss: float) -> None:
                    bar.total = total
                    bar.update(step - bar.n)
                    bar.set_postfix(loss=f"{loss:.2f}")

                train_started = time.perf_counter()
                version = trainer.run(spec, progress, report=report)
                train_seconds = time.perf_counter() - train_started
            scorer = Scorer(SegmenterCache(SegmenterStore(store), names, 1, device), ImageReader(store, config.limits),
                            config)
            evaluation = scorer.evaluate(val_pairs, version)
            parameters = sum(p.numel() for p in SegmenterStore(store).load(version, names).segmenter.model.parameters())
            print(f"mIoU on {evaluation.num_images} validation scenes: {evaluation.mean_iou:.4f}", file=sys.stderr)
            samples = write_samples(store, args.val)
            cpu_rate = score_images_per_s(config, store, samples, device)
            gpu_rate = (score_images_per_s(config, store, samples, torch.device("cuda"))
                        if torch.cuda.is_available() else None)
        finally:
            stack.down(progress=print)
    commit = git_commit()
    result = {
        "miou_real": round(evaluation.mean_iou, 4),
        "per_class": {name: round(iou, 4) for name, iou in sorted(evaluation.class_iou.items())},
        "epoch_seconds": round(train_seconds / epochs, 1),
        "score_images_per_s": round(cpu_rate, 1),
        "score_images_per_s_cuda": round(gpu_rate, 1) if gpu_rate is not None else None,
        "train_images": progress.images, "val_images": evaluation.num_images, "epochs": epochs,
        "steps": progress.total_steps, "final_loss": round(progress.loss, 4),
        "train_seconds": round(train_seconds, 1),
        "bench_seconds": round(time.perf_counter() - started, 1),
        "commit": commit or None,
        "seed": SEED,
        "config": {**config.scoring.model_dump(), "image_size": IMAGE_SIZE, "device": "cpu",
                   "cuda": "not available on this machine" if gpu_rate is None else torch.cuda.get_device_name(),
                   "threads": args.threads, "cpus": os.cpu_count(), "model_parameters": parameters},
    }
    write_json(args.out, "scoring.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
