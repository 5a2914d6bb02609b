"""One typed configuration for every service, loaded from YAML and overridden by env.

Precedence, lowest first: the defaults below, then the packaged
`default.yaml` (classes, backgrounds, prompt templates), then a YAML file the
operator names, then `FREEMASK_*` environment variables. Nested keys are joined
by a double underscore: `FREEMASK_STORE__ENDPOINT=minio:9000` sets
`store.endpoint`. Values are converted to the field's type
(`FREEMASK_BUS__MAX_ATTEMPTS=5`, `FREEMASK_STORE__SECURE=true`); lists are
written as YAML flow lists (`FREEMASK_WORLD__CLASSES='[cat, dog]'`). Variables
whose first segment names no config section are ignored.

Secrets (store and bus credentials) are `SecretStr`: they never appear in a
repr, a log line or a dumped config. They come from env or from a file named by
`*_file` (how Kubernetes mounts a Secret), never from the YAML in the repo.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

ENV_PREFIX = "FREEMASK_"
ENV_NESTING = "__"
PACKAGED_DEFAULTS = Path(__file__).with_name("default.yaml")

SERVICE_NAMES = ("attention_mask", "thesaurus", "placement", "harmonization", "scoring", "coordinator")
ServiceName = Literal["attention_mask", "thesaurus", "placement", "harmonization", "scoring", "coordinator"]


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem at once."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _read_secret(value: SecretStr | None, file: Path | None, what: str) -> SecretStr | None:
    if file is None:
        return value
    try:
        return SecretStr(file.read_text().strip())
    except OSError as err:
        raise ValueError(f"{what}: cannot read secret file {file}: {err.strerror}") from None


class StoreConfig(_Frozen):
    """The S3 API (SeaweedFS embedded, MinIO or any S3 in production)."""

    endpoint: str = "127.0.0.1:8333"
    bucket: str = Field("freemask", pattern=r"^[a-z0-9][a-z0-9.-]{2,62}$")
    prefix: str = Field("", pattern=r"^([a-z0-9-]+/)*$", description="key prefix inside the bucket, '' or 'a/b/'")
    region: str = "us-east-1"
    secure: bool = False
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    access_key_file: Path | None = None
    secret_key_file: Path | None = None
    # Objects above this size are uploaded in parts, so no caller holds two copies.
    multipart_threshold_bytes: int = Field(16 * 1024 * 1024, ge=5 * 1024 * 1024)

    @model_validator(mode="after")
    def _load_secret_files(self) -> StoreConfig:
        object.__setattr__(self, "access_key", _read_secret(self.access_key, self.access_key_file, "store.access_key"))
        object.__setattr__(self, "secret_key", _read_secret(self.secret_key, self.secret_key_file, "store.secret_key"))
        return self


class BusConfig(_Frozen):
    """Kafka (Tansu embedded). Timeouts are tuned for fast group joins; see DESIGN §3."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "freemask"
    group_prefix: str = "freemask"
    # Tansu holds a group join for about half the session timeout: kafka-python's
    # default 45 s session makes the first message take ~23 s (make bench).
    session_timeout_ms: int = Field(3000, ge=1000)
    heartbeat_interval_ms: int = Field(300, ge=100)
    max_poll_records: int = Field(16, ge=1)
    poll_timeout_ms: int = Field(200, ge=10)
    max_attempts: int = Field(3, ge=1, description="tries of one message before it goes to the DLQ")
    retry_backoff_s: float = Field(0.2, ge=0.0)
    retry_backoff_max_s: float = Field(5.0, ge=0.0)
    max_message_bytes: int = Field(1024 * 1024, ge=1024)
    # Tansu can serve the offset after one still being written (bus.GapGuard). Waiting past the
    # platform producers' request timeout (15 s) buys nothing: by then the producer has sent the
    # record again, under a new offset, so passing over the hole loses no record of theirs.
    gap_wait_s: float = Field(15.0, ge=0.0, description="how long a consumer waits for a skipped offset "
                                                        "to become readable before passing over it")
    partitions: int = Field(3, ge=1, description="partitions per topic when the platform creates topics")
    # Topics that need more parallelism than the rest (the slow stages' inputs), by
    # full topic name; a topic not named here gets `partitions`.
    topic_partitions: dict[str, int] = Field(default_factory=dict)
    replication_factor: int = Field(1, ge=1, description="replicas per topic when the platform creates topics")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: SecretStr | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None

    @field_validator("topic_partitions")
    @classmethod
    def _positive_partitions(cls, given: dict[str, int]) -> dict[str, int]:
        bad = {topic: count for topic, count in given.items() if count < 1}
        if bad:
            raise ValueError(f"partitions must be at least 1: {bad}")
        return given

    def partitions_of(self, topic: str) -> int:
        return self.topic_partitions.get(topic, self.partitions)

    @model_validator(mode="after")
    def _load_secret_files(self) -> BusConfig:
        object.__setattr__(
            self, "sasl_password", _read_secret(self.sasl_password, self.sasl_password_file, "bus.sasl_password")
        )
        return self


