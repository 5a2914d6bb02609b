"""The run report (one self-contained HTML page) over a saved run whose samples are rendered
reference-world scenes.

The run has two rounds. Round 0: a composed scene and a single object (with a soft map) are
retained, a single object without a soft map falls below the cut, one slot is dead-lettered;
f_0 has a validation mIoU. Round 1: a retained single object whose image is missing from the
store, and a rejected composed scene; f_1 has a validation mIoU too.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format
from memory_store import MemoryStore
from PIL import Image

from freemask.coordinator.report import heat_map, histogram_counts, shown_slots, write_report
from freemask.coordinator.rounds import COMPLETED, RoundRecord, RunRecord, RunSettings, Slot
from freemask.coordinator.service import RunRepository
from freemask.shared.config import load_config
from freemask.shared.errors import NotFound
from freemask.shared.images import encode_npz, encode_png, encode_png16
from freemask.shared.keys import sample_key
from freemask.v1 import common_pb2, samples_pb2
from freemask.world import Scene, dataset

RUN = "report-run"
CONFIG = load_config(environ={})
VOID = {"meta", "img", "br", "hr", "link", "input", "source", "wbr", "area", "base", "col", "embed", "track"}


@dataclass(frozen=True)
class Spec:
    sample_id: str
    round: int
    kind: str
    score: float
    scene: Scene
    softmap: bool = False
    image_missing: bool = False


KEPT_COMPOSED, KEPT_SINGLE, LOW_SINGLE = "r0-composed", "r0-single", "r0-low"
NO_IMAGE, LOW_COMPOSED = "r1-single", "r1-composed"
SPECS = [
    Spec(KEPT_COMPOSED, 0, "composed", 0.9, dataset("val", 15, 32)),
    Spec(KEPT_SINGLE, 0, "single", 0.8, dataset("val", 7, 32), softmap=True),
    Spec(LOW_SINGLE, 0, "single", 0.3, dataset("val", 3, 32)),
    Spec(NO_IMAGE, 1, "single", 0.7, dataset("val", 21, 32), image_missing=True),
    Spec(LOW_COMPOSED, 1, "composed", 0.25, dataset("val", 9, 32)),
]
DEAD = "r0-dead"
THRESHOLDS = {0: 0.75, 1: 0.65}
MIOU = {0: 0.42, 1: 0.55}
RETAINED = {0: [KEPT_COMPOSED, KEPT_SINGLE], 1: [NO_IMAGE]}


def key_id(sample_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in sample_id.lower()).strip("-") or "sample"


def sample_json(spec: Spec) -> dict:
    composed = spec.kind == "composed"
    kid = key_id(spec.sample_id)
    keys = common_pb2.SampleKeys(
        image_key=sample_key(RUN, spec.round, kid, "image.png"),
        label_key=sample_key(RUN, spec.round, kid, "label.png"),
        instance_map_key=sample_key(RUN, spec.round, kid, "instances.png") if composed else "",
        softmap_key=sample_key(RUN, spec.round, kid, "softmap.npz") if spec.softmap else "")
    objects = [common_pb2.ObjectInstance(class_id=o.class_id, class_name=o.cls, instance_id=o.instance_id)
               for o in spec.scene.objects]
    sample = samples_pb2.Sample(
        sample_id=spec.sample_id, run_id=RUN, round=spec.round, keys=keys, objects=objects,
        kind=samples_pb2.SAMPLE_KIND_COMPOSED if composed else samples_pb2.SAMPLE_KIND_SINGLE,
        image_size=common_pb2.ImageSize(width=32, height=32), background_name=spec.scene.background)
    return json_format.MessageToDict(sample, preserving_proto_field_name=True)


def softmap_of(scene: Scene) -> np.ndarray:
    return np.where(scene.label != 0, 0.9, 0.1).astype(np.float32)


def save_run(store: MemoryStore, specs: list[Spec] = SPECS, miou: dict[int, float | None] = MIOU,
             retained: dict[int, list[str]] = RETAINED) -> None:
    rounds = {r: RoundRecord(round=r, trained=True, threshold=THRESHOLDS[r],
                             validation_mean_iou=miou.get(r), retained=list(retained[r])) for r in (0, 1)}
    for spec in specs:
        sample = sample_json(spec)
        keys = sample["keys"]
        generate_id, composed_id = ((f"{spec.sample_id}-base", spec.sample_id) if spec.kind == "composed"
                                    else (spec.sample_id, None))
        rounds[spec.round].slots.append(Slot(spec.kind, generate_id, composed_id, score=spec.score, sample=sample))
        if not spec.image_missing:
            store.put_bytes(keys["image_key"], encode_png(spec.scene.image))
        store.put_bytes(keys["label_key"], encode_png(spec.scene.label))
        if "instance_map_key" in keys:
            store.put_bytes(keys["instance_map_key"], encode_png16(spec.scene.instances))
        if "softmap_key" in keys:
            store.put_bytes(keys["softmap_key"], encode_npz(softmap=softmap_of(spec.scene)))
    rounds[0].slots.append(Slot("single", DEAD, dead_letter="generation failed: <boom>"))
    settings = RunSettings(rounds=2, alpha=0.5, initial_samples=4, samples_per_round=4,
                           classes=("car", "cat"), backgrounds={"car": ("road",), "cat": ("room",)})
    RunRepository(store).save(RunRecord(run_id=RUN, seed=3, settings=settings, phase=COMPLETED, round=1,
                                        rounds=[rounds[0], rounds[1]],
                                        accepted=[i for r in (0, 1) for i in retained[r]]))


class Page(HTMLParser):
    """Parses the report, checking that every non-void element is closed in order."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.rows: list[list[str]] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "tr" and dict(attrs).get("class") == "round-row":
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [attrs for name, attrs in self.tags if name == tag]

    def images(self) -> list[dict[str, str | None]]:
        return [attrs for attrs in self.all("img") if (attrs.get("src") or "").startswith("data:image/png;base64,")]


