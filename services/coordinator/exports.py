"""A run's accepted samples as files: COCO instances, the Pascal-VOC layout, a JSONL manifest.

The accepted samples are the ids each round retained (its α cut), each once, in round
order; a sample's score, cut, round and segmenter come from the RoundRecord that kept it.
Everything else is read from the store: the saved run state and each sample's image,
label map and instance map.

    out_dir/coco/annotations/instances.json, out_dir/coco/images/{id}.png
    out_dir/voc/JPEGImages/{id}.jpg, voc/SegmentationClass/{id}.png, voc/SegmentationObject/{id}.png,
        voc/ImageSets/Segmentation/train.txt
    out_dir/manifest.jsonl, out_dir/{images,labels,instances}/{id}.png

An object's pixels are those of its instance id in the instance map that carry a class
in the label map (the label map is what the scores judged, so an ignore rim or a hole in
it is not the object's). A single-object sample has no instance map: its one object,
instance 1, is every class pixel of its label map.

An export is built in a hidden sibling of `out_dir` and renamed into place only when
complete (and, for COCO, verified), so a failed export leaves no `out_dir` at all.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from tqdm import tqdm

from freemask.coordinator.rounds import RunRecord
from freemask.coordinator.service import RunRepository
from freemask.scoring.models import SEGMENTER_MODEL_NAME
from freemask.shared.config import FreemaskConfig
from freemask.shared.errors import InvalidInput, NotFound
from freemask.shared.image_refs import ImageReader
from freemask.shared.images import encode_png, encode_png16, voc_colour_map
from freemask.shared.keys import segmenter_version
from freemask.shared.store import ObjectStore
from freemask.v1 import common_pb2, samples_pb2
from freemask.world.names import IGNORE_ID

FORMATS = ("coco", "voc", "jsonl")
COCO_ANNOTATIONS = Path("coco/annotations/instances.json")
VOC_TRAIN_LIST = Path("voc/ImageSets/Segmentation/train.txt")
MANIFEST = Path("manifest.jsonl")


class ExportMismatch(RuntimeError):
    """An exported file does not say what the store's label and instance maps say."""


@dataclass(frozen=True)
class AcceptedEntry:
    sample: samples_pb2.Sample
    kind: str  # the slot's kind: "single" or "composed"
    score: float
    score_threshold: float
    round_accepted: int
    segmenter: str  # "{run}/{round}": the version of f_t that scored it


@dataclass(frozen=True)
class ExportSummary:
    fmt: str
    out_dir: Path
    samples: int
    annotations: int  # COCO annotations (visible instances) or objects listed (VOC instances, manifest objects)
    paths: tuple[Path, ...]  # every file written, under out_dir


@dataclass(frozen=True)
class SamplePixels:
    image: np.ndarray  # uint8 H×W×3
    labels: np.ndarray  # uint8 H×W class ids
    instances: np.ndarray  # uint16 H×W instance ids (derived for a single-object sample)


def accepted_entries(record: RunRecord) -> list[AcceptedEntry]:
    """The retained samples of every round, each once, in round order (best first within a round)."""
    seen: set[str] = set()
    accepted = []
    for round_record in record.rounds:
        slots = {slot.final_id: slot for slot in round_record.slots}
        for sample_id in round_record.retained:
            if sample_id in seen:
                continue
            slot = slots.get(sample_id)
            if slot is None or slot.sample is None or slot.score is None:
                raise InvalidInput(f"run {record.run_id!r}: round {round_record.round} retained {sample_id!r} "
                                   "but holds no scored sample for it")
            seen.add(sample_id)
            accepted.append(AcceptedEntry(
                sample=json_format.ParseDict(slot.sample, samples_pb2.Sample()), kind=slot.kind, score=slot.score,
                score_threshold=round_record.cut_for(slot, record.settings.selection),
                round_accepted=round_record.round,
                segmenter=segmenter_version(record.run_id, round_record.round)))
    return accepted