class TritonConfig(_Frozen):
    url: str = "127.0.0.1:8001"
    model_name: str = "fopa"
    timeout_s: float = Field(10.0, gt=0)


class ServicePorts(_Frozen):
    grpc_port: int = Field(ge=1, le=65535)
    metrics_port: int = Field(ge=1, le=65535)


def _default_ports() -> dict[str, dict[str, int]]:
    return {name: {"grpc_port": 50051 + i, "metrics_port": 9400 + i} for i, name in enumerate(SERVICE_NAMES)}


class ServerConfig(_Frozen):
    """What every gRPC server shares."""

    host: str = "127.0.0.1"
    max_workers: int = Field(4, ge=1)
    # The transport limit sits above the validation limits, so that an oversized
    # field is answered INVALID_ARGUMENT by our validator with a clear message
    # instead of a bare RESOURCE_EXHAUSTED from the transport.
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    grace_period_s: float = Field(10.0, ge=0)
    ports: dict[ServiceName, ServicePorts] = Field(default_factory=_default_ports, validate_default=True)
    # TLS on every gRPC server: a PEM certificate (chain) and its private key, read at start-up.
    # Unset = plaintext. The certificate must name the addresses clients dial: the services'
    # DNS names, and 127.0.0.1 for the `freemask health` probe inside the pod.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Mutual TLS: the servers refuse a client without a certificate signed by this CA.
    tls_client_ca_file: Path | None = None
    # TLS on this process's gRPC clients (the coordinator's calls to scoring, `freemask health`,
    # `freemask run`): the CA bundle that signed the servers' certificates. Unset = plaintext.
    tls_ca_file: Path | None = None
    # The certificate and key those clients present to servers that require one (mutual TLS).
    tls_client_cert_file: Path | None = None
    tls_client_key_file: Path | None = None

    @field_validator("ports", mode="before")
    @classmethod
    def _over_default_ports(cls, given: object) -> object:
        """Overriding one port of one service keeps every other default."""
        if not isinstance(given, Mapping):
            return given
        merged = _default_ports()
        for name, ports in given.items():
            merged[name] = {**merged.get(name, {}), **ports} if isinstance(ports, Mapping) else ports
        return merged

    @model_validator(mode="after")
    def _tls_complete(self) -> ServerConfig:
        """Refuse half-configured TLS, naming every missing piece at once.

        One config serves every process, and each is both a server and (for its probe, or
        the coordinator's calls) a client: servers on TLS with plaintext clients, or servers
        asking for client certificates that clients do not have, would only fail later, at
        the first call, as an unexplained UNAVAILABLE.
        """
        problems = []
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            given = "tls_cert_file" if self.tls_cert_file is not None else "tls_key_file"
            problems.append(f"tls_cert_file and tls_key_file go together; only {given} is set")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            problems.append("tls_client_ca_file (mutual TLS) needs the server's own tls_cert_file and tls_key_file")
        if (self.tls_client_cert_file is None) != (self.tls_client_key_file is None):
            given = "tls_client_cert_file" if self.tls_client_cert_file is not None else "tls_client_key_file"
            problems.append(f"tls_client_cert_file and tls_client_key_file go together; only {given} is set")
        if self.tls_client_cert_file is not None and self.tls_ca_file is None:
            problems.append("tls_client_cert_file needs tls_ca_file: a client certificate is only sent over TLS")
        if self.tls_cert_file is not None and self.tls_ca_file is None:
            problems.append("tls_cert_file (servers on TLS) needs tls_ca_file, or this process's own clients, "
                            "the health probe among them, could not reach the servers")
        if self.tls_client_ca_file is not None and self.tls_client_cert_file is None:
            problems.append("tls_client_ca_file (servers require client certificates) needs tls_client_cert_file "
                            "and tls_client_key_file, or this process's own clients would be refused")
        if problems:
            raise ValueError("half-configured gRPC TLS: " + "; ".join(problems))
        return self


