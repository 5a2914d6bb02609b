"""The run exports (COCO instances, Pascal-VOC layout, JSONL manifest) over a saved run whose
accepted samples are rendered reference-world scenes, so every mask, area and class is known.

The run has two rounds: round 0 retains a composed scene in which later objects occlude the
first (plus a listed object that is covered entirely) and a single-object sample (no
instance map), and leaves one slot below the cut; round 1 retains a composed scene with an
ignore (255) rim around its objects.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format
from memory_store import MemoryStore
from PIL import Image
from pycocotools.coco import COCO

from freemask.coordinator.exports import ExportMismatch, export_run, verify_coco
from freemask.coordinator.rounds import COMPLETED, RoundRecord, RunRecord, RunSettings, Slot
from freemask.coordinator.service import RunRepository
from freemask.shared.config import load_config
from freemask.shared.errors import InvalidInput, NotFound
from freemask.shared.images import decode_instance_map, encode_png, encode_png16
from freemask.shared.keys import sample_key
from freemask.v1 import common_pb2, samples_pb2
from freemask.world import Scene, dataset, render_scene

RUN = "export-run"
CONFIG = load_config(environ={})
IGNORE_RGB = (224, 224, 192)

# sample id -> (round, slot kind, score, scene); OCCLUDED's first object is partly covered by later ones.
OCCLUDED, SINGLE, BELOW_CUT, RIMMED = "r0-composed", "r0-single", "r0-low", "r1-composed"
SCENES = {
    OCCLUDED: (0, "composed", 0.9, dataset("val", 15, 32)),
    SINGLE: (0, "single", 0.8, dataset("val", 7, 32)),
    BELOW_CUT: (0, "single", 0.1, dataset("val", 3, 32)),
    RIMMED: (1, "composed", 0.7, dataset("val", 9, 32, edge_ignore=True)),
}
ACCEPTED = [OCCLUDED, SINGLE, RIMMED]
COVERED_INSTANCE = 9  # listed in OCCLUDED's objects, with no pixel left in its maps


def sample_of(sample_id: str, round_index: int, kind: str, scene: Scene) -> samples_pb2.Sample:
    composed = kind == "composed"
    keys = common_pb2.SampleKeys(image_key=sample_key(RUN, round_index, sample_id, "image.png"),
                                 label_key=sample_key(RUN, round_index, sample_id, "label.png"),
                                 instance_map_key=sample_key(RUN, round_index, sample_id, "instances.png")
                                 if composed else "")
    objects = [common_pb2.ObjectInstance(
        class_id=o.class_id, class_name=o.cls, instance_id=o.instance_id, visible_area_pixels=o.visible_pixels,
        box=common_pb2.BoundingBox(x=o.box[0], y=o.box[1], width=o.box[2] - o.box[0], height=o.box[3] - o.box[1]),
        origin=common_pb2.OBJECT_ORIGIN_GENERATED if o.instance_id == 1 else common_pb2.OBJECT_ORIGIN_PASTED)
        for o in scene.objects]
    if sample_id == OCCLUDED:
        objects.append(common_pb2.ObjectInstance(class_id=1, class_name="aeroplane", instance_id=COVERED_INSTANCE,
                                                 visible_area_pixels=0, origin=common_pb2.OBJECT_ORIGIN_PASTED))
    generations = [common_pb2.GenerationRecord(
        sample_id=f"{sample_id}-g{o.instance_id}", class_name=o.cls, prompt=o.caption, seed=1000 + o.instance_id,
        threshold=0.4, generator=common_pb2.ModelVersion(name="generator", version="tiny-1"))
        for o in scene.objects]
    return samples_pb2.Sample(
        sample_id=sample_id, run_id=RUN, round=round_index,
        kind=samples_pb2.SAMPLE_KIND_COMPOSED if composed else samples_pb2.SAMPLE_KIND_SINGLE, keys=keys,
        image_size=common_pb2.ImageSize(width=32, height=32), background_name=scene.background, objects=objects,
        provenance=common_pb2.Provenance(generations=generations,
                                         models=[common_pb2.ModelVersion(name="affinity", version="a-1")],
                                         compose_seed=77 if composed else 0))


def save_run(store: MemoryStore, retained: dict[int, list[str]] | None = None) -> None:
    """The run's state and every sample's files in the store."""
    retained = {0: [OCCLUDED, SINGLE], 1: [RIMMED]} if retained is None else retained
    rounds = {r: RoundRecord(round=r, trained=True, threshold=0.7 - 0.1 * r,
                             retained=retained.get(r, [])) for r in (0, 1)}
    for sample_id, (round_index, kind, score, scene) in SCENES.items():
        sample = sample_of(sample_id, round_index, kind, scene)
        generate_id, composed_id = (f"{sample_id}-base", sample_id) if kind == "composed" else (sample_id, None)
        slot = Slot(kind, generate_id, composed_id, score=score,
                    sample=json_format.MessageToDict(sample, preserving_proto_field_name=True))
        rounds[round_index].slots.append(slot)
        store.put_bytes(sample.keys.image_key, encode_png(scene.image))
        store.put_bytes(sample.keys.label_key, encode_png(scene.label))
        if sample.keys.instance_map_key:
            store.put_bytes(sample.keys.instance_map_key, encode_png16(scene.instances))
    settings = RunSettings(classes=("car", "cat"), backgrounds={"car": ("road",), "cat": ("room",)})
    record = RunRecord(run_id=RUN, seed=3, settings=settings, phase=COMPLETED, round=1,
                       rounds=[rounds[0], rounds[1]], accepted=[i for r in (0, 1) for i in retained.get(r, [])])
    RunRepository(store).save(record)


@pytest.fixture
def store() -> MemoryStore:
    store = MemoryStore()
    save_run(store)
    return store


def expected_mask(scene: Scene, instance_id: int, class_id: int) -> np.ndarray:
    """The object's pixels straight from the renderer: its instance, where the label map has its class."""
    return (scene.instances == instance_id) & (scene.label == class_id)


