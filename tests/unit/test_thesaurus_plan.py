"""The compose plan: draws in proportion to R, reproducible per sample, sources from
the round's pool, and a first PlacementTask that carries the whole plan."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from memory_store import MemoryStore

from freemask.shared.config import FreemaskConfig, load_config
from freemask.shared.errors import InvalidInput, Unavailable, Unusable
from freemask.thesaurus.index import ThesaurusIndex, build_index
from freemask.shared.singles import single_object_meta
from freemask.thesaurus.plan import ComposePlanner, SingleObjectPool, draw_objects, draw_uniformly, plan_rng
from freemask.thesaurus.service import normalizer_for
from freemask.v1 import common_pb2, compose_pb2, generate_pb2

CAPTIONS = ["a boat on the sea"] * 6 + ["a plane over the sea"] * 3 + ["a bird over the sea"] + ["a car on the road"]


@pytest.fixture(scope="module")
def config() -> FreemaskConfig:
    return load_config(environ={"FREEMASK_THESAURUS__MIN_RELATION": "0.05"})


@pytest.fixture(scope="module")
def index(config: FreemaskConfig) -> ThesaurusIndex:
    return build_index(CAPTIONS, normalizer_for(config), {"name": "test"})


def test_draws_follow_r_among_objects_above_min_relation(index: ThesaurusIndex) -> None:
    drawn = Counter(r.object_name for r in draw_objects(index, "sea", 20_000, 0.05, np.random.default_rng(0)))
    assert set(drawn) == {"boat", "aeroplane", "bird"}
    assert drawn["boat"] / 20_000 == pytest.approx(0.6, abs=0.02)
    assert drawn["aeroplane"] / 20_000 == pytest.approx(0.3, abs=0.02)
    assert drawn["bird"] / 20_000 == pytest.approx(0.1, abs=0.02)
    only_strong = {r.object_name for r in draw_objects(index, "sea", 200, 0.2, np.random.default_rng(0))}
    assert only_strong == {"boat", "aeroplane"}


def test_draws_keep_to_available_objects_and_fail_clearly_without_any(index: ThesaurusIndex) -> None:
    assert {r.object_name for r in draw_objects(index, "sea", 50, 0.0, np.random.default_rng(1),
                                                 available={"bird", "car"})} == {"bird"}
    with pytest.raises(Unusable, match=r"no object has R\(o, 'sea'\) >= 0.7"):
        draw_objects(index, "sea", 3, 0.7, np.random.default_rng(1))
    with pytest.raises(Unusable, match="among those with a generated source"):
        draw_objects(index, "sea", 3, 0.0, np.random.default_rng(1), available={"car"})


def test_uniform_draws_ignore_r_and_still_record_it(index: ThesaurusIndex) -> None:
    """The no-thesaurus ablation: a car (R = 0 on the sea) is as likely as a boat."""
    drawn = draw_uniformly(index, "sea", 20_000, np.random.default_rng(0), {"boat", "car"})
    counts = Counter(r.object_name for r in drawn)
    assert counts["car"] / 20_000 == pytest.approx(0.5, abs=0.02)
    assert {(r.object_name, r.relation) for r in drawn} == {("boat", 0.6), ("car", 0.0)}
    with pytest.raises(Unusable, match="no object has a generated source"):
        draw_uniformly(index, "sea", 3, np.random.default_rng(0), set())


def test_the_plan_draws_depend_on_the_seed_alone() -> None:
    def draws(seed: int) -> list[int]:
        return list(plan_rng(seed).integers(1000, size=8))

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def make_single(sample_id: str, cls: str, config: FreemaskConfig, background: str = "sea") -> generate_pb2.SingleObject:
    prefix = f"runs/run-a/rounds/0/samples/{sample_id}/"
    return generate_pb2.SingleObject(
        sample_id=sample_id, run_id="run-a", round=0, class_id=config.world.classes.index(cls) + 1, class_name=cls,
        background_name=background, prompt=f"a {cls}", seed=1,
        keys=common_pb2.SampleKeys(image_key=prefix + "image.png", label_key=prefix + "label.png",
                                   meta_key=prefix + "meta.json"),
        image_size=common_pb2.ImageSize(width=32, height=32), threshold=0.6,
        mask_box=common_pb2.BoundingBox(x=1, y=2, width=5, height=4), mask_area_pixels=15,
        generator=common_pb2.ModelVersion(name="generator", version="g1"))


class FixedPool:
    """The round's pool as the store would list it, for planning without a store."""

    def __init__(self, singles: list[generate_pb2.SingleObject]) -> None:
        self.singles = singles

    def by_class(self, run_id: str, round_index: int) -> dict[str, list[generate_pb2.SingleObject]]:
        pool: dict[str, list[generate_pb2.SingleObject]] = {}
        for single in sorted(self.singles, key=lambda s: (s.seed, s.sample_id)):
            pool.setdefault(single.class_name, []).append(single)
        return pool


def compose_request(config: FreemaskConfig, **changes: object) -> compose_pb2.ComposeRequest:
    fields: dict = dict(run_id="run-a", round=0, sample_id="c-0-1", base_scene=make_single("s-base", "boat", config),
                        background_name="sea", num_objects_to_add=3, seed=42)
    fields.update(changes)
    return compose_pb2.ComposeRequest(**fields)


@pytest.fixture
def planner(config: FreemaskConfig, index: ThesaurusIndex) -> ComposePlanner:
    pool = [make_single(f"s-{cls}-{i}", cls, config) for cls in ("boat", "aeroplane", "car") for i in range(3)]
    return ComposePlanner(config, index, "sha256-test", FixedPool([make_single("s-base", "boat", config), *pool]))


