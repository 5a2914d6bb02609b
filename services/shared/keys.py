"""Identifiers and object-store keys: the only place that builds or checks them.

Ids arrive from gRPC callers and Kafka messages, and become parts of store keys,
so they are validated strictly (`[a-z0-9-]{1,64}`): no `/`, no `..`, nothing
that could climb out of the run's prefix. Keys are built from validated parts,
and a key received from outside is checked before it is used.
"""

from __future__ import annotations

import hashlib
import re

from freemask.shared.errors import InvalidInput, shown

ID_PATTERN = re.compile(r"[a-z0-9-]{1,64}")
VERSION_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{0,63}")
# A key is '/'-separated segments of lower-case letters, digits, '-', '_' and '.',
# where no segment is empty, '.' or '..'.
_KEY_SEGMENT = re.compile(r"[a-z0-9_][a-z0-9_.-]{0,127}")
MAX_KEY_CHARS = 512
MAX_SAMPLE_INDEX = 10**9

SAMPLE_FILES = ("image.png", "label.png", "softmap.npz", "meta.json", "instances.png")
# An intermediate scene of the place <-> harmonize loop (compose.proto) has no softmap or meta.
STEP_FILES = ("image.png", "label.png", "instances.png")
# A plan adds at most 16 objects; the bound only keeps step folders short and numeric.
MAX_STEP_INDEX = 10_000


class InvalidIdError(InvalidInput):
    """An id or key failed validation; the message says which and why."""


def validate_id(value: str, what: str = "id") -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise InvalidIdError(f"{what} {shown(value)} is not a valid id: use 1-64 characters from [a-z0-9-]")
    return value


def validate_key(key: str, what: str = "key") -> str:
    if not isinstance(key, str) or not key:
        raise InvalidIdError(f"{what} is empty")
    if len(key) > MAX_KEY_CHARS:
        raise InvalidIdError(f"{what} is {len(key)} characters long; the limit is {MAX_KEY_CHARS}")
    if key.startswith("/"):
        raise InvalidIdError(f"{what} {key!r} is absolute; keys are relative to the store prefix")
    for segment in key.split("/"):
        if segment in ("", ".", "..") or not _KEY_SEGMENT.fullmatch(segment):
            raise InvalidIdError(
                f"{what} {key!r} has an invalid segment {segment!r}: segments use [a-z0-9_.-], "
                "are not empty, '.' or '..'"
            )
    return key


def validate_round(round_index: int) -> int:
    if not isinstance(round_index, int) or isinstance(round_index, bool) or not 0 <= round_index < 10_000:
        raise InvalidIdError(f"round {round_index!r} must be an integer in [0, 10000)")
    return round_index


def run_prefix(run_id: str) -> str:
    return f"runs/{validate_id(run_id, 'run id')}/"


def sample_prefix(run_id: str, round_index: int, sample_id: str) -> str:
    return (
        f"{run_prefix(run_id)}rounds/{validate_round(round_index)}/samples/{validate_id(sample_id, 'sample id')}/"
    )


def sample_key(run_id: str, round_index: int, sample_id: str, filename: str) -> str:
    if filename not in SAMPLE_FILES:
        raise InvalidIdError(f"sample file {filename!r} is not one of {', '.join(SAMPLE_FILES)}")
    return sample_prefix(run_id, round_index, sample_id) + filename


def step_prefix(run_id: str, round_index: int, sample_id: str, step_index: int) -> str:
    """`runs/{run}/rounds/{r}/samples/{id}/steps/{step}/`: the scene after paste `step_index`."""
    if not isinstance(step_index, int) or isinstance(step_index, bool) or not 0 <= step_index < MAX_STEP_INDEX:
        raise InvalidIdError(f"step {step_index!r} must be an integer in [0, {MAX_STEP_INDEX})")
    return f"{sample_prefix(run_id, round_index, sample_id)}steps/{step_index}/"


def step_key(run_id: str, round_index: int, sample_id: str, step_index: int, filename: str) -> str:
    if filename not in STEP_FILES:
        raise InvalidIdError(f"step file {filename!r} is not one of {', '.join(STEP_FILES)}")
    return step_prefix(run_id, round_index, sample_id, step_index) + filename


