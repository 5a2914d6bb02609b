"""Training jobs: one at a time on a background thread, tracked by a deterministic id.

The id is a digest of run and round, so a retried Train returns the same job, and a
Train after a failure or a restart starts a job that resumes from the checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time

from google.protobuf.timestamp_pb2 import Timestamp

from freemask.scoring.metrics import ScoringMetrics
from freemask.scoring.train import SegmenterTrainer, TrainingStopped, TrainProgress, TrainSpec
from freemask.shared.errors import NotFound
from freemask.shared.keys import validate_id
from freemask.v1 import scoring_pb2

log = logging.getLogger(__name__)


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


class TrainJob:
    def __init__(self, job_id: str, spec: TrainSpec) -> None:
        self.job_id = job_id
        self.spec = spec
        self.progress = TrainProgress(total_epochs=spec.epochs)
        self.state = scoring_pb2.TRAIN_STATE_QUEUED
        self.error = ""
        self.started_at: Timestamp | None = None
        self.finished_at: Timestamp | None = None


def job_id_for(run_id: str, round_index: int) -> str:
    return "train-" + hashlib.sha256(f"{run_id}/{round_index}".encode()).hexdigest()[:16]


class TrainJobs:
    """Training jobs, run one at a time on a background thread, in the order they came."""

    def __init__(self, trainer: SegmenterTrainer, metrics: ScoringMetrics | None = None) -> None:
        self._trainer = trainer
        self._metrics = metrics
        self._jobs: dict[str, TrainJob] = {}
        self._queue: queue.Queue[TrainJob | None] = queue.Queue()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._work, name="segmenter-training", daemon=True)
        self._thread.start()

    def submit(self, spec: TrainSpec) -> str:
        """The job of this run and round: the existing one unless it failed, else a new one."""
        job_id = job_id_for(spec.run_id, spec.round)
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.state != scoring_pb2.TRAIN_STATE_FAILED:
                return job_id
            job = TrainJob(job_id, spec)
            self._jobs[job_id] = job
        self._queue.put(job)
        return job_id

    def status(self, job_id: str) -> scoring_pb2.TrainStatusResponse:
        validate_id(job_id, "job_id")  # ids are "train-" and hex: anything else is the caller's mistake
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no training job {job_id!r} in this process (jobs are kept in memory: after a restart, "
                           "call Train again with the same run and round to resume from its checkpoint)")
        progress = job.progress
        with progress.lock:
            response = scoring_pb2.TrainStatusResponse(
                job_id=job.job_id, state=job.state, epoch=progress.epoch, total_epochs=progress.total_epochs,
                step=progress.step, loss=progress.loss, skipped_images=progress.skipped_images, error=job.error)
            response.updated_at.FromNanoseconds(int(progress.updated_at * 1e9))
            if progress.model is not None:
                response.model.CopyFrom(progress.model)
        for field in ("started_at", "finished_at"):
            stamp = getattr(job, field)
            if stamp is not None:
                getattr(response, field).CopyFrom(stamp)
        return response

    def stop(self, timeout_s: float) -> None:
        """Ask the running job to checkpoint and stop; wait up to `timeout_s` for it."""
        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _work(self) -> None:
        while not self._stopping.is_set():
            job = self._queue.get()
            if job is None:
                return
            self._run(job)

    def _run(self, job: TrainJob) -> None:
        job.state, job.started_at = scoring_pb2.TRAIN_STATE_RUNNING, _now()
        if self._metrics is not None:
            self._metrics.follow(job.progress)
        try:
            self._trainer.run(job.spec, job.progress, should_stop=self._stopping.is_set)
        except TrainingStopped as err:
            job.state, job.error, outcome = scoring_pb2.TRAIN_STATE_FAILED, f"service stopping: {err}", "stopped"
        except Exception as err:  # noqa: BLE001 - a failed job is reported, the thread lives on
            log.exception("segmenter training failed", extra={"job_id": job.job_id})
            job.state, job.error, outcome = scoring_pb2.TRAIN_STATE_FAILED, f"{type(err).__name__}: {err}", "failed"
        else:
            job.state, outcome = scoring_pb2.TRAIN_STATE_SUCCEEDED, "succeeded"
        job.finished_at = _now()
        with job.progress.lock:
            job.progress.updated_at = time.time()
        if self._metrics is not None:
            self._metrics.ended(outcome)
            self._metrics.skipped.inc(job.progress.skipped_images)