def test_the_first_task_carries_the_scene_and_the_whole_plan(config: FreemaskConfig, planner: ComposePlanner) -> None:
    request = compose_request(config)
    task = planner.plan(request)
    assert (task.run_id, task.round, task.sample_id, task.background_name, task.step_index, task.seed) == (
        "run-a", 0, "c-0-1", "sea", 0, 42)
    assert task.scene.keys.image_key == request.base_scene.keys.image_key
    assert task.scene.keys.label_key == request.base_scene.keys.label_key
    (base,) = task.scene.objects
    assert (base.instance_id, base.class_name, base.origin, base.visible_area_pixels) == (
        1, "boat", common_pb2.OBJECT_ORIGIN_GENERATED, 15)
    plan = [task.next_object, *task.remaining_objects]
    assert len(plan) == 3
    for planned in plan:
        assert planned.class_name in {"boat", "aeroplane"}  # car never goes with the sea; bird has no source
        assert planned.source.class_name == planned.class_name and planned.source.sample_id != "s-base"
        assert planned.class_id == config.world.classes.index(planned.class_name) + 1
        assert planned.relation == pytest.approx({"boat": 6 / 10, "aeroplane": 3 / 10}[planned.class_name])
    assert [g.sample_id for g in task.provenance.generations] == ["s-base"]
    assert task.provenance.models[-1] == common_pb2.ModelVersion(name="thesaurus", version="sha256-test")
    assert task.provenance.compose_seed == 42


def test_a_redelivery_plans_the_same_and_another_seed_plans_otherwise(config: FreemaskConfig,
                                                                      planner: ComposePlanner) -> None:
    first = planner.plan(compose_request(config, num_objects_to_add=8))
    assert planner.plan(compose_request(config, num_objects_to_add=8)) == first
    others = [planner.plan(compose_request(config, num_objects_to_add=8, seed=seed)) for seed in range(5)]
    assert any(other.next_object != first.next_object or other.remaining_objects != first.remaining_objects
               for other in others)


def stored_single(store: MemoryStore, run: str, sample_id: str, cls: str, seed: int,
                  config: FreemaskConfig) -> generate_pb2.SingleObject:
    """A single object of `run` with its meta.json in the store, as the attention-mask stage leaves it."""
    single = make_single(sample_id, cls, config)
    prefix = f"runs/{run}/rounds/0/samples/{sample_id}/"
    single.run_id, single.seed = run, seed
    single.keys.CopyFrom(common_pb2.SampleKeys(image_key=prefix + "image.png", label_key=prefix + "label.png",
                                               meta_key=prefix + "meta.json"))
    store.put_bytes(single.keys.meta_key, single_object_meta(single, {}))
    return single


def test_two_runs_with_one_seed_plan_the_same_whatever_their_ids(config: FreemaskConfig,
                                                                 index: ThesaurusIndex) -> None:
    """What lets an ablation run compose the scenes its full run composed: the plan depends on the
    request's seed and the pool's generation seeds, not on the run's or the samples' ids."""
    store = MemoryStore()
    planner = ComposePlanner(config, index, "v", SingleObjectPool(store))
    classes = ("boat", "boat", "boat", "aeroplane", "aeroplane", "aeroplane")
    plans = []
    for run, names in (("run-a", "abcdef"), ("run-b", "fedcba")):  # ids that sort in opposite orders
        for i, cls in enumerate(classes):
            stored_single(store, run, f"s-{names[i]}", cls, 100 + i, config)
        base = stored_single(store, run, "s-base", "boat", 7, config)
        task = planner.plan(compose_request(config, run_id=run, sample_id=f"c-{run}", base_scene=base,
                                            num_objects_to_add=8))
        plans.append([(p.class_name, p.source.seed) for p in (task.next_object, *task.remaining_objects)])
    assert plans[0] == plans[1]
    assert len({seed for _, seed in plans[0]}) > 2  # the plan does choose among the sources


def test_an_empty_pool_is_retryable(config: FreemaskConfig, index: ThesaurusIndex) -> None:
    planner = ComposePlanner(config, index, "v", FixedPool([make_single("s-base", "boat", config)]))
    with pytest.raises(Unavailable, match="no generated single objects in run 'run-a' round 0"):
        planner.plan(compose_request(config))


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"sample_id": "s-base"}, "must differ from the base scene's"),
    ({"sample_id": "C/1"}, "sample id 'C/1' is not a valid id"),
    ({"background_name": "moon"}, "unknown background 'moon'"),
    ({"num_objects_to_add": 0}, r"num_objects_to_add must be in 1..16, got 0"),
    ({"num_objects_to_add": 17}, r"num_objects_to_add must be in 1..16, got 17"),
    ({"base_scene": None}, "base_scene is missing"),
])
def test_bad_requests_are_refused(config: FreemaskConfig, planner: ComposePlanner, changes: dict,
                                  fragment: str) -> None:
    request = compose_request(config, **{k: v for k, v in changes.items() if v is not None})
    if changes.get("base_scene", 1) is None:
        request.ClearField("base_scene")
    with pytest.raises(InvalidInput, match=fragment):
        planner.plan(request)


def test_base_keys_outside_the_base_sample_are_refused(config: FreemaskConfig, planner: ComposePlanner) -> None:
    request = compose_request(config)
    request.base_scene.keys.image_key = "runs/other/rounds/0/samples/x/image.png"
    with pytest.raises(InvalidInput, match="base scene image_key .* lies outside"):
        planner.plan(request)