class LimitsConfig(_Frozen):
    """Bounds on untrusted input, enforced at every gRPC and Kafka entry point."""

    max_prompt_chars: int = Field(512, ge=1)
    max_image_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_image_side_px: int = Field(4096, ge=8)
    max_batch: int = Field(64, ge=1)


class WorldConfig(_Frozen):
    """The vocabulary: which classes and backgrounds exist, and how prompts are worded."""

    classes: tuple[str, ...]
    backgrounds: tuple[str, ...]
    prompt_templates: tuple[str, ...]

    @model_validator(mode="after")
    def _templates_name_their_slots(self) -> WorldConfig:
        bad = [t for t in self.prompt_templates if "{cls}" not in t or "{background}" not in t]
        if bad:
            raise ValueError(f"prompt templates must contain {{cls}} and {{background}}: {bad}")
        return self


CIRCULAR_SEARCH = ("refine_cut 'refined' with a refine_reference_threshold is circular: cutting the walked map "
                   "and comparing it with itself binarised at that level just returns the level; leave "
                   "refine_reference_threshold unset (fuzzy IoU) or cut the attention map (refine_cut 'attention')")


class AttentionMaskConfig(_Frozen):
    """Stage 1: which generator draws, and how its attention becomes a mask."""

    # A diffusers directory (model_index.json + components): the shipped small
    # generator when unset, or e.g. a Stable Diffusion 1.5 snapshot on a volume.
    weights: Path | None = None
    # ModelVersion.version recorded on every sample; unset = a digest of the weights.
    weights_version: str | None = Field(None, pattern=r"^[a-z0-9.-]{1,64}(/[a-z0-9.-]{1,64})*$")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_inference_steps: int = Field(50, ge=1, le=1000)
    guidance_scale: float = Field(3.0, ge=0.0, le=30.0)
    max_batch: int = Field(16, ge=1, description="prompts per diffusion pass")
    # On a GPU, replay each denoising step from a CUDA graph (attention_mask/cuda_graphs.py):
    # at small batches an eager step is bound by its kernel launches. No effect on a CPU.
    cuda_graphs: bool = True
    # With cuda_graphs, record the torch.compile'd UNet (inductor: fused norms, activations and
    # layouts) instead of the eager one. Each new batch size pays a compile (about 50 s at SD 1.5's
    # size on an H200), and past torch._dynamo's recompile limit (8) steps run eagerly. No effect on a CPU.
    compile_unet: bool = False
    # Where the random walk's affinity comes from: "learned", an AffinityNet head on the
    # generated image (`affinity_weights`, unset = the head shipped for the small
    # generator, trained on the reference world), or "self_attention", the UNet's own
    # self-attention. The shipped head knows the reference world's pictures only: with
    # other weights (Stable Diffusion) use "self_attention" or a head trained on their domain.
    affinity: Literal["learned", "self_attention"] = "learned"
    affinity_weights: Path | None = None
    # The affinity grid's largest side: the learned head runs on the image area-averaged
    # down by powers of two until it fits; self-attention uses the largest attention grid
    # that fits (16 for the small generator, 32 for SD 1.5 at 512 px). A 64x64 grid's
    # 4096x4096 affinity per image costs more than it adds.
    affinity_max_side: int = Field(32, ge=1)
    # Random-walk sharpening β and length t; the map the mask is cut from: "refined" (the
    # walked map; best when the affinity grid is the image's) or "attention" (the fused
    # map; keeps detail when the grid is coarser than the image, as SD's at 512 px); and
    # the level at which the walked map is binarised for eq. 23 (unset: fuzzy IoU with it;
    # only with the "attention" cut, since the walked map compared with itself is circular).
    # Defaults: the best of a grid on train-split scenes (tests/benchmarks/bench_attention_mask.py).
    refine_beta: float = Field(4.0, gt=0.0)
    refine_iterations: int = Field(256, ge=0, le=4096)
    refine_cut: Literal["refined", "attention"] = "refined"
    refine_reference_threshold: float | None = Field(None, gt=0.0, lt=1.0)
    min_component_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    # A refined mask larger than this share of the image is Unusable (dead-lettered, not
    # labelled): the small generator sometimes draws no object, and the walk then spreads
    # over the background. In 2,000 train scenes of the reference world no object covers more
    # than 39 % of the image (a bus; trains 27 %). Unset or 1.0: no limit (SD 1.5, whose objects
    # may fill the frame).
    max_mask_fraction: float | None = Field(0.4, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _settings_agree(self) -> AttentionMaskConfig:
        if self.refine_cut == "refined" and self.refine_reference_threshold is not None:
            raise ValueError(CIRCULAR_SEARCH)
        if self.compile_unet and not self.cuda_graphs:
            raise ValueError("compile_unet compiles the step that cuda_graphs records: set cuda_graphs too")
        return self


class ThesaurusConfig(_Frozen):
    """Stage 2a: which objects fit a background (eq. 3), and how many to draw."""

    # Index under `thesaurus/{version}/` to serve; unset = the reference world's
    # caption corpus (`reference_captions` captions from `reference_seed`), built at
    # start-up and stored under its content digest.
    version: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9.-]{0,63}$")
    reference_captions: int = Field(50_000, ge=1)
    reference_seed: int = Field(0, ge=0)
    # Surface forms of a class or background beyond its name and regular plurals.
    synonyms: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    # The stage draws objects in proportion to R(o, b) among those with R >= this.
    min_relation: float = Field(0.05, ge=0.0, le=1.0)
    # "relation" draws by eq. 3 as above; "uniform" draws every class that has a generated
    # source with equal probability, ignoring the captions (the paper's ablation without
    # the thesaurus).
    object_choice: Literal["relation", "uniform"] = "relation"
    # Indexes other than the served one stay loaded for requests that name them.
    cached_versions: int = Field(4, ge=1)