def within_a_sample(key: str, what: str = "key") -> str:
    """Check that a key received from outside names a file under some
    `runs/{run}/rounds/{r}/samples/{id}/` (its own folder, or one below it)."""
    validate_key(key, what)
    parts = key.split("/")
    if len(parts) < 7 or parts[0] != "runs" or parts[2] != "rounds" or parts[4] != "samples":
        raise InvalidIdError(f"{what} {key!r} does not lie under runs/{{run}}/rounds/{{r}}/samples/{{id}}/")
    validate_id(parts[1], f"{what}'s run id")
    if not parts[3].isdigit() or str(int(parts[3])) != parts[3]:
        raise InvalidIdError(f"{what} {key!r} has round {parts[3]!r}; rounds are plain integers")
    validate_round(int(parts[3]))
    validate_id(parts[5], f"{what}'s sample id")
    return key


def run_samples_prefix(run_id: str, round_index: int) -> str:
    """`runs/{run}/rounds/{r}/samples/`: every sample folder of one run's round."""
    return f"{run_prefix(run_id)}rounds/{validate_round(round_index)}/samples/"


def within_run(key: str, run_id: str, round_index: int, what: str = "key") -> str:
    """Check that a key received in a message of run `run_id`, round `round_index` names a file in
    one of that round's sample folders: a message of one run never reads or overwrites another
    run's samples, nor weights, indexes or run state elsewhere in the store."""
    key_within(key, "runs/", what)
    prefix = run_samples_prefix(run_id, round_index)
    if not key.startswith(prefix):
        raise InvalidIdError(f"{what} {key!r} lies outside {prefix!r}: a message of run {run_id!r} round "
                             f"{round_index} reads only its own round's samples")
    return within_a_sample(key, what)


def model_prefix(name: str, version: str) -> str:
    return f"models/{validate_id(name, 'model name')}/{validate_id(version, 'model version')}/"


def validate_version(value: str, what: str = "version") -> str:
    """A version segment such as "v1.2" or "sha256-0a1b…": ids plus dots, never starting with one."""
    if not isinstance(value, str) or not VERSION_PATTERN.fullmatch(value):
        raise InvalidIdError(f"{what} {shown(value)} is not a valid version: use 1-64 characters from [a-z0-9.-], "
                             "starting with a letter or digit")
    return value


def segmenter_version(run_id: str, round_index: int) -> str:
    """The segmenter f_t of a run's round t is versioned "{run}/{round}" (common.proto ModelVersion)."""
    return f"{validate_id(run_id, 'run id')}/{validate_round(round_index)}"


def parse_segmenter_version(version: str) -> tuple[str, int]:
    """(run, round) of a "{run}/{round}" segmenter version; InvalidInput for anything else."""
    run_id, _, round_text = version.partition("/") if isinstance(version, str) else ("", "", "")
    if not round_text.isdigit() or (len(round_text) > 1 and round_text[0] == "0"):
        raise InvalidIdError(f"segmenter version {shown(version)} must be '{{run}}/{{round}}', e.g. 'run-1/0'")
    validate_id(run_id, "segmenter version's run id")
    return run_id, validate_round(int(round_text))


def segmenter_prefix(run_id: str, round_index: int) -> str:
    return f"models/segmenter/{segmenter_version(run_id, round_index)}/"


def thesaurus_prefix(version: str) -> str:
    return f"thesaurus/{validate_version(version, 'thesaurus version')}/"


def key_within(key: str, prefix: str, what: str = "key") -> str:
    """Check that a key received from outside lies under the prefix it must belong to."""
    if not prefix.endswith("/"):
        raise ValueError(f"prefix {prefix!r} must end with '/' (a bare prefix would admit siblings)")
    validate_key(prefix.rstrip("/"), "prefix")
    validate_key(key, what)
    if not key.startswith(prefix):
        raise InvalidIdError(f"{what} {key!r} lies outside {prefix!r}")
    return key


def derive_sample_id(run_id: str, round_index: int, index: int, kind: str = "s") -> str:
    """Deterministic sample id: a redelivered or regenerated request maps to the same keys."""
    validate_id(run_id, "run id")
    validate_round(round_index)
    validate_id(kind, "sample kind")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < MAX_SAMPLE_INDEX:
        raise InvalidIdError(f"sample index {index!r} must be an integer in [0, {MAX_SAMPLE_INDEX})")
    digest = hashlib.sha256(f"{run_id}/{round_index}/{kind}/{index}".encode()).hexdigest()[:12]
    return validate_id(f"{kind}-{round_index}-{index}-{digest}", "derived sample id")