def read_pixels(reader: ImageReader, sample: samples_pb2.Sample) -> SamplePixels:
    """A sample's image and maps from the store; InvalidInput naming the sample if any is missing or unreadable."""
    keys, name = sample.keys, f"sample {sample.sample_id!r}"
    try:
        if not keys.image_key or not keys.label_key:
            raise InvalidInput("its keys name no image or no label map")
        image = reader.stored_image(keys.image_key, "image")
        labels = reader.stored_labels(keys.label_key, "label map")
        instances = (reader.stored_instances(keys.instance_map_key, "instance map") if keys.instance_map_key
                     else single_instance_map(labels))
    except (InvalidInput, NotFound) as err:  # a missing object is this export's bad input, not a missing run
        raise InvalidInput(f"{name}: {err}") from None
    if labels.shape != image.shape[:2] or instances.shape != image.shape[:2]:
        raise InvalidInput(f"{name}: image {image.shape[:2]}, label map {labels.shape} and instance map "
                           f"{instances.shape} differ in size")
    return SamplePixels(image, labels, instances)


def single_instance_map(labels: np.ndarray) -> np.ndarray:
    return class_pixels(labels).astype(np.uint16)


def class_pixels(labels: np.ndarray) -> np.ndarray:
    return (labels != 0) & (labels != IGNORE_ID)


def instance_mask(labels: np.ndarray, instances: np.ndarray, instance_id: int) -> np.ndarray:
    return (instances == instance_id) & class_pixels(labels)


def visible_objects(sample: samples_pb2.Sample, pixels: SamplePixels, classes: tuple[str, ...]
                    ) -> Iterator[tuple[common_pb2.ObjectInstance, np.ndarray]]:
    """Each object with pixels left after occlusion, with its mask; InvalidInput where the label map disagrees."""
    for obj in sample.objects:
        if not 1 <= obj.class_id <= len(classes) or obj.class_name not in ("", classes[obj.class_id - 1]):
            raise InvalidInput(f"sample {sample.sample_id!r}: object {obj.instance_id} is class {obj.class_id} "
                               f"{obj.class_name!r}, not one of the configured classes {classes}")
        mask = instance_mask(pixels.labels, pixels.instances, obj.instance_id)
        if not mask.any():
            continue  # fully covered by later objects
        if np.any(pixels.labels[mask] != obj.class_id):
            raise InvalidInput(f"sample {sample.sample_id!r}: instance {obj.instance_id} (class {obj.class_id}) "
                               "covers label-map pixels of another class")
        yield obj, mask


def mask_bbox(mask: np.ndarray) -> list[int]:
    """[x, y, width, height] of a non-empty mask's tight box, as COCO writes it."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def coco_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))  # pycocotools reads column-major masks
    return {"size": [int(n) for n in rle["size"]], "counts": rle["counts"].decode("ascii")}


VOC_PALETTE = voc_colour_map().flatten().tolist()  # flat RGB, as PIL's putpalette takes it


def write_palette_png(path: Path, indices: np.ndarray) -> None:
    image = Image.fromarray(indices.astype(np.uint8))
    image.putpalette(VOC_PALETTE)  # an L image becomes P, its values the palette indices
    image.save(path, format="PNG")


def manifest_line(entry: AcceptedEntry, run_id: str, files: dict[str, str]) -> str:
    sample = entry.sample

    def as_json(message: Any) -> Any:  # proto3 JSON (64-bit ints as strings) so a line parses back into a Sample
        return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    return json.dumps({
        "sample_id": sample.sample_id, "run_id": run_id, "round": sample.round,
        "round_accepted": entry.round_accepted, "score": entry.score, "score_threshold": entry.score_threshold,
        "segmenter": {"name": SEGMENTER_MODEL_NAME, "version": entry.segmenter}, "kind": entry.kind,
        "keys": as_json(sample.keys), "files": files, "image_size": as_json(sample.image_size),
        "background_name": sample.background_name, "objects": [as_json(o) for o in sample.objects],
        "provenance": as_json(sample.provenance)}, sort_keys=True)


class _Writer:
    """Writes one format's files under a staging directory and remembers their final paths."""

    def __init__(self, staging: Path, final: Path) -> None:
        self.staging, self.final = staging, final
        self.paths: list[Path] = []

    def path(self, relative: str | Path) -> Path:
        target = self.staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        self.paths.append(self.final / relative)
        return target

    def write(self, relative: str | Path, data: bytes) -> str:
        self.path(relative).write_bytes(data)
        return str(relative)


