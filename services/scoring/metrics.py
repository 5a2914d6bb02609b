"""Prometheus metrics of the scoring service: the scores given, and training progress."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from freemask.scoring.train import TrainProgress
from freemask.shared.metrics import ServiceMetrics

_SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class ScoringMetrics:
    """What operators watch: the scores the segmenter gives, and how training goes."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        service = metrics.service
        self.scores = Histogram("freemask_scoring_score", "S(x) of scored samples", ["service"],
                                buckets=_SCORE_BUCKETS, registry=metrics.registry).labels(service)
        self.skipped = Counter("freemask_scoring_skipped_images_total",
                               "labelled images skipped by training or evaluation (unreadable or mismatched)",
                               ["service"], registry=metrics.registry).labels(service)
        self._loss = Gauge("freemask_scoring_train_loss", "loss of the running training job's last step",
                           ["service"], registry=metrics.registry).labels(service)
        self._step = Gauge("freemask_scoring_train_step", "optimiser steps done by the running training job",
                           ["service"], registry=metrics.registry).labels(service)
        self._epoch = Gauge("freemask_scoring_train_epoch", "epochs done by the running training job",
                            ["service"], registry=metrics.registry).labels(service)
        self.jobs = Counter("freemask_scoring_train_jobs_total", "training jobs ended, by outcome",
                            ["service", "outcome"], registry=metrics.registry)
        self._service = service

    def follow(self, progress: TrainProgress) -> None:
        """Export this job's live progress."""
        self._loss.set_function(lambda: progress.loss)
        self._step.set_function(lambda: progress.step)
        self._epoch.set_function(lambda: progress.epoch)

    def ended(self, outcome: str) -> None:
        self.jobs.labels(self._service, outcome).inc()
