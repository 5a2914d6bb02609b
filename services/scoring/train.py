"""Training f_t on D_t: augmentation, AdamW with cosine decay, checkpoints, resumption.

A job is identified by its run and round. Its position is a pure function of the
spec: epoch e visits the images in the order `permutation(seed, e)`, batch b of it is
augmented from the generator seeded by (seed, e, b). So a job killed at any point and
started again from its last checkpoint (weights, optimiser, position) carries on with
exactly the batches it would have seen. A checkpoint is only resumed by the same
spec (dataset, seed, epochs, settings): its fingerprint must match, otherwise the job
starts afresh. A finished model with the same fingerprint is reused without training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from freemask.scoring.data import LabelledImages, LabelledPair, load_pairs
from freemask.scoring.models import SegmenterStore, check_model_version, model_version
from freemask.scoring.segmenter import Batch, Segmenter
from freemask.shared.config import ScoringConfig
from freemask.shared.errors import InvalidInput
from freemask.shared.image_refs import ImageReader
from freemask.shared.keys import validate_id, validate_round
from freemask.v1 import common_pb2
from freemask.world.names import IGNORE_ID

log = logging.getLogger(__name__)

MAX_EPOCHS = 1000


class TrainingStopped(RuntimeError):
    """The job was asked to stop; its checkpoint holds the work done so far."""


@dataclass(frozen=True)
class TrainSpec:
    run_id: str
    round: int
    pairs: tuple[LabelledPair, ...]
    epochs: int
    seed: int
    init_from: common_pb2.ModelVersion | None = None

    def __post_init__(self) -> None:
        validate_id(self.run_id, "run_id")
        validate_round(self.round)
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise InvalidInput(f"epochs must be in [1, {MAX_EPOCHS}], got {self.epochs}")
        if not self.pairs:
            raise InvalidInput("the dataset is empty")
        if self.init_from is not None:
            check_model_version(self.init_from)

    def fingerprint(self, settings: ScoringConfig, class_names: Sequence[str]) -> str:
        """What the result depends on: data, seed, length, starting point and training settings."""
        digest = hashlib.sha256()
        for pair in self.pairs:
            digest.update(f"{pair.image_key}\0{pair.label_key}\n".encode())
        described = {
            "pairs": digest.hexdigest(), "epochs": self.epochs, "seed": self.seed,
            "init_from": self.init_from.version if self.init_from is not None else None,
            "classes": list(class_names),
            "settings": settings.model_dump(exclude={"device", "score_batch", "cached_models"}),
        }
        return "sha256-" + hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainProgress:
    """Live state of a job, written by the trainer and read by TrainStatus and metrics."""

    epoch: int = 0
    total_epochs: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    images: int = 0
    skipped_images: int = 0
    resumed_from_step: int | None = None
    model: common_pb2.ModelVersion | None = None
    updated_at: float = field(default_factory=time.time)  # Unix seconds of the last change
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def augment_pair(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, min_crop: float,
                 colour_jitter: float) -> tuple[np.ndarray, np.ndarray]:
    """A random flip, a crop keeping at least `min_crop` of each side, brightness and contrast gains."""
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    height, width = label.shape
    scale = rng.uniform(min_crop, 1.0)
    crop_h, crop_w = max(1, round(height * scale)), max(1, round(width * scale))
    top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    cropped_label = label[top:top + crop_h, left:left + crop_w]
    if (cropped_label != IGNORE_ID).any():  # a crop of nothing but ignore pixels teaches nothing
        image, label = image[top:top + crop_h, left:left + crop_w], cropped_label
    pixels = image.astype(np.float32)
    gain = rng.uniform(1 - colour_jitter, 1 + colour_jitter)
    contrast = rng.uniform(1 - colour_jitter, 1 + colour_jitter)
    mean = pixels.mean()
    pixels = (pixels - mean) * contrast + mean * gain
    return np.clip(pixels, 0, 255).astype(np.uint8), np.ascontiguousarray(label)


def cosine_rate(base: float, step: int, total_steps: int) -> float:
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))


class SegmenterTrainer:
    """Runs training jobs: reads D_t, trains, checkpoints and writes f_t to the store."""

    def __init__(self, settings: ScoringConfig, class_names: Sequence[str], models: SegmenterStore,
                 reader: ImageReader, device: torch.device | str = "cpu") -> None:
        self._settings = settings
        self._class_names = tuple(class_names)
        self._models = models
        self._reader = reader
        self._device = torch.device(device)

    def run(self, spec: TrainSpec, progress: TrainProgress | None = None,
            should_stop: Callable[[], bool] = lambda: False,
            report: Callable[[int, int, float], None] | None = None) -> common_pb2.ModelVersion:
        """Train to the end (or resume, or reuse a finished model); returns the model written.

        `should_stop` is asked before every step: when it says so, the job checkpoints and
        raises TrainingStopped. `report(step, total_steps, loss)` follows every step.
        """
        progress = progress if progress is not None else TrainProgress()
        fingerprint = spec.fingerprint(self._settings, self._class_names)
        version = model_version(spec.run_id, spec.round)
        if self._reuse(spec, fingerprint, progress):
            return version

        data = load_pairs(spec.pairs, self._reader, len(self._class_names))
        with progress.lock:
            progress.images, progress.skipped_images = len(data), len(data.skipped)
        data.require_some()
        segmenter = self._initial(spec)
        # fused: one kernel for all parameters instead of a dozen small ops each; for the tiny preset
        # on one CPU thread that took the optimiser from 16 to 4 ms of a 180 ms step
        optimiser = torch.optim.AdamW(segmenter.model.parameters(), lr=self._settings.learning_rate,
                                      weight_decay=self._settings.weight_decay, fused=True)
        steps_per_epoch = math.ceil(len(data) / self._settings.batch_size)
        total_steps = steps_per_epoch * spec.epochs
        step, loss = self._resume(spec, fingerprint, segmenter, optimiser)
        with progress.lock:
            progress.total_epochs, progress.total_steps = spec.epochs, total_steps
            progress.step, progress.epoch, progress.loss = step, step // steps_per_epoch, loss
            progress.resumed_from_step = step if step else None
            if step:
                progress.model = version

        segmenter.model.train()
        while step < total_steps:
            epoch, batch_index = divmod(step, steps_per_epoch)
            if should_stop():
                self._checkpoint(spec, fingerprint, segmenter, optimiser, step, loss)
                raise TrainingStopped(f"stopped at step {step} of {total_steps}")
            batch = self._batch(segmenter, data, spec.seed, epoch, batch_index)
            for group in optimiser.param_groups:
                group["lr"] = cosine_rate(self._settings.learning_rate, step, total_steps)
            # The backbone's stochastic depth draws from the global RNG: seeding it per step makes
            # a resumed job take exactly the steps an uninterrupted one would have taken.
            with torch.random.fork_rng(devices=[self._device] if self._device.type == "cuda" else []):
                torch.manual_seed(int(np.random.default_rng([spec.seed, step]).integers(2**62)))
                value = segmenter.loss(batch)
                optimiser.zero_grad(set_to_none=True)
                value.backward()
            torch.nn.utils.clip_grad_norm_(segmenter.model.parameters(), 1.0)
            optimiser.step()
            step, loss = step + 1, float(value.detach())
            with progress.lock:
                progress.step, progress.loss, progress.epoch = step, loss, step // steps_per_epoch
                progress.updated_at = time.time()
            if report is not None:
                report(step, total_steps, loss)
            # By steps only: on a small dataset an epoch is a few steps, and writing the weights and
            # optimiser state at each epoch's end took a quarter of the training time.
            if step < total_steps and step % self._settings.checkpoint_every_steps == 0:
                self._checkpoint(spec, fingerprint, segmenter, optimiser, step, loss)
                log.info("segmenter training checkpoint", extra={
                    "run_id": spec.run_id, "round": spec.round, "epoch": step // steps_per_epoch,
                    "epochs": spec.epochs, "step": step, "steps": total_steps, "loss": round(loss, 4)})
                with progress.lock:
                    progress.model = version

        training = {"fingerprint": fingerprint, "epochs": spec.epochs, "steps": total_steps, "loss": loss,
                    "seed": spec.seed, "images": len(data), "skipped_images": len(data.skipped),
                    "init_from": spec.init_from.version if spec.init_from is not None else None}
        self._models.save(spec.run_id, spec.round, segmenter, training)
        self._models.drop_checkpoint(spec.run_id, spec.round)
        with progress.lock:
            progress.model = version
        return version

    def _reuse(self, spec: TrainSpec, fingerprint: str, progress: TrainProgress) -> bool:
        """Whether a finished model of this very spec exists; if so, progress reports its training."""
        finished = self._models.manifest(spec.run_id, spec.round)
        training = finished.get("training", {}) if finished is not None else {}
        if training.get("fingerprint") != fingerprint:
            return False
        log.info("segmenter already trained by this spec; reusing it",
                 extra={"run_id": spec.run_id, "round": spec.round})
        with progress.lock:
            progress.model = model_version(spec.run_id, spec.round)
            progress.epoch = progress.total_epochs = spec.epochs
            progress.step = progress.total_steps = int(training.get("steps", 0))
            progress.loss = float(training.get("loss", 0.0))
            progress.images = int(training.get("images", 0))
            progress.skipped_images = int(training.get("skipped_images", 0))
            progress.updated_at = time.time()
        return True

    def _initial(self, spec: TrainSpec) -> Segmenter:
        if spec.init_from is None:
            return Segmenter.create(self._settings.preset, self._class_names, self._settings.input_size, spec.seed,
                                    self._device)
        return self._models.load(spec.init_from, self._class_names, self._device).segmenter

    def _resume(self, spec: TrainSpec, fingerprint: str, segmenter: Segmenter,
                optimiser: torch.optim.Optimizer) -> tuple[int, float]:
        state = self._models.load_checkpoint(spec.run_id, spec.round)
        if state is None:
            return 0, 0.0
        if state.get("fingerprint") != fingerprint:
            log.warning("ignoring a checkpoint of another spec for this run and round; starting afresh",
                        extra={"run_id": spec.run_id, "round": spec.round})
            return 0, 0.0
        segmenter.model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        log.info("resuming segmenter training", extra={"run_id": spec.run_id, "round": spec.round,
                                                       "step": int(state["step"])})
        return int(state["step"]), float(state["loss"])

    def _checkpoint(self, spec: TrainSpec, fingerprint: str, segmenter: Segmenter,
                    optimiser: torch.optim.Optimizer, step: int, loss: float) -> None:
        self._models.save_checkpoint(spec.run_id, spec.round, {
            "fingerprint": fingerprint, "step": step, "loss": loss,
            "model": segmenter.state(), "optimizer": optimiser.state_dict()})

    def _batch(self, segmenter: Segmenter, data: LabelledImages, seed: int, epoch: int, batch_index: int) -> Batch:
        order = np.random.default_rng([seed, epoch]).permutation(len(data))
        size = self._settings.batch_size
        chosen = order[batch_index * size:(batch_index + 1) * size]
        rng = np.random.default_rng([seed, epoch, batch_index])
        pairs = [augment_pair(data.images[i], data.labels[i], rng, self._settings.min_crop,
                              self._settings.colour_jitter) for i in chosen]
        return Batch(pixels=segmenter.to_input([image for image, _ in pairs]),
                     labels=segmenter.label_input([label for _, label in pairs]))