def export_run(store: ObjectStore, config: FreemaskConfig, run_id: str, fmt: str, out_dir: Path) -> ExportSummary:
    """Export `run_id`'s accepted samples as `fmt` ("coco", "voc" or "jsonl") into `out_dir`, which must not exist
    or be empty."""
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InvalidInput(f"{out_dir} exists and is not an empty directory; refusing to overwrite it")
    record = RunRepository(store).load(run_id)
    if record is None:
        raise NotFound(f"no run {run_id!r}: coordinator/runs/{run_id}/state.json does not exist")
    entries = accepted_entries(record)
    if not entries:
        raise InvalidInput(f"run {run_id!r} has no accepted sample to export (phase {record.phase})")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A sibling on the same filesystem, so the final step is one rename.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        writer = _Writer(staging, out_dir)
        count = _EXPORTERS[fmt](writer, ImageReader(store, config.limits), config.world.classes, record, entries)
        if fmt == "coco":
            verify_coco(staging, store, config)
        if out_dir.exists():
            out_dir.rmdir()  # empty, as checked above; rename cannot replace it everywhere
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportSummary(fmt, out_dir, len(entries), count, tuple(writer.paths))


def _progress(entries: list[AcceptedEntry], fmt: str) -> Iterator[AcceptedEntry]:
    return tqdm(entries, desc=f"export {fmt}", unit="sample")  # tqdm writes to stderr


def _export_coco(writer: _Writer, reader: ImageReader, classes: tuple[str, ...], record: RunRecord,
                 entries: list[AcceptedEntry]) -> int:
    images, annotations = [], []
    for image_id, entry in enumerate(_progress(entries, "coco"), start=1):
        sample = entry.sample
        pixels = read_pixels(reader, sample)
        height, width = pixels.labels.shape
        file_name = f"{sample.sample_id}.png"
        writer.write(f"coco/images/{file_name}", encode_png(pixels.image))
        # The keys let verify_coco (and any reader) go back to the maps the annotations came from.
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height,
                       "sample_id": sample.sample_id, "label_key": sample.keys.label_key,
                       "instance_map_key": sample.keys.instance_map_key})
        for obj, mask in visible_objects(sample, pixels, classes):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": obj.class_id,
                                "segmentation": coco_rle(mask), "area": int(mask.sum()), "bbox": mask_bbox(mask),
                                "iscrowd": 0, "instance_id": obj.instance_id})
    document = {"info": {"description": f"Free-Mask run {record.run_id}: accepted samples"},
                "images": images, "annotations": annotations,
                "categories": [{"id": i, "name": name, "supercategory": name} for i, name in enumerate(classes, 1)]}
    writer.write(COCO_ANNOTATIONS, json.dumps(document).encode())
    return len(annotations)


def _export_voc(writer: _Writer, reader: ImageReader, classes: tuple[str, ...], record: RunRecord,
                entries: list[AcceptedEntry]) -> int:
    objects = 0
    for entry in _progress(entries, "voc"):
        sample = entry.sample
        pixels = read_pixels(reader, sample)
        Image.fromarray(pixels.image).save(writer.path(f"voc/JPEGImages/{sample.sample_id}.jpg"), format="JPEG",
                                           quality=95)
        write_palette_png(writer.path(f"voc/SegmentationClass/{sample.sample_id}.png"), pixels.labels)
        # VOC's object maps mark ignore pixels 255 too, and hold 8-bit ids.
        object_map = np.where(pixels.labels == IGNORE_ID, IGNORE_ID, 0).astype(np.uint8)
        for obj, mask in visible_objects(sample, pixels, classes):
            if obj.instance_id >= IGNORE_ID:
                raise InvalidInput(f"sample {sample.sample_id!r}: instance {obj.instance_id} does not fit VOC's "
                                   f"8-bit object map (ids 1..{IGNORE_ID - 1})")
            object_map[mask] = obj.instance_id
            objects += 1
        write_palette_png(writer.path(f"voc/SegmentationObject/{sample.sample_id}.png"), object_map)
    writer.write(VOC_TRAIN_LIST, "".join(f"{e.sample.sample_id}\n" for e in entries).encode())
    return objects


