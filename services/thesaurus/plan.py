"""The compose plan: which objects a base scene gets, and which generated single
object supplies each one's pixels.

Everything random comes from one generator seeded by the request's seed and
sample id, so a redelivered ComposeRequest plans the same objects from the same
sources, as long as the pool it reads is the same. The coordinator asks for
compositions only after the round's single objects are written, which keeps the
pool fixed while a round composes.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from freemask.shared.config import FreemaskConfig
from freemask.shared.errors import InvalidInput, Unavailable, Unusable, shown
from freemask.shared.keys import validate_id, validate_round
from freemask.shared.scene_steps import generation_record
from freemask.shared.singles import single_object_from_meta, single_object_instance, validate_single_object
from freemask.shared.store import ObjectStore
from freemask.thesaurus.index import Relation, ThesaurusIndex
from freemask.v1 import common_pb2, compose_pb2, generate_pb2

log = logging.getLogger(__name__)

THESAURUS_MODEL_NAME = "thesaurus"
MAX_OBJECTS_TO_ADD = 16


def plan_rng(seed: int) -> np.random.Generator:
    """The one source of randomness of a sample's plan. The seed alone, not the sample id: the
    coordinator derives each slot's seed from the run's seed, so two runs with one seed (an
    ablation and its full run, say) draw the same plans wherever their pools agree."""
    return np.random.default_rng(seed)


def draw_objects(index: ThesaurusIndex, background: str, count: int, min_relation: float,
                 rng: np.random.Generator, available: Collection[str] | None = None) -> list[Relation]:
    """`count` objects drawn with replacement, each with probability ∝ R(o, b), among objects
    with R >= `min_relation` (and R > 0) that are `available`."""
    if count < 1:
        raise InvalidInput(f"count must be >= 1, got {count}")
    candidates = [r for r in index.ranked(background, min_relation=min_relation)
                  if available is None or r.object_name in available]
    if not candidates:
        raise Unusable(f"no object has R(o, {background!r}) >= {min_relation}"
                       + ("" if available is None else f" among those with a generated source: {sorted(available)}"))
    weights = np.array([r.relation for r in candidates], dtype=np.float64)
    picks = rng.choice(len(candidates), size=count, replace=True, p=weights / weights.sum())
    return [candidates[int(i)] for i in picks]


def draw_uniformly(index: ThesaurusIndex, background: str, count: int, rng: np.random.Generator,
                   available: Collection[str]) -> list[Relation]:
    """`count` objects drawn with replacement, each `available` object equally likely whatever
    R(o, b) says: the thesaurus ablation (the relation is still recorded with each choice)."""
    if count < 1:
        raise InvalidInput(f"count must be >= 1, got {count}")
    candidates = sorted(available)
    if not candidates:
        raise Unusable("no object has a generated source to draw from")
    return [index.relation(candidates[int(i)], background) for i in rng.integers(len(candidates), size=count)]


class SingleObjectPool:
    """The generated single objects of one run's round, read from their `meta.json` files.

    A `meta.json` is written last and never changes, so parsed records are cached by key
    (bounded); each call costs one listing plus the records not seen before.
    """

    def __init__(self, store: ObjectStore, cache_size: int = 100_000) -> None:
        self._store = store
        self._cache: OrderedDict[str, generate_pb2.SingleObject | None] = OrderedDict()
        self._cache_size = cache_size

    def by_class(self, run_id: str, round_index: int) -> dict[str, list[generate_pb2.SingleObject]]:
        """Class name -> that class's single objects, ordered by their generation seed (then sample
        id): the seed comes from the run's seed and the slot, the sample id also from the run id."""
        prefix = f"runs/{validate_id(run_id, 'run id')}/rounds/{validate_round(round_index)}/samples/"
        pool: dict[str, list[generate_pb2.SingleObject]] = {}
        for info in self._store.list(prefix):
            if info.key.endswith("/meta.json"):
                single = self._read(info.key)
                if single is not None:
                    pool.setdefault(single.class_name, []).append(single)
        for singles in pool.values():
            singles.sort(key=lambda s: (s.seed, s.sample_id))
        return pool

    def _read(self, key: str) -> generate_pb2.SingleObject | None:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            single: generate_pb2.SingleObject | None = single_object_from_meta(self._store.get_bytes(key), key)
        except InvalidInput as err:  # a composed sample's meta.json, or a damaged one: not a source
            log.debug("not a single object", extra={"key": key, "reason": str(err)})
            single = None
        self._cache[key] = single
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return single