class PlacementConfig(_Frozen):
    """Stage 2b: where the next object goes (FOPA heatmaps, served by Triton)."""

    # Largest share of a candidate box that may lie over any object already in the
    # scene (intersection over the candidate's area): 0 forbids any overlap, 1 lets
    # FOPA alone decide. Some overlap is allowed because objects in real scenes
    # stand in front of one another; occlusion keeps the label maps exact. Used when
    # a PlaceRequest leaves max_overlap unset, and by the stage always.
    max_overlap: float = Field(0.3, ge=0.0, le=1.0)
    # "fopa" ranks the candidate boxes by FOPA's heatmaps (served by Triton); "uniform" gives
    # every candidate the same score, so the box is drawn uniformly from the valid ones by
    # the query's seed (the paper's ablation without FOPA; Triton is then not called).
    model: Literal["fopa", "uniform"] = "fopa"


class HarmonizationConfig(_Frozen):
    """Stage 2c: how a placed object is pasted and made to match its new scene."""

    # Method when a request or task leaves it unspecified. RAIN is the paper's
    # learned harmonizer; statistics_transfer is the non-learned fallback (the
    # foreground's per-channel mean/std set to the background's), and copy_paste
    # leaves colours alone, as the ablation baseline.
    method: Literal["rain", "statistics_transfer", "copy_paste"] = "rain"
    # RAIN weights directory (rain.safetensors + config.json); unset = the shipped
    # weights in services/harmonization/weights/rain/. With method "rain" they are
    # loaded at start-up, so missing weights stop the service instead of failing
    # every sample.
    weights: Path | None = None
    # Width, in pixels, of the soft alpha ramp inside the pasted object's edge: the
    # outermost pixels blend with the scene behind them so the seam does not show.
    # Only the image is blended; labels stay exactly the binarised mask. 0 = hard edge.
    feather_px: int = Field(1, ge=0, le=16)