def _export_jsonl(writer: _Writer, reader: ImageReader, classes: tuple[str, ...], record: RunRecord,
                  entries: list[AcceptedEntry]) -> int:
    lines = []
    for entry in _progress(entries, "jsonl"):
        sample_id = entry.sample.sample_id
        pixels = read_pixels(reader, entry.sample)
        files = {"image": writer.write(f"images/{sample_id}.png", encode_png(pixels.image)),
                 "label": writer.write(f"labels/{sample_id}.png", encode_png(pixels.labels)),
                 "instances": writer.write(f"instances/{sample_id}.png", encode_png16(pixels.instances))}
        lines.append(manifest_line(entry, record.run_id, files))
    writer.write(MANIFEST, "".join(f"{line}\n" for line in lines).encode())
    return sum(len(e.sample.objects) for e in entries)


_EXPORTERS = {"coco": _export_coco, "voc": _export_voc, "jsonl": _export_jsonl}


def verify_coco(out_dir: Path, store: ObjectStore, config: FreemaskConfig) -> int:
    """Check a COCO export against the store: every annotation, decoded by pycocotools, is exactly its
    instance's pixels in the sample's label and instance maps, with that pixel count as area and the mask's
    box; every visible instance is annotated; every image is written at its size. Returns the annotations
    checked; ExportMismatch names the first difference."""
    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress to stdout
        coco = COCO(str(Path(out_dir) / COCO_ANNOTATIONS))
    reader = ImageReader(store, config.limits)
    checked = 0
    for image_id, image in coco.imgs.items():
        name = f"COCO image {image['file_name']}"
        with Image.open(Path(out_dir) / "coco/images" / image["file_name"]) as picture:
            if picture.size != (image["width"], image["height"]):
                raise ExportMismatch(f"{name} is {picture.size}, its entry says {image['width']}x{image['height']}")
        labels = reader.stored_labels(image["label_key"], "label map")
        instances = (reader.stored_instances(image["instance_map_key"], "instance map")
                     if image["instance_map_key"] else single_instance_map(labels))
        annotated = set()
        for annotation in coco.imgToAnns[image_id]:
            expected = instance_mask(labels, instances, annotation["instance_id"])
            what = f"{name}: annotation {annotation['id']} (instance {annotation['instance_id']})"
            if not np.array_equal(coco.annToMask(annotation).astype(bool), expected):
                raise ExportMismatch(f"{what}: its decoded mask is not the instance's pixels in the maps")
            label_pixels = int(np.count_nonzero(expected & (labels == annotation["category_id"])))
            if annotation["area"] != label_pixels or label_pixels != expected.sum():
                raise ExportMismatch(f"{what}: area {annotation['area']}, but the label map has {label_pixels} "
                                     f"pixels of class {annotation['category_id']} for it")
            if annotation["bbox"] != mask_bbox(expected):
                raise ExportMismatch(f"{what}: bbox {annotation['bbox']} is not the mask's {mask_bbox(expected)}")
            annotated.add(annotation["instance_id"])
        visible = {int(i) for i in np.unique(instances[class_pixels(labels)]) if i != 0}
        if visible != annotated:
            raise ExportMismatch(f"{name}: instances {sorted(visible)} are visible in the maps but "
                                 f"{sorted(annotated)} are annotated")
        checked += len(coco.imgToAnns[image_id])
    return checked
