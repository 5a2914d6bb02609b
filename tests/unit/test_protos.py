"""Contract checks for protos/freemask/v1.

- every message type survives a serialize/parse round trip with every field set;
- every message, field, enum, enum value, service and rpc carries a leading comment;
- the topic messages and services named in DESIGN.md exist in package freemask.v1.

The generated modules come from `make protos`; the message list is discovered from
their descriptors, so a new message is covered without touching this file.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

import freemask.v1

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "freemask" / "v1"
PACKAGE = "freemask.v1"

TOPIC_MESSAGES = (
    "GenerateRequest",
    "SingleObject",
    "ComposeRequest",
    "PlacementTask",
    "HarmonizeTask",
    "Sample",
    "ScoredSample",
    "AcceptedSample",
    "DeadLetter",
)

SERVICE_METHODS = {
    "AttentionMask": {"Generate", "GenerateBatch"},
    "Thesaurus": {"Relation", "TopObjects"},
    "Placement": {"Place", "PlaceBatch"},
    "Harmonization": {"Harmonize"},
    "Scoring": {"Train", "TrainStatus", "Score", "Evaluate"},
    "Coordinator": {"StartRun", "GetRun", "StopRun"},
}

# Bound on message nesting while filling, in case a type ever refers to itself.
MAX_DEPTH = 12
REPEATED_COUNT = 2


# --- discovery -------------------------------------------------------------------


def generated_modules() -> list[ModuleType]:
    names = sorted(
        info.name for info in pkgutil.iter_modules(freemask.v1.__path__) if info.name.endswith("_pb2")
    )
    return [importlib.import_module(f"{PACKAGE}.{name}") for name in names]


def _with_nested(descriptor: Descriptor) -> Iterator[Descriptor]:
    if descriptor.GetOptions().map_entry:
        return
    yield descriptor
    for nested in descriptor.nested_types:
        yield from _with_nested(nested)


def all_message_descriptors() -> list[Descriptor]:
    found: dict[str, Descriptor] = {}
    for module in generated_modules():
        for descriptor in module.DESCRIPTOR.message_types_by_name.values():
            for message in _with_nested(descriptor):
                found[message.full_name] = message
    return [found[name] for name in sorted(found)]


MESSAGES = all_message_descriptors()


def test_generated_modules_match_proto_files() -> None:
    """Stale or missing generated code would make the other tests meaningless."""
    proto_stems = {path.stem for path in PROTO_DIR.glob("*.proto")}
    module_stems = {module.__name__.rsplit(".", 1)[1].removesuffix("_pb2") for module in generated_modules()}
    assert proto_stems, f"no .proto files under {PROTO_DIR}"
    assert module_stems == proto_stems, "run `make protos`: generated modules differ from the .proto files"
    for module in generated_modules():
        assert module.DESCRIPTOR.package == PACKAGE, module.__name__


# --- round trip ------------------------------------------------------------------

_SCALAR_VALUES: dict[int, tuple[object, object]] = {
    FieldDescriptor.TYPE_INT32: (-7, 11),
    FieldDescriptor.TYPE_SINT32: (-7, 11),
    FieldDescriptor.TYPE_SFIXED32: (-7, 11),
    FieldDescriptor.TYPE_UINT32: (7, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (7, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**40), 2**62),
    FieldDescriptor.TYPE_SINT64: (-(2**40), 2**62),
    FieldDescriptor.TYPE_SFIXED64: (-(2**40), 2**62),
    FieldDescriptor.TYPE_UINT64: (2**63 + 5, 3),
    FieldDescriptor.TYPE_FIXED64: (2**63 + 5, 3),
    # exactly representable in float32, so equality after the trip is exact
    FieldDescriptor.TYPE_FLOAT: (0.5, 0.25),
    FieldDescriptor.TYPE_DOUBLE: (0.125, 0.1),
    FieldDescriptor.TYPE_BOOL: (True, True),
}


def scalar_value(field: FieldDescriptor, index: int = 0) -> object:
    """A non-default value for a scalar or enum field; index varies repeated items."""
    if field.type == FieldDescriptor.TYPE_ENUM:
        non_zero = [value.number for value in field.enum_type.values if value.number != 0]
        assert non_zero, f"enum {field.enum_type.full_name} has no value besides 0"
        return non_zero[index % len(non_zero)]
    if field.type == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-{index}"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return b"\x00\xff" + f"{field.name}-{index}".encode()
    return _SCALAR_VALUES[field.type][index % 2]


def _map_fields(field: FieldDescriptor) -> tuple[FieldDescriptor, FieldDescriptor] | None:
    message_type = field.message_type
    if message_type is None or not message_type.GetOptions().map_entry:
        return None
    return message_type.fields_by_name["key"], message_type.fields_by_name["value"]


def chosen_fields(descriptor: Descriptor, variant: int) -> list[FieldDescriptor]:
    """Fields set for this variant: all plain fields plus one member of each oneof.

    Variant k picks member k mod n of each oneof, so iterating k over the largest
    oneof size covers every member.
    """
    chosen = []
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is None or oneof.fields[variant % len(oneof.fields)] is field:
            chosen.append(field)
    return chosen


def fill(message: Message, variant: int, depth: int = 0) -> None:
    """Sets every chosen field of message (recursively) to a non-default value."""
    assert depth < MAX_DEPTH, f"{message.DESCRIPTOR.full_name} nests deeper than {MAX_DEPTH}"
    message.SetInParent()
    if message.DESCRIPTOR.full_name == "google.protobuf.Timestamp":
        message.seconds, message.nanos = 1_700_000_000, 123_456_789
        return
    for field in chosen_fields(message.DESCRIPTOR, variant):
        value = getattr(message, field.name)
        map_fields = _map_fields(field)
        if map_fields is not None:
            key_field, value_field = map_fields
            key = scalar_value(key_field)
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                fill(value[key], variant, depth + 1)
            else:
                value[key] = scalar_value(value_field)
        elif field.is_repeated:
            for index in range(REPEATED_COUNT):
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    fill(value.add(), variant, depth + 1)
                else:
                    value.append(scalar_value(field, index))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            fill(value, variant, depth + 1)
        else:
            setattr(message, field.name, scalar_value(field))


def assert_filled(message: Message, variant: int, path: str) -> None:
    """Checks that every field fill() set is present with the value it was given."""
    descriptor = message.DESCRIPTOR
    if descriptor.full_name == "google.protobuf.Timestamp":
        assert (message.seconds, message.nanos) == (1_700_000_000, 123_456_789), path
        return
    chosen = chosen_fields(descriptor, variant)
    for oneof in descriptor.oneofs:
        expected = oneof.fields[variant % len(oneof.fields)].name
        assert message.WhichOneof(oneof.name) == expected, f"{path}.{oneof.name}"
    for field in chosen:
        where = f"{path}.{field.name}"
        value = getattr(message, field.name)
        map_fields = _map_fields(field)
        if map_fields is not None:
            key_field, value_field = map_fields
            key = scalar_value(key_field)
            assert list(value.keys()) == [key], where
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                assert_filled(value[key], variant, f"{where}[{key!r}]")
            else:
                assert value[key] == scalar_value(value_field), where
        elif field.is_repeated:
            assert len(value) == REPEATED_COUNT, where
            for index, item in enumerate(value):
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    assert_filled(item, variant, f"{where}[{index}]")
                else:
                    assert item == scalar_value(field, index), f"{where}[{index}]"
        else:
            if field.has_presence:
                assert message.HasField(field.name), where
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                assert_filled(value, variant, where)
            else:
                assert value == scalar_value(field), where


def variant_count(descriptor: Descriptor, seen: frozenset[str] = frozenset()) -> int:
    """Largest oneof size reachable from descriptor (1 when there is none)."""
    if descriptor.full_name in seen:
        return 1
    seen = seen | {descriptor.full_name}
    count = max((len(oneof.fields) for oneof in descriptor.oneofs), default=1)
    for field in descriptor.fields:
        if field.message_type is not None:
            count = max(count, variant_count(field.message_type, seen))
    return count


@pytest.mark.parametrize("descriptor", MESSAGES, ids=lambda d: d.full_name)
def test_round_trip_keeps_every_field(descriptor: Descriptor) -> None:
    message_class = message_factory.GetMessageClass(descriptor)
    for variant in range(variant_count(descriptor)):
        original = message_class()
        fill(original, variant)
        wire = original.SerializeToString()
        parsed = message_class.FromString(wire)
        assert parsed == original
        assert parsed.SerializeToString(deterministic=True) == original.SerializeToString(deterministic=True)
        assert_filled(parsed, variant, descriptor.name)


def test_round_trip_covers_every_proto_file() -> None:
    covered_files = {descriptor.file.name for descriptor in MESSAGES}
    for path in PROTO_DIR.glob("*.proto"):
        relative = path.relative_to(PROTO_ROOT).as_posix()
        module = importlib.import_module(f"{PACKAGE}.{path.stem}_pb2")
        if module.DESCRIPTOR.message_types_by_name:
            assert relative in covered_files


# --- documentation ---------------------------------------------------------------

# Field numbers of the descriptor.proto elements that SourceCodeInfo paths walk.
FILE_MESSAGE_TYPE, FILE_ENUM_TYPE, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED_TYPE, MESSAGE_ENUM_TYPE, MESSAGE_ONEOF = 2, 3, 4, 8
ENUM_VALUE = 2
SERVICE_METHOD = 2


def compile_descriptor_set(proto_root: Path, files: list[Path], out: Path) -> descriptor_pb2.FileDescriptorSet:
    """Runs protoc (as `make protos` does) keeping comments in SourceCodeInfo."""
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto_root}",
        "--include_source_info",
        f"--descriptor_set_out={out}",
        *(str(path) for path in files),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _enum_elements(enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], name: str):
    yield path, f"enum {name}"
    for index, value in enumerate(enum.value):
        yield (*path, ENUM_VALUE, index), f"enum value {name}.{value.name}"


def _message_elements(message: descriptor_pb2.DescriptorProto, path: tuple[int, ...], name: str):
    yield path, f"message {name}"
    for index, field in enumerate(message.field):
        yield (*path, MESSAGE_FIELD, index), f"field {name}.{field.name}"
    for index, oneof in enumerate(message.oneof_decl):
        # proto3 `optional` creates a synthetic oneof with no source of its own
        if not oneof.name.startswith("_"):
            yield (*path, MESSAGE_ONEOF, index), f"oneof {name}.{oneof.name}"
    for index, nested in enumerate(message.nested_type):
        if not nested.options.map_entry:  # generated for map<,> fields
            yield from _message_elements(nested, (*path, MESSAGE_NESTED_TYPE, index), f"{name}.{nested.name}")
    for index, enum in enumerate(message.enum_type):
        yield from _enum_elements(enum, (*path, MESSAGE_ENUM_TYPE, index), f"{name}.{enum.name}")


def documentable_elements(file: descriptor_pb2.FileDescriptorProto):
    """(SourceCodeInfo path, readable name) of everything that must be documented."""
    for index, message in enumerate(file.message_type):
        yield from _message_elements(message, (FILE_MESSAGE_TYPE, index), message.name)
    for index, enum in enumerate(file.enum_type):
        yield from _enum_elements(enum, (FILE_ENUM_TYPE, index), enum.name)
    for index, service in enumerate(file.service):
        yield (FILE_SERVICE, index), f"service {service.name}"
        for method_index, method in enumerate(service.method):
            yield (FILE_SERVICE, index, SERVICE_METHOD, method_index), f"rpc {service.name}.{method.name}"


def undocumented(descriptor_set: descriptor_pb2.FileDescriptorSet) -> list[str]:
    missing = []
    for file in descriptor_set.file:
        comments = {tuple(location.path): location.leading_comments for location in file.source_code_info.location}
        for path, name in documentable_elements(file):
            if not comments.get(path, "").strip():
                missing.append(f"{file.name}: {name}")
    return missing


def test_every_element_has_a_leading_comment(tmp_path: Path) -> None:
    files = sorted(PROTO_DIR.glob("*.proto"))
    descriptor_set = compile_descriptor_set(PROTO_ROOT, files, tmp_path / "freemask.pb")
    assert len(descriptor_set.file) == len(files)
    missing = undocumented(descriptor_set)
    assert not missing, "elements without a leading // comment:\n" + "\n".join(missing)


def test_comment_check_reports_what_is_missing(tmp_path: Path) -> None:
    """The checker itself must notice gaps; a trailing comment does not count."""
    source = tmp_path / "sample.proto"
    source.write_text(
        'syntax = "proto3";\n'
        "package check;\n"
        "// documented\n"
        "message Documented {\n"
        "  int32 bare = 1;  // trailing only\n"
        "  map<string, int32> counts = 2;\n"
        "}\n"
        "message Bare {}\n"
        "// documented\n"
        "enum Kind {\n"
        "  // documented\n"
        "  KIND_UNSPECIFIED = 0;\n"
        "  KIND_BARE = 1;\n"
        "}\n"
        "// documented\n"
        "service Api {\n"
        "  rpc Call(Bare) returns (Bare);\n"
        "}\n"
    )
    descriptor_set = compile_descriptor_set(tmp_path, [source], tmp_path / "check.pb")
    assert undocumented(descriptor_set) == [
        "sample.proto: field Documented.bare",
        "sample.proto: field Documented.counts",
        "sample.proto: message Bare",
        "sample.proto: enum value Kind.KIND_BARE",
        "sample.proto: rpc Api.Call",
    ]


# --- names the design relies on ------------------------------------------------------


@pytest.fixture(scope="module")
def pool() -> descriptor_pool.DescriptorPool:
    generated_modules()  # registers every freemask.v1 file in the default pool
    return descriptor_pool.Default()


@pytest.mark.parametrize("name", TOPIC_MESSAGES)
def test_topic_message_exists(pool: descriptor_pool.DescriptorPool, name: str) -> None:
    descriptor = pool.FindMessageTypeByName(f"{PACKAGE}.{name}")
    assert descriptor.file.package == PACKAGE


@pytest.mark.parametrize("name", sorted(SERVICE_METHODS))
def test_service_exists_with_its_rpcs(pool: descriptor_pool.DescriptorPool, name: str) -> None:
    service = pool.FindServiceByName(f"{PACKAGE}.{name}")
    assert service.file.package == PACKAGE
    assert {method.name for method in service.methods} == SERVICE_METHODS[name]


def test_enums_start_with_unspecified() -> None:
    for module in generated_modules():
        enums = list(module.DESCRIPTOR.enum_types_by_name.values())
        for message in MESSAGES:
            if message.file is module.DESCRIPTOR:
                enums.extend(message.enum_types)
        for enum in enums:
            first = enum.values[0]
            assert first.number == 0 and first.name.endswith("_UNSPECIFIED"), enum.full_name
