"""freemask.shared.keys: id and key validation, and the store key layout."""

from __future__ import annotations

import itertools

import pytest

from freemask.shared.errors import InvalidInput
from freemask.shared.keys import (
    SAMPLE_FILES,
    InvalidIdError,
    derive_sample_id,
    key_within,
    model_prefix,
    run_prefix,
    sample_key,
    sample_prefix,
    thesaurus_prefix,
    validate_id,
    validate_key,
    validate_round,
)

# --- ids --------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "0", "-", "run-1", "s-0-12-abcdef012345", "x" * 64])
def test_valid_ids_pass(value: str) -> None:
    assert validate_id(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "a/b",
        "..",
        "../etc",
        "Run",
        "RUN",
        "run 1",
        " run",
        "run\n",
        "x" * 65,
        "run_1",
        "run.1",
        "café",
        "ｒun",  # full-width r
        "run\x00",
        "\x00",
    ],
)
def test_invalid_ids_are_refused_with_a_message_naming_the_problem(value: str) -> None:
    with pytest.raises(InvalidIdError) as info:
        validate_id(value, "run id")
    message = str(info.value)
    assert message.startswith("run id ")
    assert repr(value) in message  # the offending value, quoted so NUL and spaces are visible
    assert "1-64 characters from [a-z0-9-]" in message


@pytest.mark.parametrize("value", [None, 7, b"run", ["run"]])
def test_non_string_ids_are_refused(value: object) -> None:
    with pytest.raises(InvalidIdError, match="is not a valid id"):
        validate_id(value)  # type: ignore[arg-type]


def test_invalid_id_error_is_invalid_input_and_shortens_huge_values() -> None:
    with pytest.raises(InvalidInput) as info:
        validate_id("A" * 100_000)
    assert isinstance(info.value, InvalidIdError)
    assert len(str(info.value)) < 300


# --- rounds -----------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 9999])
def test_valid_rounds_pass(value: int) -> None:
    assert validate_round(value) == value


@pytest.mark.parametrize("value", [-1, 10_000, 2**32, 10**30, True, False, 1.0, "1", None])
def test_invalid_rounds_are_refused(value: object) -> None:
    with pytest.raises(InvalidIdError, match=r"round .* must be an integer in \[0, 10000\)"):
        validate_round(value)  # type: ignore[arg-type]


# --- keys -------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "runs/run-1/rounds/0/samples/s-1/image.png",
        "models/fopa/v1/model.onnx",
        "thesaurus/v2/_index.json",
        "a/" * 255 + "b",  # 511 characters
        "x" * 128,
    ],
)
def test_valid_keys_pass(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("", "is empty"),
        ("/runs/a/image.png", "is absolute"),
        ("runs/../etc/passwd", "invalid segment '..'"),
        ("runs/./a", "invalid segment '.'"),
        ("..", "invalid segment '..'"),
        ("runs//a", "invalid segment ''"),
        ("runs/a/", "invalid segment ''"),
        ("runs/A/image.png", "invalid segment 'A'"),
        ("runs/a b/x", "invalid segment 'a b'"),
        ("runs/.hidden", "invalid segment '.hidden'"),
        ("runs\\a", "invalid segment"),
        ("runs/a\x00/x", "invalid segment"),
        ("runs/" + "x" * 129, "invalid segment"),
        ("a" * 513, "513 characters long; the limit is 512"),
        ("a/" * 300, "characters long"),
    ],
)
def test_invalid_keys_are_refused_with_a_message_naming_the_problem(key: str, problem: str) -> None:
    with pytest.raises(InvalidIdError) as info:
        validate_key(key, "source key")
    assert str(info.value).startswith("source key ")
    assert problem in str(info.value)


# --- layout -----------------------------------------------------------------


@pytest.mark.parametrize("filename", SAMPLE_FILES)
def test_sample_key_layout(filename: str) -> None:
    key = sample_key("run-1", 3, "s-3-0-abc", filename)
    assert key == f"runs/run-1/rounds/3/samples/s-3-0-abc/{filename}"
    assert validate_key(key) == key
    assert key.startswith(sample_prefix("run-1", 3, "s-3-0-abc"))
    assert key.startswith(run_prefix("run-1"))