class ScoringConfig(_Frozen):
    """Active learning's discriminator: the Mask2Former segmenter f_t and S(x) = IoU(f_t(x), y_pseudo)."""

    # "tiny" for the embedded default (CPU, 32-64 px images); "r50" or "swin-b" for
    # the paper's standard shapes on GPUs (services/scoring/segmenter.py).
    preset: Literal["tiny", "r50", "swin-b"] = "tiny"
    # Side of the square the network sees; predictions are resized back to each image.
    input_size: int = Field(64, ge=32, le=2048)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Training: passes over D_t when a Train request leaves epochs unset, AdamW with a
    # cosine decay over all steps, and a checkpoint every this many steps, so a killed job
    # loses at most that much work.
    epochs: int = Field(30, ge=1, le=1000)
    batch_size: int = Field(16, ge=1, le=1024)
    learning_rate: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    checkpoint_every_steps: int = Field(200, ge=1)
    # Augmentation: horizontal flips, crops keeping at least this share of each side,
    # and brightness/contrast gains within ±colour_jitter (the world's lighting varies).
    min_crop: float = Field(0.7, gt=0.0, le=1.0)
    colour_jitter: float = Field(0.2, ge=0.0, lt=1.0)
    # Images per forward pass when scoring or evaluating.
    score_batch: int = Field(64, ge=1, le=1024)
    # Segmenters kept loaded (the stage scores each round with that round's f_t).
    cached_models: int = Field(2, ge=1)


class CoordinatorConfig(_Frozen):
    """Algorithm 1: how many rounds, how much data each, and how much of it is kept.

    A StartRun request may override any of the run settings (rounds .. train_epochs)
    for its run; the values a run started with are saved with it.
    """

    rounds: int = Field(2, ge=1, le=100, description="T + 1: rounds of train, generate, score, keep")
    alpha: float = Field(0.7, gt=0.0, le=1.0, description="share of each round's scored samples kept")
    # per_class: the top α of each class's samples, so a weak f_t's blind spots do not empty
    # D_{t+1} of the classes it cannot see yet; per_class_and_kind: the same with a class's single
    # objects and composed scenes ranked apart, so composed scenes, which f_t scores lower, keep
    # their share; global: the top α of all scores (the paper's cut). See coordinator/selection.py.
    selection: Literal["global", "per_class", "per_class_and_kind"] = "per_class_and_kind"
    initial_samples: int = Field(24, ge=1, le=1_000_000, description="|D_0|: single objects generated first")
    samples_per_round: int = Field(24, ge=1, le=1_000_000, description="|D'_t|: samples generated per round")
    # The paper mixes single-object images and edited multi-object scenes in each round.
    composed_fraction: float = Field(0.5, ge=0.0, le=1.0)
    objects_to_add: int = Field(2, ge=0, le=16, description="objects the thesaurus adds to a composed scene")
    train_epochs: int | None = Field(None, ge=1, le=1000, description="unset: scoring.epochs")
    image_size: int = Field(32, ge=8, le=4096, description="side of generated images, in pixels")
    # The scoring service that trains f_t: unset = this config's scoring port on server.host.
    scoring_target: str | None = None
    # Store key of a JSONL manifest of labelled real images ({image_key, label_key} per
    # line): each f_t's mIoU on it is recorded per round. `freemask run` writes the
    # reference world's validation split and sets it when unset.
    validation_manifest: str | None = None
    # How often running jobs are polled and a quiet bus is checked again.
    poll_interval_s: float = Field(1.0, gt=0.0)
    # How long `freemask run` follows its run before giving up on it.
    run_timeout_s: float = Field(3600.0, gt=0.0)