@dataclass(frozen=True)
class ComposePlanner:
    """ComposeRequest -> the first PlacementTask, carrying the whole plan."""

    config: FreemaskConfig
    index: ThesaurusIndex
    index_version: str
    pool: SingleObjectPool

    def plan(self, request: compose_pb2.ComposeRequest) -> compose_pb2.PlacementTask:
        base = self._validate(request)
        pool = self.pool.by_class(request.run_id, request.round)
        sources = {cls: [s for s in singles if s.sample_id not in (base.sample_id, request.sample_id)]
                   for cls, singles in pool.items() if cls in self.config.world.classes}
        sources = {cls: singles for cls, singles in sources.items() if singles}
        if not sources:
            raise Unavailable(f"no generated single objects in run {request.run_id!r} round {request.round} to "
                              "paste from yet")
        rng = plan_rng(request.seed)
        if self.config.thesaurus.object_choice == "uniform":
            drawn = draw_uniformly(self.index, request.background_name, request.num_objects_to_add, rng, sources)
        else:
            drawn = draw_objects(self.index, request.background_name, request.num_objects_to_add,
                                 self.config.thesaurus.min_relation, rng, available=set(sources))
        planned = [self._planned(choice, sources[choice.object_name], rng) for choice in drawn]
        return compose_pb2.PlacementTask(
            run_id=request.run_id, round=request.round, sample_id=request.sample_id,
            background_name=request.background_name,
            scene=compose_pb2.SceneState(keys=common_pb2.SampleKeys(image_key=base.keys.image_key,
                                                                    label_key=base.keys.label_key),
                                         image_size=base.image_size, objects=[single_object_instance(base)]),
            next_object=planned[0], remaining_objects=planned[1:], step_index=0, seed=request.seed,
            provenance=common_pb2.Provenance(
                generations=[generation_record(base)],
                models=[m for m in (base.affinity,) if m.name]
                + [common_pb2.ModelVersion(name=THESAURUS_MODEL_NAME, version=self.index_version)],
                compose_seed=request.seed),
        )

    def _planned(self, choice: Relation, sources: Sequence[generate_pb2.SingleObject],
                 rng: np.random.Generator) -> compose_pb2.PlannedObject:
        source = sources[int(rng.integers(len(sources)))]
        return compose_pb2.PlannedObject(class_id=self.config.world.classes.index(choice.object_name) + 1,
                                         class_name=choice.object_name, relation=choice.relation, source=source)

    def _validate(self, request: compose_pb2.ComposeRequest) -> generate_pb2.SingleObject:
        validate_id(request.run_id, "run id")
        validate_round(request.round)
        validate_id(request.sample_id, "sample id")
        if not request.HasField("base_scene"):
            raise InvalidInput("base_scene is missing")
        base = request.base_scene
        world = self.config.world
        # The composition is written under the request's run: a base of another run or round would
        # make it read (and record in its provenance) samples that are not its own.
        validate_single_object(base, request.run_id, request.round, world.classes, "base scene")
        if base.sample_id == request.sample_id:
            raise InvalidInput(f"sample_id {request.sample_id!r} must differ from the base scene's: the "
                               "composition writes under its own id and never modifies the base")
        if not base.prompt.strip():
            raise InvalidInput("base scene prompt is empty")
        if len(base.prompt) > self.config.limits.max_prompt_chars:  # it is copied into every step and sample
            raise InvalidInput(f"base scene prompt has {len(base.prompt)} characters; the limit is "
                               f"{self.config.limits.max_prompt_chars}")
        if request.background_name not in world.backgrounds:
            raise InvalidInput(f"unknown background {shown(request.background_name, 64)}; "
                               f"configured: {', '.join(world.backgrounds)}")
        if not 1 <= request.num_objects_to_add <= MAX_OBJECTS_TO_ADD:
            raise InvalidInput(f"num_objects_to_add must be in 1..{MAX_OBJECTS_TO_ADD}, "
                               f"got {request.num_objects_to_add}")
        if base.image_size.width < 1 or base.image_size.height < 1:
            raise InvalidInput("base scene image_size is missing")
        return base
