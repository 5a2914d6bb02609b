"""Caption corpora for the thesaurus builder, each read as a stream of strings.

A corpus is named by one string:

- ``reference`` — the reference world's captions (`freemask.world.caption_corpus`),
  ``count`` of them from ``seed``;
- ``s3://bucket/prefix/`` — every object under the prefix, in key order, read with
  the configured store credentials;
- anything else — a local file.

Files and objects are read line by line, never whole: ``.jsonl`` holds one JSON
value per line, either a string or an object with a ``"caption"`` field; any other
file holds one caption per line. A ``.gz`` suffix is decompressed on the fly. Blank
lines are skipped; a malformed JSON line is InvalidInput naming the file and line,
before anything is written.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from freemask.shared.config import FreemaskConfig
from freemask.shared.errors import InvalidInput
from freemask.shared.store import ObjectStore

REFERENCE = "reference"
_S3_SCHEME = "s3://"


@dataclass(frozen=True)
class CaptionCorpus:
    """A named, re-iterable stream of captions; `describe()` goes into the index."""

    name: str
    open_captions: Callable[[], Iterator[str]]
    details: tuple[tuple[str, Any], ...] = ()

    def __iter__(self) -> Iterator[str]:
        return self.open_captions()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **dict(self.details)}


def reference_corpus(config: FreemaskConfig, count: int, seed: int) -> CaptionCorpus:
    from freemask.world import World, caption_corpus  # the world is only needed for this source

    world = World.from_config(config.world)
    return CaptionCorpus(REFERENCE, lambda: caption_corpus(count, seed, world),
                         (("captions", count), ("seed", seed)))


def _captions_from_lines(lines: Iterable[bytes], what: str, jsonl: bool) -> Iterator[str]:
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InvalidInput(f"{what}:{number}: not UTF-8 text") from None
        if not line:
            continue
        if not jsonl:
            yield line
            continue
        try:
            value = json.loads(line)
        except ValueError as err:
            raise InvalidInput(f"{what}:{number}: not a JSON value ({err})") from None
        if isinstance(value, dict):
            value = value.get("caption")
        if not isinstance(value, str):
            raise InvalidInput(f'{what}:{number}: expected a string or an object with a "caption" string')
        yield value


def _lines(stream: IO[bytes], chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a binary stream, read in large chunks (an HTTP body has no efficient readline)."""
    pending = b""
    while chunk := stream.read(chunk_bytes):
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        yield from lines
    if pending:
        yield pending


def _read_stream(stream: IO[bytes], name: str) -> Iterator[str]:
    """Captions of one binary stream, decompressed if `name` ends in .gz."""
    if name.endswith(".gz"):
        stream = gzip.GzipFile(fileobj=stream)
    yield from _captions_from_lines(_lines(stream), name, jsonl=name.removesuffix(".gz").endswith(".jsonl"))


def file_corpus(path: Path) -> CaptionCorpus:
    if not path.is_file():
        raise InvalidInput(f"caption corpus {str(path)!r} is not a file")

    def captions() -> Iterator[str]:
        with open(path, "rb") as handle:
            yield from _read_stream(handle, str(path))

    return CaptionCorpus(str(path), captions, (("file", path.name),))


def store_corpus(config: FreemaskConfig, url: str) -> CaptionCorpus:
    """Every object under `s3://bucket/prefix`, read with the configured endpoint and credentials."""
    bucket, _, prefix = url.removeprefix(_S3_SCHEME).partition("/")
    if not bucket:
        raise InvalidInput(f"corpus {url!r} names no bucket: use s3://bucket/prefix/")
    store = ObjectStore(config.store.model_copy(update={"bucket": bucket, "prefix": ""}))
    keys = [info.key for info in store.list(prefix)]
    if not keys:
        raise InvalidInput(f"caption corpus {url!r} holds no objects")

    def captions() -> Iterator[str]:
        for key in keys:
            with store.open(key) as stream:
                yield from _read_stream(stream, f"s3://{bucket}/{key}")

    return CaptionCorpus(url, captions, (("objects", len(keys)),))


def open_corpus(spec: str, config: FreemaskConfig, count: int | None = None, seed: int | None = None) -> CaptionCorpus:
    """The corpus `spec` names (see the module docstring); count and seed apply to `reference`."""
    if spec == REFERENCE:
        return reference_corpus(config, count or config.thesaurus.reference_captions,
                                config.thesaurus.reference_seed if seed is None else seed)
    if spec.startswith(_S3_SCHEME):
        return store_corpus(config, spec)
    return file_corpus(Path(spec))
