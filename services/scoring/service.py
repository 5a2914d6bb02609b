"""Adapters of the scoring service: gRPC `Scoring` and the stage
`freemask.composed.v1 → freemask.scored.v1`.

- **Train** starts a job on the service's one training thread and returns its id at
  once; the id is a digest of run and round, so a retried Train returns the same job,
  and a Train after a failure or a restart resumes from the job's last checkpoint.
  **TrainStatus** reports the job's live progress.
- **Score** and the stage score each sample with its own round's segmenter f_t
  (`models/segmenter/{run}/{round}/`) unless a request names another; the version
  used is in every ScoredSample.
- **Evaluate** measures a segmenter's mIoU and per-class IoU over a labelled dataset.
"""

from __future__ import annotations

from collections.abc import Sequence

from freemask.scoring.data import dataset_pairs, require_own_run
from freemask.scoring.jobs import TrainJobs
from freemask.scoring.metrics import ScoringMetrics
from freemask.scoring.models import SegmenterStore
from freemask.scoring.scorer import Scorer, SegmenterCache, label_names, scoring_device
from freemask.scoring.train import SegmenterTrainer, TrainSpec
from freemask.shared.bus import InboundMessage, OutboundMessage, Topics
from freemask.shared.config import FreemaskConfig
from freemask.shared.errors import InvalidInput
from freemask.shared.image_refs import ImageReader
from freemask.shared.keys import validate_id, validate_round
from freemask.shared.runner import ServiceContext, ServiceParts, StageSpec
from freemask.shared.store import ObjectStore
from freemask.v1 import samples_pb2, scoring_pb2

MAX_SCORE_SAMPLES = 256


class ScoringApi:
    """gRPC servicer over the jobs and the scorer."""

    def __init__(self, jobs: TrainJobs, scorer: Scorer, reader: ImageReader, store: ObjectStore,
                 config: FreemaskConfig) -> None:
        self._jobs = jobs
        self._scorer = scorer
        self._reader = reader
        self._store = store
        self._config = config

    def Train(self, request: scoring_pb2.TrainRequest) -> scoring_pb2.TrainResponse:
        validate_id(request.run_id, "run_id")
        validate_round(request.round)
        require_own_run(request.dataset, (), request.run_id)  # before a manifest of another run is read
        pairs = dataset_pairs(request.dataset, self._store)
        require_own_run(request.dataset, pairs, request.run_id)
        spec = TrainSpec(run_id=request.run_id, round=request.round, pairs=tuple(pairs),
                         epochs=request.epochs if request.HasField("epochs") else self._config.scoring.epochs,
                         seed=request.seed, init_from=request.init_from if request.HasField("init_from") else None)
        return scoring_pb2.TrainResponse(job_id=self._jobs.submit(spec))

    def TrainStatus(self, request: scoring_pb2.TrainStatusRequest) -> scoring_pb2.TrainStatusResponse:
        return self._jobs.status(request.job_id)

    def Score(self, request: scoring_pb2.ScoreRequest) -> scoring_pb2.ScoreResponse:
        if not 1 <= len(request.samples) <= MAX_SCORE_SAMPLES:
            raise InvalidInput(f"a Score request holds 1..{MAX_SCORE_SAMPLES} samples, got {len(request.samples)}")
        model = request.model if request.HasField("model") else None
        return scoring_pb2.ScoreResponse(scored_samples=self._scorer.score(request.samples, model))

    def Evaluate(self, request: scoring_pb2.EvaluateRequest) -> scoring_pb2.EvaluateResponse:
        return self._scorer.evaluate(dataset_pairs(request.dataset, self._store),
                                     request.model if request.HasField("model") else None)


class ScoreStage:
    """Stage adapter: a composed Sample in, its ScoredSample out; a polled batch is scored together."""

    def __init__(self, scorer: Scorer) -> None:
        self._scorer = scorer

    def handle(self, message: InboundMessage) -> list[OutboundMessage]:
        return self.handle_batch([message])[0]

    def handle_batch(self, messages: Sequence[InboundMessage]) -> list[list[OutboundMessage]]:
        samples = [m.decode(samples_pb2.Sample) for m in messages]
        return [[OutboundMessage(Topics.SCORED, scored.sample.sample_id, scored)]
                for scored in self._scorer.score(samples)]


def build(context: ServiceContext) -> ServiceParts:
    config = context.config
    device = scoring_device(config)
    models = SegmenterStore(context.store)
    reader = ImageReader(context.store, config.limits)
    metrics = ScoringMetrics(context.metrics)
    names = label_names(config)
    jobs = TrainJobs(SegmenterTrainer(config.scoring, names, models, reader, device), metrics)
    scorer = Scorer(SegmenterCache(models, names, config.scoring.cached_models, device), reader, config, metrics)
    stage = ScoreStage(scorer)
    descriptor = scoring_pb2.DESCRIPTOR.services_by_name["Scoring"]
    return ServiceParts(grpc_services=[(descriptor, ScoringApi(jobs, scorer, reader, context.store, config))],
                        stage=StageSpec(Topics.COMPOSED, stage.handle, batch_handler=stage.handle_batch),
                        on_stop=lambda: jobs.stop(config.server.grace_period_s))