def test_coco_annotations_are_the_label_maps_exactly(store: MemoryStore, tmp_path: Path) -> None:
    out = tmp_path / "export"
    summary = export_run(store, CONFIG, RUN, "coco", out)

    coco = COCO(str(out / "coco/annotations/instances.json"))
    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == list(
        enumerate(CONFIG.world.classes, start=1))
    images = sorted(coco.imgs.values(), key=lambda image: image["id"])
    assert [image["sample_id"] for image in images] == ACCEPTED  # round order, below-cut sample left out
    expected_annotations = 0
    for image in images:
        scene = SCENES[image["sample_id"]][3]
        assert np.array_equal(np.asarray(Image.open(out / "coco/images" / image["file_name"])), scene.image)
        annotations = {a["instance_id"]: a for a in coco.imgToAnns[image["id"]]}
        assert sorted(annotations) == [o.instance_id for o in scene.objects]  # the covered object is left out
        for obj in scene.objects:
            annotation, mask = annotations[obj.instance_id], expected_mask(scene, obj.instance_id, obj.class_id)
            assert annotation["category_id"] == obj.class_id and annotation["iscrowd"] == 0
            assert np.array_equal(coco.annToMask(annotation).astype(bool), mask)
            assert annotation["area"] == mask.sum() > 0
            ys, xs = np.nonzero(mask)
            assert annotation["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        expected_annotations += len(scene.objects)
    assert summary.samples == 3 and summary.annotations == expected_annotations == len(coco.anns)
    assert set(summary.paths) == {p for p in out.rglob("*") if p.is_file()}
    assert verify_coco(out, store, CONFIG) == expected_annotations


def test_coco_keeps_only_the_visible_part_of_an_occluded_object(store: MemoryStore, tmp_path: Path) -> None:
    export_run(store, CONFIG, RUN, "coco", tmp_path / "export")
    coco = COCO(str(tmp_path / "export/coco/annotations/instances.json"))
    scene = SCENES[OCCLUDED][3]
    drawn_alone = render_scene(replace(scene.spec, objects=scene.spec.objects[:1])).instances == 1
    first = next(a for a in coco.anns.values() if a["image_id"] == 1 and a["instance_id"] == 1)
    visible = coco.annToMask(first).astype(bool)
    assert first["area"] == scene.objects[0].visible_pixels < drawn_alone.sum()
    assert not np.any(visible & ~drawn_alone)


def test_a_single_object_sample_is_instance_one_over_every_class_pixel(store: MemoryStore, tmp_path: Path) -> None:
    export_run(store, CONFIG, RUN, "coco", tmp_path / "export")
    coco = COCO(str(tmp_path / "export/coco/annotations/instances.json"))
    scene = SCENES[SINGLE][3]
    (annotation,) = coco.imgToAnns[2]
    assert annotation["instance_id"] == 1 and annotation["category_id"] == scene.objects[0].class_id
    assert np.array_equal(coco.annToMask(annotation).astype(bool), (scene.label != 0) & (scene.label != 255))


@pytest.mark.parametrize("tamper", ["area", "mask", "missing"])
def test_verify_coco_catches_an_annotation_that_disagrees_with_the_maps(store: MemoryStore, tmp_path: Path,
                                                                        tamper: str) -> None:
    out = tmp_path / "export"
    export_run(store, CONFIG, RUN, "coco", out)
    path = out / "coco/annotations/instances.json"
    document = json.loads(path.read_text())
    first, second = document["annotations"][:2]
    if tamper == "area":
        first["area"] += 1
    elif tamper == "mask":
        first["segmentation"] = second["segmentation"]
    else:
        document["annotations"].remove(second)
    path.write_text(json.dumps(document))
    with pytest.raises(ExportMismatch):
        verify_coco(out, store, CONFIG)


def test_voc_layout_with_the_standard_palette(store: MemoryStore, tmp_path: Path) -> None:
    out = tmp_path / "export"
    summary = export_run(store, CONFIG, RUN, "voc", out)
    voc = out / "voc"
    assert (voc / "ImageSets/Segmentation/train.txt").read_text().split() == ACCEPTED
    for sample_id in ACCEPTED:
        scene = SCENES[sample_id][3]
        jpeg = Image.open(voc / f"JPEGImages/{sample_id}.jpg")
        assert (jpeg.format, jpeg.mode, jpeg.size) == ("JPEG", "RGB", (32, 32))
        classes, objects = (Image.open(voc / f"Segmentation{what}/{sample_id}.png") for what in ("Class", "Object"))
        for segmentation in (classes, objects):
            assert (segmentation.format, segmentation.mode, segmentation.size) == ("PNG", "P", (32, 32))
            palette = segmentation.getpalette()
            assert palette[3:9] == [128, 0, 0, 0, 128, 0] and tuple(palette[255 * 3:]) == IGNORE_RGB
        assert np.array_equal(np.asarray(classes), scene.label)
        expected = np.where(scene.label == 255, 255, 0)
        for obj in scene.objects:
            expected[expected_mask(scene, obj.instance_id, obj.class_id)] = obj.instance_id
        assert np.array_equal(np.asarray(objects), expected)
    assert (np.asarray(Image.open(voc / f"SegmentationClass/{RIMMED}.png").convert("RGB"))[SCENES[RIMMED][3].label
                                                                                          == 255] == IGNORE_RGB).all()
    assert summary.samples == 3 and summary.annotations == sum(len(SCENES[i][3].objects) for i in ACCEPTED)


def test_jsonl_manifest_carries_scores_files_and_provenance(store: MemoryStore, tmp_path: Path) -> None:
    out = tmp_path / "export"
    export_run(store, CONFIG, RUN, "jsonl", out)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [line["sample_id"] for line in lines] == ACCEPTED
    for line in lines:
        round_index, kind, score, scene = SCENES[line["sample_id"]]
        sample = sample_of(line["sample_id"], round_index, kind, scene)
        assert (line["round_accepted"], line["kind"], line["run_id"]) == (round_index, kind, RUN)
        assert line["score"] == pytest.approx(score)
        assert line["score_threshold"] == pytest.approx(0.7 - 0.1 * round_index)
        assert line["segmenter"] == {"name": "segmenter", "version": f"{RUN}/{round_index}"}
        assert json_format.ParseDict(line["keys"], common_pb2.SampleKeys()) == sample.keys
        provenance = json_format.ParseDict(line["provenance"], common_pb2.Provenance())
        assert provenance == sample.provenance
        assert [g["prompt"] for g in line["provenance"]["generations"]] == [o.caption for o in scene.objects]
        assert [json_format.ParseDict(o, common_pb2.ObjectInstance()) for o in line["objects"]] == list(sample.objects)
        assert np.array_equal(np.asarray(Image.open(out / line["files"]["image"])), scene.image)
        assert np.array_equal(np.asarray(Image.open(out / line["files"]["label"])), scene.label)
        instances = decode_instance_map((out / line["files"]["instances"]).read_bytes(), CONFIG.limits)
        assert np.array_equal(instances > 0, scene.instances > 0 if kind == "composed" else
                              (scene.label != 0) & (scene.label != 255))


def test_bad_inputs(store: MemoryStore, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        export_run(store, CONFIG, "no-such-run", "coco", tmp_path / "a")
    with pytest.raises(InvalidInput, match="format"):
        export_run(store, CONFIG, RUN, "yolo", tmp_path / "b")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInput, match="overwrite"):
        export_run(store, CONFIG, RUN, "jsonl", occupied)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    empty = MemoryStore()
    save_run(empty, retained={})
    with pytest.raises(InvalidInput, match="no accepted sample"):
        export_run(empty, CONFIG, RUN, "coco", tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]


def test_an_existing_empty_directory_is_filled(store: MemoryStore, tmp_path: Path) -> None:
    (tmp_path / "export").mkdir()
    summary = export_run(store, CONFIG, RUN, "jsonl", tmp_path / "export")
    assert (tmp_path / "export/manifest.jsonl").is_file() and summary.samples == 3
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


@pytest.mark.parametrize("fmt", ["coco", "voc", "jsonl"])
@pytest.mark.parametrize("damage", ["missing", "undecodable"])
def test_a_broken_sample_fails_the_export_and_leaves_nothing(store: MemoryStore, tmp_path: Path, fmt: str,
                                                             damage: str) -> None:
    image_key = sample_key(RUN, 1, RIMMED, "image.png")  # the last sample: the others are already written
    if damage == "missing":
        store.delete(image_key)
    else:
        store.put_bytes(image_key, b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InvalidInput, match=RIMMED):
        export_run(store, CONFIG, RUN, fmt, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []
