"""Adapters of the thesaurus service: the index in the store, gRPC `Thesaurus`, and
the stage `freemask.compose.v1 → freemask.place.v1`, all over `ThesaurusIndex`.

With `thesaurus.version` unset, the service builds the reference world's index at
start-up (a few seconds) and stores it under its content digest; an operator
serves an index built from their own corpus with `freemask thesaurus build` and
`FREEMASK_THESAURUS__VERSION`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from prometheus_client import Counter

from freemask.shared.bus import InboundMessage, OutboundMessage, Topics
from freemask.shared.config import FreemaskConfig
from freemask.shared.errors import InvalidInput, NotFound
from freemask.shared.keys import thesaurus_prefix, validate_version
from freemask.shared.metrics import ServiceMetrics
from freemask.shared.runner import ServiceContext, ServiceParts, StageSpec
from freemask.shared.store import ObjectNotFound, ObjectStore
from freemask.thesaurus.corpus import CaptionCorpus, reference_corpus
from freemask.thesaurus.index import INDEX_FILE, ThesaurusIndex, build_index
from freemask.thesaurus.plan import ComposePlanner, SingleObjectPool
from freemask.thesaurus.words import WordNormalizer
from freemask.v1 import compose_pb2, thesaurus_pb2

log = logging.getLogger(__name__)


def index_key(version: str) -> str:
    return thesaurus_prefix(version) + INDEX_FILE


class IndexRepository:
    """Versioned indexes under `thesaurus/{version}/index.json`; a version never changes content."""

    def __init__(self, store: ObjectStore, cached_versions: int = 4) -> None:
        self._store = store
        self._cache: OrderedDict[str, ThesaurusIndex] = OrderedDict()
        self._cached_versions = cached_versions

    def publish(self, index: ThesaurusIndex, version: str | None = None) -> str:
        """Store `index` as `version` (default: its content digest) and return the version.

        Publishing the same bytes again is a no-op; other bytes under an existing version are
        InvalidInput, because samples record the version and must keep meaning the same counts.
        """
        data = index.to_bytes()
        version = validate_version(version or index.content_version(), "thesaurus version")
        key = index_key(version)
        try:
            existing = self._store.get_bytes(key)
        except ObjectNotFound:
            existing = None
        if existing is not None and existing != data:
            raise InvalidInput(f"thesaurus version {version!r} already exists with other counts; "
                               "versions are immutable, choose a new one")
        if existing is None:
            self._store.put_bytes(key, data, "application/json")
        self._remember(version, index)
        return version

    def load(self, version: str) -> ThesaurusIndex:
        version = validate_version(version, "thesaurus version")
        if version in self._cache:
            self._cache.move_to_end(version)
            return self._cache[version]
        try:
            data = self._store.get_bytes(index_key(version))
        except ObjectNotFound:
            raise NotFound(f"no thesaurus index {version!r} under {thesaurus_prefix(version)}") from None
        index = ThesaurusIndex.from_bytes(data, index_key(version))
        self._remember(version, index)
        return index

    def _remember(self, version: str, index: ThesaurusIndex) -> None:
        self._cache[version] = index
        self._cache.move_to_end(version)
        while len(self._cache) > self._cached_versions:
            self._cache.popitem(last=False)


def normalizer_for(config: FreemaskConfig) -> WordNormalizer:
    """Objects are the configured classes, backgrounds the configured backgrounds."""
    return WordNormalizer(config.world.classes, config.world.backgrounds, config.thesaurus.synonyms)


def build_and_publish(config: FreemaskConfig, repository: IndexRepository, corpus: CaptionCorpus,
                      version: str | None = None, progress: bool = False) -> tuple[str, ThesaurusIndex]:
    index = build_index(corpus, normalizer_for(config), corpus.describe(), progress=progress)
    return repository.publish(index, version), index


def served_version(config: FreemaskConfig, repository: IndexRepository) -> str:
    """The configured version, or the reference world's index, built and stored if needed."""
    if config.thesaurus.version is not None:
        repository.load(config.thesaurus.version)  # fail at start-up, not on the first request
        return config.thesaurus.version
    corpus = reference_corpus(config, config.thesaurus.reference_captions, config.thesaurus.reference_seed)
    version, _ = build_and_publish(config, repository, corpus)
    log.info("built the reference thesaurus", extra={"version": version,
                                                      "captions": config.thesaurus.reference_captions})
    return version


class ThesaurusApi:
    """gRPC servicer: read-only queries on the served index or on a version the request names."""

    def __init__(self, repository: IndexRepository, version: str) -> None:
        self._repository = repository
        self._version = version

    def _index(self, requested: str) -> tuple[str, ThesaurusIndex]:
        version = requested or self._version
        return version, self._repository.load(version)

    def Relation(self, request: thesaurus_pb2.RelationRequest) -> thesaurus_pb2.RelationResponse:
        version, index = self._index(request.thesaurus_version)
        found = index.relation(request.object_name, request.background_name)
        return thesaurus_pb2.RelationResponse(relation=found.relation, co_occurrence_count=found.co_occurrence_count,
                                              background_count=found.background_count, thesaurus_version=version)

    def TopObjects(self, request: thesaurus_pb2.TopObjectsRequest) -> thesaurus_pb2.TopObjectsResponse:
        version, index = self._index(request.thesaurus_version)
        ranked = index.top_objects(request.background_name, request.k, request.exclude, request.min_relation)
        return thesaurus_pb2.TopObjectsResponse(
            objects=[thesaurus_pb2.RankedObject(object_name=r.object_name, relation=r.relation,
                                                co_occurrence_count=r.co_occurrence_count) for r in ranked],
            background_count=index.background_count(request.background_name), thesaurus_version=version)


class ComposeStage:
    """Stage adapter: a ComposeRequest in, the first PlacementTask out on `freemask.place.v1`."""

    def __init__(self, planner: ComposePlanner, metrics: ServiceMetrics | None = None) -> None:
        self._planner = planner
        self._drawn = None if metrics is None else Counter(
            "freemask_thesaurus_drawn_objects", "objects planned into composed scenes, by class",
            ["service", "object"], registry=metrics.registry)
        self._service = None if metrics is None else metrics.service

    def handle(self, message: InboundMessage) -> list[OutboundMessage]:
        task = self._planner.plan(message.decode(compose_pb2.ComposeRequest))
        if self._drawn is not None:
            for planned in (task.next_object, *task.remaining_objects):
                self._drawn.labels(self._service, planned.class_name).inc()
        return [OutboundMessage(Topics.PLACE, task.sample_id, task)]


def build(context: ServiceContext) -> ServiceParts:
    config = context.config
    repository = IndexRepository(context.store, config.thesaurus.cached_versions)
    version = served_version(config, repository)
    planner = ComposePlanner(config, repository.load(version), version, SingleObjectPool(context.store))
    stage = ComposeStage(planner, context.metrics)
    descriptor = thesaurus_pb2.DESCRIPTOR.services_by_name["Thesaurus"]
    return ServiceParts(grpc_services=[(descriptor, ThesaurusApi(repository, version))],
                        stage=StageSpec(Topics.COMPOSE, stage.handle))