def test_prefixes() -> None:
    assert run_prefix("r") == "runs/r/"
    assert sample_prefix("r", 0, "s") == "runs/r/rounds/0/samples/s/"
    assert model_prefix("fopa", "v1") == "models/fopa/v1/"
    assert thesaurus_prefix("v2") == "thesaurus/v2/"
    assert thesaurus_prefix("v1.2") == "thesaurus/v1.2/"
    for bad in ("", ".", "..", ".hidden", "a/b", "V1", "x" * 65):
        with pytest.raises(InvalidIdError):
            thesaurus_prefix(bad)


@pytest.mark.parametrize("filename", ["image.jpg", "../image.png", "IMAGE.PNG", "", "meta.json/x", "label"])
def test_sample_key_refuses_unknown_filenames(filename: str) -> None:
    with pytest.raises(InvalidIdError, match="is not one of image.png, label.png, softmap.npz, meta.json"):
        sample_key("run-1", 0, "s", filename)


@pytest.mark.parametrize(
    ("run", "round_index", "sample", "what"),
    [
        ("../x", 0, "s", "run id"),
        ("Run", 0, "s", "run id"),
        ("r", -1, "s", "round"),
        ("r", True, "s", "round"),
        ("r", 0, "s/../../t", "sample id"),
        ("r", 0, "", "sample id"),
    ],
)
def test_sample_key_validates_every_part(run: str, round_index: int, sample: str, what: str) -> None:
    with pytest.raises(InvalidIdError, match=f"^{what} "):
        sample_key(run, round_index, sample, "image.png")


@pytest.mark.parametrize(
    ("name", "version"), [("Fopa", "v1"), ("fopa", "../v1"), ("fopa", ""), ("a/b", "v1")]
)
def test_model_prefix_validates_parts(name: str, version: str) -> None:
    with pytest.raises(InvalidIdError):
        model_prefix(name, version)


def test_key_within_accepts_keys_under_the_prefix() -> None:
    key = "runs/a/rounds/0/samples/s/image.png"
    assert key_within(key, "runs/a/") == key
    assert key_within(key, sample_prefix("a", 0, "s")) == key


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("runs/b/rounds/0/samples/s/image.png", "lies outside 'runs/a/'"),
        ("runs/ab/rounds/0/samples/s/image.png", "lies outside 'runs/a/'"),
        ("models/fopa/v1/model.onnx", "lies outside 'runs/a/'"),
        ("runs/a", "lies outside 'runs/a/'"),
        ("runs/a/../b/rounds/0/samples/s/image.png", "invalid segment '..'"),
        ("runs/a/./../../b/image.png", "invalid segment '.'"),
        ("/runs/a/image.png", "is absolute"),
        ("runs/a//image.png", "invalid segment ''"),
        ("", "is empty"),
    ],
)
def test_key_within_refuses_keys_outside_the_prefix(key: str, problem: str) -> None:
    with pytest.raises(InvalidIdError) as info:
        key_within(key, "runs/a/", "image key")
    assert str(info.value).startswith("image key")
    assert problem in str(info.value)


# --- derived sample ids -----------------------------------------------------


def test_derive_sample_id_is_deterministic_and_stable_across_processes() -> None:
    assert derive_sample_id("run-1", 0, 0) == derive_sample_id("run-1", 0, 0)
    # Pinned values: a redelivery after a restart must map to the same keys, so the
    # scheme may not depend on hash() randomisation or change silently.
    assert derive_sample_id("run-1", 0, 0) == "s-0-0-057b92e9c066"
    assert derive_sample_id("run-1", 3, 7, "c") == "c-3-7-d346e731e51f"


def test_derive_sample_id_is_distinct_and_valid_across_run_round_index_kind() -> None:
    combos = list(itertools.product(["a", "b", "ab", "x" * 64], [0, 1, 9999], range(40), ["s", "c"]))
    ids = [derive_sample_id(run, round_index, index, kind) for run, round_index, index, kind in combos]
    assert len(set(ids)) == len(combos)
    for sample_id in ids:
        assert validate_id(sample_id, "sample id") == sample_id


@pytest.mark.parametrize(("run", "round_index"), [("Run", 0), ("a/b", 0), ("", 0), ("r", -1), ("r", 10_000)])
def test_derive_sample_id_validates_run_and_round(run: str, round_index: int) -> None:
    with pytest.raises(InvalidIdError):
        derive_sample_id(run, round_index, 0)


@pytest.mark.parametrize(("index", "kind"), [(10**60, "s"), (0, "S")])
def test_derive_sample_id_never_returns_an_invalid_id(index: int, kind: str) -> None:
    try:
        sample_id = derive_sample_id("run-1", 0, index, kind)
    except InvalidInput:
        return  # refusing the input is fine too
    validate_id(sample_id, "sample id")