def decoded(attrs: dict[str, str | None]) -> np.ndarray:
    data = base64.b64decode((attrs["src"] or "").split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture
def store() -> MemoryStore:
    store = MemoryStore()
    save_run(store)
    return store


def report(store: MemoryStore, tmp_path: Path, **kwargs) -> tuple[str, Page]:
    out = write_report(store, kwargs.pop("config", CONFIG), RUN, tmp_path / "report.html", **kwargs)
    text = out.read_text(encoding="utf-8")
    return text, Page(text)


def test_the_report_is_one_well_formed_self_contained_file(store: MemoryStore, tmp_path: Path) -> None:
    out = tmp_path / "nested" / "run.html"
    assert write_report(store, CONFIG, RUN, out) == out
    assert [p.name for p in out.parent.iterdir()] == ["run.html"]  # the temporary file was renamed away
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    assert text.startswith("<!DOCTYPE html>") and page.problems == [] and page.stack == []
    assert f"Free-Mask run {RUN}" in page.text  # the <title>
    # Nothing is fetched: no external scripts, style sheets or pictures.
    assert page.all("script") == [] and page.all("link") == []
    assert all((attrs.get("src") or "").startswith("data:") for attrs in page.all("img"))
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    # Written again, the file is replaced whole.
    write_report(store, CONFIG, RUN, out, samples_per_round=1)
    assert [p.name for p in out.parent.iterdir()] == ["run.html"] and out.read_text(encoding="utf-8") != text


def test_one_table_row_per_round_with_its_numbers(store: MemoryStore, tmp_path: Path) -> None:
    text, page = report(store, tmp_path)
    assert page.rows == [
        ["0", "4", "3", "1", "2", "0.7500", f"{RUN}/0", "0.4200"],
        ["1", "2", "2", "0", "1", "0.6500", f"{RUN}/1", "0.5500"],
    ]
    header = "".join(page.text)
    for shown in ("completed", "α", "0.5", "|D′_t| per round", "32 × 32 px"):
        assert shown in header


def test_an_svg_per_histogram_and_one_for_the_miou_plot(store: MemoryStore, tmp_path: Path) -> None:
    _, page = report(store, tmp_path)
    svgs = page.all("svg")
    assert [s.get("class") for s in svgs] == ["miou-plot", "histogram", "histogram"]
    assert len(page.all("circle")) == 2  # one point per round with an mIoU
    cuts = [attrs for attrs in page.all("line") if attrs.get("class") == "cut"]
    assert len(cuts) == 2
    # The cut line sits at the threshold on the [0, 1] axis (left 44 px, plot 360 px wide).
    assert [float(c["x1"]) for c in cuts] == pytest.approx([44 + 360 * 0.75, 44 + 360 * 0.65], abs=0.1)
    assert len(page.all("rect")) == 3 + 2  # non-empty bins: round 0 has 0.9, 0.8, 0.3; round 1 has 0.7, 0.25


def test_histogram_bins_cover_zero_to_one() -> None:
    assert histogram_counts([0.0, 0.05, 0.1, 0.95, 1.0, 1.3, -0.2]) == [3, 1, 0, 0, 0, 0, 0, 0, 0, 3]


def test_no_miou_is_said_instead_of_an_empty_plot(tmp_path: Path) -> None:
    store = MemoryStore()
    save_run(store, miou={})
    text, page = report(store, tmp_path)
    assert [s.get("class") for s in page.all("svg")] == ["histogram", "histogram"]
    assert "No round has a validation mIoU" in text
    assert [row[-1] for row in page.rows] == ["—", "—"]


def test_samples_are_shown_kept_first_with_one_picture_per_cell(store: MemoryStore, tmp_path: Path) -> None:
    text, page = report(store, tmp_path)
    shown = [attrs["data-sample-id"] for attrs in page.all("div") if "sample" in (attrs.get("class") or "").split()]
    assert shown == [KEPT_COMPOSED, KEPT_SINGLE, LOW_SINGLE, NO_IMAGE, LOW_COMPOSED]
    classes = [attrs["class"] for attrs in page.all("div") if "sample" in (attrs.get("class") or "").split()]
    assert classes == ["sample kept", "sample kept", "sample rejected", "sample kept", "sample rejected"]
    # image, label map, blend for each; the attention map for the single object with a soft map; the sample
    # whose image is missing keeps only its label map.
    images = page.images()
    assert len(images) == 3 + 4 + 3 + 1 + 3
    alts = [attrs["alt"] for attrs in images]
    assert alts[:7] == [f"image of {KEPT_COMPOSED}", f"label map of {KEPT_COMPOSED}",
                        f"label over image of {KEPT_COMPOSED}", f"image of {KEPT_SINGLE}",
                        f"label map of {KEPT_SINGLE}", f"label over image of {KEPT_SINGLE}",
                        f"attention map of {KEPT_SINGLE}"]
    # 32 px samples are scaled up 4× by repeating pixels; the label map is in the fixed palette.
    scene = SPECS[0].scene
    assert np.array_equal(decoded(images[0]), np.repeat(np.repeat(scene.image, 4, axis=0), 4, axis=1))
    label = decoded(images[1])
    assert label.shape == (128, 128, 3)
    assert np.all(label[::4, ::4][scene.label == 0] == 0) and np.all(label[::4, ::4][scene.label != 0].any(axis=-1))
    heat = decoded(images[6])[::4, ::4]
    assert np.array_equal(heat, heat_map(softmap_of(SPECS[1].scene)))
    # Each label map's legend names the classes present.
    legend = "".join(page.text)
    for class_id in np.unique(scene.label):
        if class_id:
            assert f"{CONFIG.world.classes[class_id - 1]} ({class_id})" in legend
    assert "S(x) = 0.9000" in legend and "generation failed: &lt;boom&gt;" in text


def test_samples_per_round_limits_each_round(store: MemoryStore, tmp_path: Path) -> None:
    _, page = report(store, tmp_path, samples_per_round=1)
    shown = [attrs["data-sample-id"] for attrs in page.all("div") if "sample" in (attrs.get("class") or "").split()]
    assert shown == [KEPT_COMPOSED, NO_IMAGE]
    assert len(page.images()) == 3 + 1
    record = RunRepository(store).load(RUN)
    assert [(s.final_id, kept) for s, kept in shown_slots(record.rounds[0], 10)] == [
        (KEPT_COMPOSED, True), (KEPT_SINGLE, True), (LOW_SINGLE, False)]


def test_a_missing_image_is_an_unavailable_cell(store: MemoryStore, tmp_path: Path) -> None:
    text, page = report(store, tmp_path)
    cells = [i for i, (tag, attrs) in enumerate(page.tags) if tag == "div" and attrs.get("class") == "unavailable"]
    assert len(cells) == 2  # the image and the blend of the sample whose image is missing
    assert "unavailable: image: no object at" in "".join(page.text)
    assert "unavailable: needs both the image and the label map" in "".join(page.text)


def test_a_missing_soft_map_is_an_unavailable_cell(store: MemoryStore, tmp_path: Path) -> None:
    store.delete(sample_json(SPECS[1])["keys"]["softmap_key"])
    text, page = report(store, tmp_path)
    assert "unavailable: soft map: no object at" in "".join(page.text)
    assert len(page.images()) == 3 + 3 + 3 + 1 + 3


def test_an_unknown_run_is_not_found(store: MemoryStore, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        write_report(store, CONFIG, "no-such-run", tmp_path / "report.html")
    assert not (tmp_path / "report.html").exists()


def test_every_string_is_escaped(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script>"
    scene = dataset("val", 7, 32)
    specs = [Spec(f"r0-{evil}", 0, "single", 0.9, scene), Spec("r1-ok", 1, "single", 0.8, dataset("val", 3, 32))]
    store = MemoryStore()
    save_run(store, specs, retained={0: [specs[0].sample_id], 1: ["r1-ok"]})
    class_id = int(scene.label.max())
    classes = tuple(evil if i == class_id - 1 else name for i, name in enumerate(CONFIG.world.classes))
    config = CONFIG.model_copy(update={"world": CONFIG.world.model_copy(update={"classes": classes})})
    text, page = report(store, tmp_path, config=config)
    assert "<script" not in text.lower() and page.all("script") == []
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert f"r0-{evil}" in "".join(page.text) and f"{evil} ({class_id})" in "".join(page.text)
    assert page.problems == [] and page.stack == []


def test_stage_totals_add_a_table_of_where_the_time_went(store: MemoryStore) -> None:
    from freemask.coordinator.job import StageTotals
    from freemask.coordinator.report import render_report

    record = RunRepository(store).load(RUN)
    page = render_report(record, store, CONFIG, stages={"placement": StageTotals(40, 2.0),
                                                        "scoring": StageTotals(0, 0.0)})
    assert "Where the time went" in page
    assert "<td>placement</td><td>40</td><td>2.0</td><td>0.050</td>" in page
    assert "<td>scoring</td><td>0</td><td>0.0</td><td>—</td>" in page
    assert "Where the time went" not in render_report(record, store, CONFIG)


def test_stage_lines_name_the_offsets_a_stage_waited_at_or_passed_over() -> None:
    from freemask.coordinator.job import StageTotals, stage_lines

    placement, scoring, idle = stage_lines({"placement": StageTotals(40, 2.0), "scoring": StageTotals(8, 0.4, 3, 1),
                                            "thesaurus": StageTotals(0, 0.0)})
    assert placement == "placement       40 messages, 0.050 s each"
    assert scoring == "scoring         8 messages, 0.050 s each; waited at 3 unwritten offsets, passed over 1"
    assert idle == "thesaurus       no messages"


def test_a_per_class_selection_shows_each_class_cut(store: MemoryStore, tmp_path: Path) -> None:
    from freemask.coordinator.report import render_report

    record = RunRepository(store).load(RUN)
    record.settings = RunSettings(**{**record.settings.__dict__, "selection": "per_class"})
    record.rounds[0].threshold, record.rounds[0].class_thresholds = 0.25, {"car": 0.75, "cat": 0.25}
    page = Page(render_report(record, store, CONFIG))
    assert page.rows[0][5] == "0.2500–0.7500 by group" and page.rows[1][5] == "0.6500"
    text = "".join(page.text)
    assert "cut by group: car 0.7500, cat 0.2500." in text and "top α of each class" in text
    assert "composed scenes apart" not in text  # per_class_and_kind's description


def test_summary_lines_say_how_each_round_was_cut() -> None:
    from freemask.coordinator.job import summary_lines
    from freemask.v1 import coordinator_pb2

    status = coordinator_pb2.RunStatus(run_id=RUN, state=coordinator_pb2.RUN_STATE_COMPLETED, total_rounds=2, rounds=[
        coordinator_pb2.RoundStatus(round=0, requested=4, scored=4, retained=3, score_threshold=0.5),
        coordinator_pb2.RoundStatus(round=1, requested=4, scored=4, retained=3, score_threshold=0.25,
                                    class_score_thresholds={"car": 0.75, "cat": 0.25})])
    _, global_cut, per_class = summary_lines(status)
    assert "3 kept at S(x) >= 0.500," in global_cut
    assert "3 kept at the top of each of 2 groups, S(x) >= 0.250 to 0.750," in per_class
