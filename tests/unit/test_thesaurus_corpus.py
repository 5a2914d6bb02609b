"""Caption corpora read from files: plain text, JSON lines, gzip, and the errors of each."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from freemask.shared.config import load_config
from freemask.shared.errors import InvalidInput
from freemask.thesaurus.corpus import open_corpus


def test_text_files_hold_one_caption_per_line(tmp_path: Path) -> None:
    path = tmp_path / "captions.txt"
    path.write_text("a boat on the sea\n\n  a dog on the grass  \n", encoding="utf-8")
    corpus = open_corpus(str(path), load_config(environ={}))
    assert list(corpus) == ["a boat on the sea", "a dog on the grass"]
    assert list(corpus) == list(corpus)  # re-iterable: each pass reads the file again
    assert corpus.describe() == {"name": str(path), "file": "captions.txt"}


def test_json_lines_hold_strings_or_caption_objects_and_may_be_gzipped(tmp_path: Path) -> None:
    path = tmp_path / "captions.jsonl.gz"
    lines = [json.dumps("a bus on the road"), json.dumps({"caption": "a cat in a room", "id": 3}), ""]
    path.write_bytes(gzip.compress("\n".join(lines).encode("utf-8")))
    assert list(open_corpus(str(path), load_config(environ={}))) == ["a bus on the road", "a cat in a room"]


@pytest.mark.parametrize(("line", "fragment"), [
    ("{not json", "captions.jsonl:2: not a JSON value"),
    ('{"text": "a dog"}', 'captions.jsonl:2: expected a string or an object with a "caption" string'),
    ("42", "captions.jsonl:2: expected a string"),
])
def test_a_malformed_json_line_is_named(tmp_path: Path, line: str, fragment: str) -> None:
    path = tmp_path / "captions.jsonl"
    path.write_text(json.dumps("a dog on the grass") + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(InvalidInput, match=fragment):
        list(open_corpus(str(path), load_config(environ={})))


def test_text_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "captions.txt"
    path.write_bytes(b"a dog\n\xff\xfe\n")
    with pytest.raises(InvalidInput, match="captions.txt:2: not UTF-8"):
        list(open_corpus(str(path), load_config(environ={})))


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="is not a file"):
        open_corpus(str(tmp_path / "nope.txt"), load_config(environ={}))


def test_the_reference_corpus_is_deterministic_and_sized() -> None:
    config = load_config(environ={})
    first = list(open_corpus("reference", config, count=50, seed=3))
    assert len(first) == 50 and first == list(open_corpus("reference", config, count=50, seed=3))
    assert first != list(open_corpus("reference", config, count=50, seed=4))