# --- composed samples: instance maps and step folders -------------------------------------------------------------

from freemask.shared.keys import STEP_FILES, step_key, step_prefix, within_a_sample  # noqa: E402


def test_instances_png_is_a_sample_file() -> None:
    assert sample_key("r", 0, "s", "instances.png") == "runs/r/rounds/0/samples/s/instances.png"


@pytest.mark.parametrize("filename", STEP_FILES)
def test_step_key_layout(filename: str) -> None:
    key = step_key("run-1", 2, "c-1", 3, filename)
    assert key == f"runs/run-1/rounds/2/samples/c-1/steps/3/{filename}"
    assert validate_key(key) == key and key.startswith(sample_prefix("run-1", 2, "c-1"))
    assert key.startswith(step_prefix("run-1", 2, "c-1", 3))


@pytest.mark.parametrize("filename", ["meta.json", "softmap.npz", "../image.png", "image"])
def test_step_key_refuses_other_files(filename: str) -> None:
    with pytest.raises(InvalidIdError, match="is not one of image.png, label.png, instances.png"):
        step_key("r", 0, "s", 0, filename)


@pytest.mark.parametrize("step", [-1, 10_000, True, 1.0, "1", None])
def test_step_key_refuses_bad_steps(step: object) -> None:
    with pytest.raises(InvalidIdError, match=r"^step .* must be an integer in \[0, 10000\)"):
        step_key("r", 0, "s", step, "image.png")  # type: ignore[arg-type]


@pytest.mark.parametrize(("run", "sample"), [("R", "s"), ("r", "../s")])
def test_step_key_validates_ids(run: str, sample: str) -> None:
    with pytest.raises(InvalidIdError):
        step_key(run, 0, sample, 0, "image.png")


@pytest.mark.parametrize("key", ["runs/r/rounds/0/samples/s/image.png", "runs/r/rounds/12/samples/s/steps/1/x.png"])
def test_within_a_sample_accepts_files_under_a_sample_folder(key: str) -> None:
    assert within_a_sample(key) == key


@pytest.mark.parametrize(("key", "problem"), [
    ("runs/r/rounds/0/samples/s", "does not lie under runs/{run}/rounds/{r}/samples/{id}/"),
    ("models/fopa/v1/rounds/0/samples/s/x.png", "does not lie under"),
    ("runs/r/round/0/samples/s/x.png", "does not lie under"),
    ("runs/r/rounds/00/samples/s/x.png", "has round '00'; rounds are plain integers"),
    ("runs/r/rounds/x/samples/s/x.png", "has round 'x'"),
    ("runs/r/rounds/10000/samples/s/x.png", "round 10000 must be an integer"),
    ("runs/r_1/rounds/0/samples/s/x.png", "out key's run id 'r_1' is not a valid id"),
    ("runs/r/rounds/0/samples/s/../x.png", "invalid segment '..'"),
])
def test_within_a_sample_refuses_keys_elsewhere(key: str, problem: str) -> None:
    with pytest.raises(InvalidIdError) as info:
        within_a_sample(key, "out key")
    assert problem in str(info.value)


def test_a_segmenter_version_is_run_slash_round_and_parses_back() -> None:
    from freemask.shared.keys import parse_segmenter_version, segmenter_prefix, segmenter_version

    assert segmenter_version("run-1", 12) == "run-1/12"
    assert parse_segmenter_version("run-1/12") == ("run-1", 12)
    assert segmenter_prefix("run-1", 0) == "models/segmenter/run-1/0/"


@pytest.mark.parametrize(("version", "problem"), [
    ("run-1", "must be '{run}/{round}'"),
    ("run-1/", "must be '{run}/{round}'"),
    ("run-1/01", "must be '{run}/{round}'"),
    ("run-1/-1", "must be '{run}/{round}'"),
    ("run-1/0/x", "must be '{run}/{round}'"),
    ("Run_1/0", "run id 'Run_1' is not a valid id"),
    ("run-1/10000", "round 10000 must be an integer"),
])
def test_bad_segmenter_versions_are_refused(version: str, problem: str) -> None:
    from freemask.shared.keys import parse_segmenter_version

    with pytest.raises(InvalidIdError) as info:
        parse_segmenter_version(version)
    assert problem in str(info.value)