class StackConfig(_Frozen):
    """The embedded default stack (`freemask stack up`): where it keeps data and listens."""

    data_dir: Path = Path(".stack")
    s3_port: int = 8333
    # SeaweedFS opens a dozen ports; they are laid out from this base so that
    # two stacks (a test's private one, say) never collide.
    seaweed_port_base: int = 18300
    kafka_port: int = 9092
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    model_repository: Path | None = None
    kafka_storage_bucket: str = "tansu"
    start_timeout_s: float = Field(60.0, gt=0)


class FreemaskConfig(_Frozen):
    store: StoreConfig = StoreConfig()
    bus: BusConfig = BusConfig()
    triton: TritonConfig = TritonConfig()
    server: ServerConfig = ServerConfig()
    limits: LimitsConfig = LimitsConfig()
    world: WorldConfig
    attention_mask: AttentionMaskConfig = AttentionMaskConfig()
    thesaurus: ThesaurusConfig = ThesaurusConfig()
    placement: PlacementConfig = PlacementConfig()
    harmonization: HarmonizationConfig = HarmonizationConfig()
    scoring: ScoringConfig = ScoringConfig()
    coordinator: CoordinatorConfig = CoordinatorConfig()
    stack: StackConfig = StackConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split(ENV_NESTING)]
        # Only names that start with a config section are settings: Kubernetes
        # injects FREEMASK_SERVICE_HOST, FREEMASK_PORT_... for a Service named
        # "freemask", and those must not break start-up.
        if path[0] not in FreemaskConfig.model_fields:
            continue
        if not all(path):
            raise ConfigError(f"{name}: empty key segment (use a double underscore only between names)")
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {part} is both a value and a section")
        node[path[-1]] = _parse_env_value(name, raw, _expects_container(path))
    return overrides


def _expects_container(path: list[str]) -> bool:
    """Whether the field at `path` holds a list, tuple or mapping (else a scalar or secret)."""
    model: Any = FreemaskConfig
    for part in path:
        if get_origin(model) is dict:  # `part` is a key of a mapping such as server.ports
            model = get_args(model)[1]
            continue
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return False
        model = fields[part].annotation
    return get_origin(model) in (tuple, list, dict)


def _parse_env_value(name: str, raw: str, container: bool) -> Any:
    # Scalars stay strings: pydantic converts "5" or "true" where the field is typed
    # so, and a secret such as "0123" or "[x" keeps its exact text. Lists and
    # mappings are written as YAML flow collections: FREEMASK_WORLD__CLASSES='[cat, dog]'.
    if not container:
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"{name}: not a YAML flow list or mapping, e.g. '[cat, dog]'") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(path: Path | str | None = None, environ: Mapping[str, str] | None = None) -> FreemaskConfig:
    """Build the config; raises ConfigError listing every problem, never a partial config."""
    environ = os.environ if environ is None else environ
    layers = [_read_yaml(PACKAGED_DEFAULTS)]
    config_path = path or environ.get(f"{ENV_PREFIX}CONFIG")
    if config_path:
        layers.append(_read_yaml(Path(config_path)))
    layers.append({k: v for k, v in _env_overrides(environ).items() if k != "config"})
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _deep_merge(merged, layer)
    try:
        return FreemaskConfig.model_validate(merged)
    except ValidationError as err:
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in err.errors()
        )
        count = err.error_count()
        raise ConfigError(f"invalid configuration ({count} problem{'s' if count > 1 else ''}):\n{problems}") from None
